"""The accuracy benchmark's protocols and variants: what each run passes to examples/train_cifar.py, how its rows are
labelled, and what a reader of its table needs to know. Tables, one entry a line (benchmarks/accuracy.py runs them)."""
from __future__ import annotations

from typing import Any

# What each variant passes to train_cifar.py on top of its protocol. One module, one entry: a new variant is a line.
VARIANTS: dict[str, list[str]] = {
    "plain": ["--method", "plain"],
    # The paper's alpha 0.9, kdwrap's default: explicit, so that a table merged across sessions never mixes alphas.
    "osakd-k8": ["--method", "osakd", "--k", "8", "--alpha", "0.9"],
    "osakd-k16": ["--method", "osakd", "--k", "16", "--alpha", "0.9"],
    "osakd-k8-inbatch": ["--method", "osakd", "--k", "8", "--bank-size", "0", "--alpha", "0.9"],
    # The paper's text read plainly: neighbours from the mini-batch, 0.9 on the distillation term (alpha is CE's).
    "osakd-k8-inbatch-alpha0.1": ["--method", "osakd", "--k", "8", "--bank-size", "0", "--alpha", "0.1"],
    # The free controls (kdwrap.controls): label smoothing 0.1, and a weight average with PCL's temporal-mean decay.
    "plain-ls": ["--method", "plain", "--label-smoothing", "0.1"],
    "plain-ls-lr0.3x": ["--method", "plain", "--label-smoothing", "0.1", "--lr", "{lr_times_0_3}"],
    "plain-ema": ["--method", "plain", "--ema-decay", "0.999"],
    "plain-ema-lr0.3x": ["--method", "plain", "--ema-decay", "0.999", "--lr", "{lr_times_0_3}"],
    "osakd-k8-alpha0.5": ["--method", "osakd", "--k", "8", "--alpha", "0.5"],
    "osakd-k8-alpha0.3": ["--method", "osakd", "--k", "8", "--alpha", "0.3"],
    "osakd-k8-alpha0.1": ["--method", "osakd", "--k", "8", "--alpha", "0.1"],
    # Control for OSAKD's alpha 0.3 without weight decay: CE weighted by 0.3 is plain SGD at 0.3x the learning rate.
    "plain-lr0.3x": ["--method", "plain", "--lr", "{lr_times_0_3}"],
    # Control for the other reading of the paper's alpha (distillation weight 0.9, CE weight 0.1): plain at 0.1x lr.
    "plain-lr0.1x": ["--method", "plain", "--lr", "{lr_times_0_1}"],
    # Neighbours from the whole training set's latest outputs: a bank of one epoch of batches (drop_last).
    "osakd-k8-bank-epoch": ["--method", "osakd", "--k", "8", "--alpha", "0.9", "--bank-size", "{epoch_samples}"],
    # OSAKD at that learning rate, the paper's alpha: does distillation add to a better-tuned step size?
    "osakd-k8-lr0.3x": ["--method", "osakd", "--k", "8", "--alpha", "0.9", "--lr", "{lr_times_0_3}"],
    "osakd-k8-inbatch-lr0.3x": ["--method", "osakd", "--k", "8", "--bank-size", "0", "--alpha", "0.9", "--lr",
                                "{lr_times_0_3}"],
    "one-m3-lr0.3x": ["--method", "one", "--branches", "3", "--lr", "{lr_times_0_3}"],
    "dml-2-lr0.3x": ["--method", "dml", "--peers", "2", "--lr", "{lr_times_0_3}"],
    "okddip-4-lr0.3x": ["--method", "okddip", "--branches", "4", "--lr", "{lr_times_0_3}"],
    "byot-lr0.3x": ["--method", "byot", "--lr", "{lr_times_0_3}"],
    "pcl-3-lr0.3x": ["--method", "pcl", "--branches", "3", "--lr", "{lr_times_0_3}"],
    "osakd-k8-kl": ["--method", "osakd", "--k", "8", "--distill", "kl", "--alpha", "0.9"],
    "one-m2": ["--method", "one", "--branches", "2"],
    "one-m3": ["--method", "one", "--branches", "3"],
    "one-m3-copy": ["--method", "one", "--branches", "3", "--branch-init", "copy"],
    # The reference code's ramp-up: the KL weight rises over 80 of its 300 epochs; here the same share of the run.
    "one-m3-ramp": ["--method", "one", "--branches", "3", "--rampup-epochs", "{reference_rampup_epochs}"],
    "dml-2": ["--method", "dml", "--peers", "2"],
    "okddip-4": ["--method", "okddip", "--branches", "4"],
    "byot": ["--method", "byot"],
    "pcl-3": ["--method", "pcl", "--branches", "3"],
    # The protocol's settings with a larger network (TEACHER_MODELS): KD's teacher, reported as its own row.
    "teacher": ["--method", "plain", "--model", "{teacher_model}"],
    "kd": ["--method", "kd", "--teacher", "{teacher_run}"],
    "kd-lr0.3x": ["--method", "kd", "--teacher", "{teacher_run}", "--lr", "{lr_times_0_3}"],
}
# Variants whose runs need another variant's finished run (its folder is the placeholder of the same name + "_run").
NEEDS = {"kd": "teacher", "kd-lr0.3x": "teacher"}
# Variants run with one seed whatever --seeds says: one teacher serves every seed's KD run, and also the runs of a later
# session whose table joins this one's (--merge).
ONE_SEED = {"teacher": 0}
# KD's teacher per protocol (default: the protocol's own model). Kept out of PROTOCOLS: a protocol's setup is what
# --merge compares, and the published tables' setups stay as they were.
TEACHER_MODELS = {"osakd-cifar10": "cifar_resnet20", "osakd-fmnist": "cifar_resnet20",
                  "one-resnet20-subset": "cifar_resnet56", "one-resnet20-fit": "cifar_resnet56",
                  "one-resnet32": "cifar_resnet110", "one-resnet32-gpu-call": "cifar_resnet110"}
REFERENCE_RAMPUP_SHARE = 80 / 300
LABELS = {"plain": "plain", "osakd-k8": "OSAKD 8-NN", "osakd-k16": "OSAKD 16-NN",  # alpha 0.9, see VARIANTS
          "osakd-k8-inbatch": "OSAKD 8-NN in-batch",
          "osakd-k8-inbatch-alpha0.1": "OSAKD 8-NN in-batch alpha 0.1",
          "plain-ls": "plain, label smoothing 0.1", "plain-ls-lr0.3x": "plain, label smoothing 0.1, 0.3x learning rate",
          "plain-ema": "plain, weight average (deployed)",
          "plain-ema-lr0.3x": "plain, weight average (deployed), 0.3x learning rate",
          "osakd-k8-alpha0.5": "OSAKD 8-NN alpha 0.5",
          "osakd-k8-alpha0.3": "OSAKD 8-NN alpha 0.3", "osakd-k8-alpha0.1": "OSAKD 8-NN alpha 0.1",
          "plain-lr0.3x": "plain, 0.3x learning rate", "plain-lr0.1x": "plain, 0.1x learning rate",
          "osakd-k8-bank-epoch": "OSAKD 8-NN, bank of one epoch", "osakd-k8-lr0.3x": "OSAKD 8-NN, 0.3x learning rate",
          "osakd-k8-inbatch-lr0.3x": "OSAKD 8-NN in-batch, 0.3x learning rate",
          "one-m3-lr0.3x": "ONE m=3, 0.3x learning rate", "dml-2-lr0.3x": "DML 2 peers (peer 0), 0.3x learning rate",
          "okddip-4-lr0.3x": "OKDDip 3 peers + leader (leader), 0.3x learning rate",
          "byot-lr0.3x": "BYOT (deepest exit), 0.3x learning rate",
          "okddip-4": "OKDDip 3 peers + leader (leader)", "byot": "BYOT (deepest exit)",
          "pcl-3": "PCL 3 peers (temporal mean of peer 0)",
          "pcl-3-lr0.3x": "PCL 3 peers (temporal mean of peer 0), 0.3x learning rate",
          "osakd-k8-kl": "OSAKD 8-NN KL", "one-m2": "ONE m=2", "one-m3": "ONE m=3",
          "one-m3-copy": "ONE m=3 copied branches", "one-m3-ramp": "ONE m=3 ramp-up",
          "dml-2": "DML 2 peers (peer 0)", "teacher": "teacher ({teacher_model}, plain)",
          "kd": "KD from {teacher_model}", "kd-lr0.3x": "KD from {teacher_model}, 0.3x learning rate"}
# What a reader of a table with these variants needs to know, printed under it.
NOTES = {
    "dml-2": "DML (peer 0) is the deployed peer of 2 trained together; every peer's accuracy is in the runs' "
             "history.json (test_acc_peers).",
    "kd": "KD distils from the teacher row's run: trained once (seed {teacher_seed}) with the protocol's settings, "
          "it serves every seed's KD run, so KD's spread over seeds leaves out the teacher's (and with a training "
          "subset, the teacher learnt seed {teacher_seed}'s images).",
}
NOTES["kd-lr0.3x"] = NOTES["kd"]
NOTES["pcl-3"] = ("PCL reports its deployed model, the temporal mean of peer 0; peer 0 itself is in the runs' "
                  "history.json (test_acc_live_peer). Where the protocol augments, each peer trains on its own crop and flip of "
                  "every image (kdwrap's, in place of the loop's); where it does not, every peer sees the images as "
                  "given, as plain does.")
NOTES["pcl-3-lr0.3x"] = NOTES["pcl-3"]

# Per protocol: the data, the model and the optimisation passed to train_cifar.py, and the variants it compares.
PROTOCOLS: dict[str, dict[str, Any]] = {
    # The OSAKD paper: batch 64, SGD momentum 0.9, no augmentation, max test accuracy over epochs (100 epochs, 5
    # runs in the paper). The learning rate, weight decay and epoch count are kdwrap's CPU-budget choices.
    "osakd-cifar10": {"dataset": "cifar10-pack", "model": "lenet5", "epochs": 20, "batch_size": 64, "lr": 0.01,
                      "weight_decay": 0.0, "schedule": "constant", "nesterov": False, "augment": False,
                      "variants": ["plain", "osakd-k8", "osakd-k16", "one-m2", "one-m3"]},
    # The paper's whole protocol: 100 epochs, the paper's reading (best over epochs) and the last. The paper's learning
    # rate is lost from the text we have: "lr" is the one `--select-lr 0.01 0.003 0.001` chose for plain on 5,000
    # training images held out (accuracy_osakd-cifar10-paper-lr-selection_*.json), used for every row.
    "osakd-cifar10-paper": {"dataset": "cifar10-pack", "model": "lenet5", "epochs": 100, "batch_size": 64,
                            "lr": 0.003, "weight_decay": 0.0, "schedule": "constant", "nesterov": False,
                            "augment": False,
                            "variants": ["plain", "osakd-k8", "osakd-k8-alpha0.1", "plain-lr0.1x", "osakd-k16",
                                         "osakd-k8-bank-epoch"]},
    "osakd-fmnist": {"dataset": "fashion-mnist", "model": "small_cnn", "epochs": 20, "batch_size": 64, "lr": 0.01,
                     "weight_decay": 0.0, "schedule": "constant", "nesterov": False, "augment": False,
                     "variants": ["plain", "osakd-k8", "osakd-k16", "one-m2", "one-m3"]},
    # The ONE protocol (SGD Nesterov 0.9, lr 0.1 cosine, wd 5e-4, pad-4 crop + flip, 3 branches) shrunk to a CPU:
    # a class-balanced subset trained long enough to fit it, where distillation has something to correct.
    "one-resnet20-subset": {"dataset": "cifar10-pack", "model": "cifar_resnet20", "epochs": 20, "batch_size": 128,
                            "lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine", "nesterov": True,
                            "augment": True, "limit_train": 2000, "limit_test": 2000,
                            "variants": ["plain", "one-m3", "one-m3-copy"]},
    # The same on half the images for four times the epochs: long enough for the network to fit its training set.
    "one-resnet20-fit": {"dataset": "cifar10-pack", "model": "cifar_resnet20", "epochs": 80, "batch_size": 128,
                         "lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine", "nesterov": True,
                         "augment": True, "limit_train": 1000, "limit_test": 2000,
                         "variants": ["plain", "one-m3", "osakd-k8", "one-m3-ramp"]},
    "one-resnet32": {"dataset": "cifar10-pack", "model": "cifar_resnet32", "epochs": 30, "batch_size": 128,
                     "lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine", "nesterov": True, "augment": True,
                     "variants": ["plain", "one-m3", "one-m3-copy", "osakd-k8"]},
    # The ONE protocol's ResNet-32 on the whole set in one 10-minute device call on an H200: plain, ONE m=3 and
    # OSAKD, seeds 0 1 2 (nine runs at once), compiled with CUDA graphs ("cuda_args"; on a CPU the runs stay eager:
    # inductor took 62 s to compile plain ResNet-32 on the 2-core CPU, so the dry run would only compile). The plan,
    # from GPU_PLANS' figures (the command prints the expected wall time before it starts):
    #   steps: 50,000 // 128 = 390 per epoch. CUDA-graph steps on the H200 (speed.py, 2026-12-04): plain 5.57 ms,
    #   ONE m=3 fused 8.74 ms; OSAKD ~6.6 ms (plain + ~1 ms of k-NN search and bank update, eager: train_cifar.py
    #   compiles the model, not the loss). Nine processes share the GPU and under CUDA graphs they take turns, so
    #   their steps add up: 390 x (5.57 + 8.74 + 6.6) ms = 8.2 s per seed, 24.5 s per epoch of all nine, plus ~0.3 s
    #   of evaluation (10,000 test images, eager) per run: ~27 s per epoch.
    #   fixed: ~20 s of start-up (imports, CUDA contexts, data onto the GPU) and ~90 s of compiling (nine processes
    #   at once on 16 cores; ONE m=3 alone took 35 s).
    #   epochs: the 15-minute plan (benchmarks/README.md) leaves this call --deadline 450 after the speed suite:
    #   (450 - 110) / (27 x 1.15 margin) = 10.9, so 10 epochs, expected 110 + 10 x 27 = 380 s; a call of its own
    #   (--deadline 540) has room to spare. Runs cut by the deadline resume with the same command while the machine
    #   is still warm; more seeds join the table in a later call with --seeds 3 4 5 --merge <this call's JSON>.
    "one-resnet32-gpu-call": {"dataset": "cifar10-pack", "model": "cifar_resnet32", "epochs": 10, "batch_size": 128,
                              "lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine", "nesterov": True,
                              "augment": True, "variants": ["plain", "one-m3", "osakd-k8"],
                              "cuda_args": ["--compile", "--compile-mode", "reduce-overhead", "--channels-last"]},
}
SMOKE = {"epochs": 1, "limit_train": 512, "limit_test": 256}
# A GPU protocol's expected wall time (see its comment in PROTOCOLS): milliseconds per training step of each variant
# (runs taking turns on the GPU add theirs up), seconds of start-up and compiling, and of one run's evaluation.
GPU_PLANS: dict[str, dict[str, Any]] = {
    "one-resnet32-gpu-call": {"step_ms": {"plain": 5.57, "one-m3": 8.74, "osakd-k8": 6.6}, "startup_s": 20.0,
                              "compile_s": 90.0, "eval_s": 0.3},
}
