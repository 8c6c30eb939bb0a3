"""Test accuracy of plain training against kdwrap's methods, several seeds, runs as parallel processes.

Each protocol is one command; every (variant, seed) is one process of examples/train_cifar.py (the only training
loop), with data on the device. The CIFAR-10 JPEG pack ships with the repository (data/cifar10-jpeg.npz).

    # The OSAKD paper's Table I on CIFAR-10: its LeNet-5 network, batch 64, SGD momentum 0.9, constant lr, no
    # augmentation; plain, OSAKD 8-NN / 16-NN, ONE with 2 and 3 branches (and ONE-E from the same runs)
    python benchmarks/accuracy.py --protocol osakd-cifar10 --seeds 0 1 2
    # The same on Fashion-MNIST with the paper's FMNIST network (Debian's dataset-fashion-mnist)
    python benchmarks/accuracy.py --protocol osakd-fmnist --seeds 0 1 2
    # ONE on a residual network at CPU scale: CIFAR ResNet-20 on a class-balanced subset, the ONE protocol
    python benchmarks/accuracy.py --protocol one-resnet20-subset --seeds 0 1
    # The same, long enough to fit: 80 epochs of a 1,000-image subset; plain, ONE, OSAKD, ONE with the reference ramp-up
    python benchmarks/accuracy.py --protocol one-resnet20-fit --seeds 0 1
    # ONE's protocol on the whole set, CIFAR ResNet-32, 30 epochs (a GPU job)
    python benchmarks/accuracy.py --protocol one-resnet32 --seeds 0 1
    # DML (2 peers) and KD on the LeNet-5 protocol: KD's teacher, a plain CIFAR ResNet-20 (TEACHER_MODELS), is
    # trained first (once, seed 0) in the same --out folder and reported as its own row
    python benchmarks/accuracy.py --protocol osakd-cifar10 --variants plain dml-2 kd --seeds 0 1 2
    # plumbing check on a CPU: 1 epoch on 512 training / 256 test images (accuracies meaningless)
    python benchmarks/accuracy.py --protocol osakd-cifar10 --smoke

Run folders go to --out (default runs/accuracy-<protocol>[-smoke]); a run that is already there is resumed, so the
same command continues an interrupted benchmark. Reported per model: test accuracy at the best epoch (the papers'
convention) and the last, mean ± standard deviation over seeds with each seed's value, the paired difference to
plain with its 95 % t-interval over seeds and the verdict (beyond / within noise, see kdwrap.seeds), and the last
epoch's training accuracy (so a reader sees whether the network fits its training set). ONE gives two rows from the
same runs: ONE (branch 0), the deployed model, and ONE-E, the gated ensemble (not a model of the original size).
DML's row is peer 0, the deployed peer (every peer's accuracy is in its runs' history.json). A variant that needs
another's run (KD needs its teacher) gets it added to the variants and started first; the teacher is trained once,
with seed 0, and serves every seed's KD run.
Writes benchmarks/results/accuracy_<protocol>_<device>_<date>.json and a PNG of test-accuracy curves.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import markdown_table

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train_cifar.py"
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT))

from kdwrap.seeds import paired_difference, plot_curves, spread  # noqa: E402

# What each variant passes to train_cifar.py on top of its protocol. One module, one entry: a new variant is a line.
VARIANTS: dict[str, list[str]] = {
    "plain": ["--method", "plain"],
    # The paper's alpha 0.9, kdwrap's default: explicit, so that a table merged across sessions never mixes alphas.
    "osakd-k8": ["--method", "osakd", "--k", "8", "--alpha", "0.9"],
    "osakd-k16": ["--method", "osakd", "--k", "16", "--alpha", "0.9"],
    "osakd-k8-inbatch": ["--method", "osakd", "--k", "8", "--bank-size", "0", "--alpha", "0.9"],
    "osakd-k8-alpha0.5": ["--method", "osakd", "--k", "8", "--alpha", "0.5"],
    "osakd-k8-alpha0.3": ["--method", "osakd", "--k", "8", "--alpha", "0.3"],
    "osakd-k8-alpha0.1": ["--method", "osakd", "--k", "8", "--alpha", "0.1"],
    # Control for OSAKD's alpha 0.3 without weight decay: CE weighted by 0.3 is plain SGD at 0.3x the learning rate.
    "plain-lr0.3x": ["--method", "plain", "--lr", "{lr_times_0_3}"],
    # OSAKD at that learning rate, the paper's alpha: does distillation add to a better-tuned step size?
    "osakd-k8-lr0.3x": ["--method", "osakd", "--k", "8", "--alpha", "0.9", "--lr", "{lr_times_0_3}"],
    "one-m3-lr0.3x": ["--method", "one", "--branches", "3", "--lr", "{lr_times_0_3}"],
    "dml-2-lr0.3x": ["--method", "dml", "--peers", "2", "--lr", "{lr_times_0_3}"],
    "okddip-4-lr0.3x": ["--method", "okddip", "--branches", "4", "--lr", "{lr_times_0_3}"],
    "byot-lr0.3x": ["--method", "byot", "--lr", "{lr_times_0_3}"],
    "osakd-k8-kl": ["--method", "osakd", "--k", "8", "--distill", "kl", "--alpha", "0.9"],
    "one-m2": ["--method", "one", "--branches", "2"],
    "one-m3": ["--method", "one", "--branches", "3"],
    "one-m3-copy": ["--method", "one", "--branches", "3", "--branch-init", "copy"],
    # The reference code's ramp-up: the KL weight rises over 80 of its 300 epochs; here the same share of the run.
    "one-m3-ramp": ["--method", "one", "--branches", "3", "--rampup-epochs", "{reference_rampup_epochs}"],
    "dml-2": ["--method", "dml", "--peers", "2"],
    "okddip-4": ["--method", "okddip", "--branches", "4"],
    "byot": ["--method", "byot"],
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
                  "one-resnet32": "cifar_resnet110"}
REFERENCE_RAMPUP_SHARE = 80 / 300
LABELS = {"plain": "plain", "osakd-k8": "OSAKD 8-NN", "osakd-k16": "OSAKD 16-NN",  # alpha 0.9, see VARIANTS
          "osakd-k8-inbatch": "OSAKD 8-NN in-batch",
          "osakd-k8-alpha0.5": "OSAKD 8-NN alpha 0.5",
          "osakd-k8-alpha0.3": "OSAKD 8-NN alpha 0.3", "osakd-k8-alpha0.1": "OSAKD 8-NN alpha 0.1",
          "plain-lr0.3x": "plain, 0.3x learning rate", "osakd-k8-lr0.3x": "OSAKD 8-NN, 0.3x learning rate",
          "one-m3-lr0.3x": "ONE m=3, 0.3x learning rate", "dml-2-lr0.3x": "DML 2 peers (peer 0), 0.3x learning rate",
          "okddip-4-lr0.3x": "OKDDip 3 peers + leader (leader), 0.3x learning rate",
          "byot-lr0.3x": "BYOT (deepest exit), 0.3x learning rate",
          "okddip-4": "OKDDip 3 peers + leader (leader)", "byot": "BYOT (deepest exit)",
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

# Per protocol: the data, the model and the optimisation passed to train_cifar.py, and the variants it compares.
PROTOCOLS: dict[str, dict[str, Any]] = {
    # The OSAKD paper: batch 64, SGD momentum 0.9, no augmentation, max test accuracy over epochs (100 epochs, 5
    # runs in the paper). The learning rate, weight decay and epoch count are kdwrap's CPU-budget choices.
    "osakd-cifar10": {"dataset": "cifar10-pack", "model": "lenet5", "epochs": 20, "batch_size": 64, "lr": 0.01,
                      "weight_decay": 0.0, "schedule": "constant", "nesterov": False, "augment": False,
                      "variants": ["plain", "osakd-k8", "osakd-k16", "one-m2", "one-m3"]},
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
}
SMOKE = {"epochs": 1, "limit_train": 512, "limit_test": 256}
TRAIN_KEYS = ("dataset", "model", "epochs", "batch_size", "lr", "weight_decay", "schedule", "limit_train",
              "limit_test")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", default="osakd-cifar10", choices=list(PROTOCOLS))
    p.add_argument("--data", default=None, help="the CIFAR-10 pack file (default: the repository's "
                   "data/cifar10-jpeg.npz) or the Fashion-MNIST folder (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                   help="default: the protocol's (plain first: it is the baseline)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="default: the protocol's (1 with --smoke)")
    p.add_argument("--limit-train", type=int, default=None, help="default: the protocol's (0: all)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu (always cpu with --smoke)")
    p.add_argument("--jobs", type=int, default=None,
                   help="concurrent processes (default: all runs at once on GPU; one per core on CPU)")
    p.add_argument("--smoke", action="store_true",
                   help="plumbing check: 1 epoch, 512 training / 256 test images, CPU; accuracies are meaningless")
    p.add_argument("--out", default=None, help="run folders (default runs/accuracy-<protocol>[-smoke])")
    p.add_argument("--report-only", action="store_true",
                   help="summarise the runs already in --out (finished or not) without training")
    p.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                   help="earlier results of the same protocol (benchmarks/results/accuracy_*.json): their seeds join "
                   "this run's in the tables, so a table grows by seeds across sessions")
    p.add_argument("--baseline", default="plain", metavar="VARIANT",
                   help="the variant every row is compared with (default plain), e.g. plain-lr0.3x")
    p.add_argument("--name", default="", metavar="NAME",
                   help="added to the result files' names (accuracy_<protocol>-NAME_...), so that two tables of one "
                   "protocol and day do not overwrite each other, e.g. --name family-lr0.3x")
    p.add_argument("--train-args", default="", help="extra arguments for train_cifar.py, e.g. \"--channels-last\"")
    args = p.parse_args()
    args.variants = with_needs(args.variants or PROTOCOLS[args.protocol]["variants"])
    if args.baseline not in VARIANTS:
        p.error(f"--baseline {args.baseline!r} is not a variant; valid: {', '.join(VARIANTS)}")
    if args.variants[0] != args.baseline:
        args.variants = [args.baseline] + [v for v in args.variants if v != args.baseline]
    return args


def with_needs(variants: list[str]) -> list[str]:
    """``variants`` with the variants they need (:data:`NEEDS`) added, each just before the first that needs it."""
    out: list[str] = []
    for v in variants:
        need = NEEDS.get(v)
        if need is not None and need not in out and need not in variants:
            out.append(need)
        if v not in out:
            out.append(v)
    return out


def placeholders(protocol: str, setup: dict[str, Any], out_root: Path, seed: int = 0) -> dict[str, str]:
    """The values of the ``{...}`` placeholders of :data:`VARIANTS` and :data:`LABELS` for a protocol's runs of
    ``seed``."""
    fill = {"reference_rampup_epochs": f"{REFERENCE_RAMPUP_SHARE * setup['epochs']:g}",
            "lr_times_0_3": f"{0.3 * setup['lr']:g}",
            "teacher_model": TEACHER_MODELS.get(protocol, setup["model"])}
    for need in NEEDS.values():
        fill[f"{need}_run"] = str(out_root / run_name(need, ONE_SEED.get(need, seed)))
    return fill


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


def plan_runs(variants: list[str], seeds: list[int], out_root: Path) -> list[dict[str, Any]]:
    """Every (variant, seed) run, those run once (:data:`ONE_SEED`) first: the runs needing them start sooner."""
    pairs = [(v, ONE_SEED[v]) for v in variants if v in ONE_SEED]
    pairs += [(v, seed) for seed in seeds for v in variants if v not in ONE_SEED]
    runs = []
    for v, seed in pairs:
        name = run_name(v, seed)
        needs = [run_name(NEEDS[v], ONE_SEED.get(NEEDS[v], seed))] if v in NEEDS else []
        runs.append({"name": name, "variant": v, "seed": seed, "out": out_root / name,
                     "log": out_root / f"{name}.log", "needs": needs})
    return runs


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def device_description(device: str) -> tuple[str, str]:
    """(file-name tag, description) of the device the runs use."""
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(torch.device(device))
        return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower(), name
    gpu = "" if gpu_available() else ", no GPU"
    return "cpu", f"{os.cpu_count()}-core {platform.machine()} CPU{gpu}"


def run_command(args: argparse.Namespace, setup: dict[str, Any], variant: str, seed: int, out: Path,
                device: str, threads: int, fill: dict[str, str]) -> list[str]:
    cmd = [sys.executable, str(TRAIN), "--seed", str(seed), "--device", device, "--threads", str(threads),
           "--out", str(out), "--resume", "--no-progress"]
    for key in TRAIN_KEYS:
        if setup.get(key) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(setup[key])]
    cmd += ["--augment" if setup["augment"] else "--no-augment", "--nesterov" if setup["nesterov"] else "--no-nesterov"]
    if args.data:
        cmd += ["--data", args.data]
    return cmd + [a.format(**fill) for a in VARIANTS[variant]] + args.train_args.split()


def launch_all(runs: list[dict[str, Any]], jobs: int, threads: int, total_epochs: int) -> None:
    """Run every command, ``jobs`` at a time, each once the runs it needs have finished; a progress bar counts
    finished epochs over all runs."""
    from tqdm import tqdm

    pending, active, finished = list(runs), [], set()
    # No bar when the output goes to a file (a log, a remote machine): a line per finished run instead.
    bar = tqdm(total=total_epochs, unit="epoch", desc=f"{len(runs)} runs", dynamic_ncols=True,
               disable=not sys.stderr.isatty())
    # PYTHONPATH: the runs import this checkout's kdwrap even where it is not installed (the GPU machine).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", PYTHONPATH=path)
    while pending or active:
        ready = [r for r in pending if finished.issuperset(r.get("needs", ()))]
        if not ready and not active and pending:
            raise SystemExit(f"runs {[r['name'] for r in pending]} need runs that are not scheduled")
        for r in ready[:jobs - len(active)]:
            pending.remove(r)
            r["log_file"] = open(r["log"], "a")
            r["proc"] = subprocess.Popen(r["cmd"], stdout=r["log_file"], stderr=subprocess.STDOUT, env=env)
            r["start"] = time.time()
            active.append(r)
        time.sleep(2)
        for r in list(active):
            if r["proc"].poll() is not None:
                r["log_file"].close()
                r["seconds"] = time.time() - r["start"]
                active.remove(r)
                finished.add(r["name"])
                tqdm.write(f"{r['name']}: exit {r['proc'].returncode} after {r['seconds']:.0f} s")
                if r["proc"].returncode != 0:
                    tail = "".join(Path(r["log"]).read_text().splitlines(keepends=True)[-15:])
                    for other in active:
                        other["proc"].terminate()
                    raise SystemExit(f"run {r['name']} failed (exit {r['proc'].returncode}); end of {r['log']}:\n{tail}")
        bar.n = sum(count_epochs(r["out"]) for r in runs)
        bar.refresh()
    bar.close()


def count_epochs(run_dir: Path) -> int:
    """Epochs finished by a run, from its history.json (written after every epoch)."""
    try:
        return len(json.loads((run_dir / "history.json").read_text())["epochs"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def reported_models(variant: str, fill: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(row label, history key suffix) of the models a variant's runs report: ONE gives branch 0 and ONE-E.
    ``fill``: the label's placeholders (:func:`placeholders`)."""
    label = LABELS[variant].format_map(fill or {})
    if variant.startswith("one"):
        return [(f"{label} (branch 0)", ""), (f"{label.replace('ONE', 'ONE-E', 1)}", "_ensemble")]
    return [(label, "")]


def summarise(runs: list[dict[str, Any]], variants: list[str],
              earlier: tuple[list[dict[str, Any]], ...] = (),
              fill: dict[str, str] | None = None, baseline: str = "plain") -> list[dict[str, Any]]:
    """One row per reported model, with its seeds' values (those of ``runs`` and of the ``earlier`` rows of other
    runs of the same setup, see :func:`merge_rows`) and its paired difference to plain (seeds that both have).
    ``fill``: the labels' placeholders (:func:`placeholders`)."""
    def history(r: dict[str, Any]) -> dict[str, Any] | None:
        try:
            h = json.loads((r["out"] / "history.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return h if h.get("epochs") else None

    done = {(r["variant"], r["seed"]): h for r in runs if (h := history(r))}
    rows = []
    for variant in variants:
        hists = {seed: h for (v, seed), h in sorted(done.items()) if v == variant}
        if not hists:
            continue
        for label, suffix in reported_models(variant, fill):
            key = f"test_acc{suffix}"
            rows.append({
                "reported": label, "variant": variant, "seeds": list(hists),
                "epochs_done": [len(h["epochs"]) for h in hists.values()],
                "best": [max(e[key] for e in h["epochs"]) for h in hists.values()],
                "last": [h["epochs"][-1][key] for h in hists.values()],
                "train_acc_last": [h["epochs"][-1].get("train_acc") for h in hists.values()],
                "epoch_seconds_median": statistics.median(e["seconds"] for h in hists.values() for e in h["epochs"]),
                "curves": [[e[key] for e in h["epochs"]] for h in hists.values()],
            })
    for old in earlier:
        rows = merge_rows(rows, old)
    return add_statistics(rows, baseline)


PER_SEED = ("epochs_done", "best", "last", "train_acc_last", "curves")


def merge_rows(rows: list[dict[str, Any]], earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with the seeds of ``earlier`` rows (from an earlier JSON of the same protocol) added; a seed in both
    keeps this run's values. Rows only in ``earlier`` are kept too."""
    raw = ("reported", "variant", "epoch_seconds_median", "seeds", *PER_SEED)
    merged = {r["reported"]: {k: (list(r[k]) if isinstance(r[k], list) else r[k]) for k in raw} for r in rows}
    for old in earlier:
        row = merged.setdefault(old["reported"], {k: old[k] for k in raw[:3]} | {k: [] for k in raw[3:]})
        for i, seed in enumerate(old["seeds"]):
            if seed not in row["seeds"]:
                row["seeds"].append(seed)
                for k in PER_SEED:
                    row[k].append(old[k][i])
        order = sorted(range(len(row["seeds"])), key=row["seeds"].__getitem__)
        for k in ("seeds", *PER_SEED):
            row[k] = [row[k][i] for i in order]
    return list(merged.values())


def add_statistics(rows: list[dict[str, Any]], baseline: str = "plain") -> list[dict[str, Any]]:
    """Mean ± std over seeds per row, and each row's paired difference to the ``baseline`` variant's (plain by
    default) over the seeds both have."""
    base = next((r for r in rows if r["variant"] == baseline), None)
    for row in rows:
        row["baseline"] = row is base
        for kind in ("best", "last"):
            sp = spread(row[kind])
            row[f"{kind}_mean"], row[f"{kind}_std"] = sp.mean, sp.std
            paired = [s for s in row["seeds"] if base is not None and s in base["seeds"]]
            if row is not base and paired:
                mine = [row[kind][row["seeds"].index(s)] for s in paired]
                plain = [base[kind][base["seeds"].index(s)] for s in paired]
                d = paired_difference(mine, plain)
                row[f"{kind}_diff"] = {"mean": d.mean, "low": d.low, "high": d.high, "seeds": paired,
                                       "verdict": d.verdict, "text": str(d)}
    return rows


def format_table(rows: list[dict[str, Any]], kind: str) -> str:
    """The table for ``kind`` = "best" (max over epochs) or "last" (final epoch)."""
    base = next((r["reported"] for r in rows if r.get("baseline", r["variant"] == "plain")), "plain")
    header = ["reported model", f"{kind} epoch: mean ± std", "per seed", f"vs {base} [95 % CI]", "verdict",
              "train acc (last)", "s / epoch"]
    body = []
    for r in rows:
        diff = r.get(f"{kind}_diff")
        train = [v for v in r["train_acc_last"] if v is not None]
        body.append([
            r["reported"], f"{r[f'{kind}_mean']:.2f} ± {r[f'{kind}_std']:.2f}",
            " / ".join(f"{v:.2f}" for v in r[kind]), diff["text"] if diff else "(baseline)",
            diff["verdict"] if diff else "", f"{sum(train) / len(train):.1f}" if train else "n/a",
            f"{r['epoch_seconds_median']:.1f}",
        ])
    return markdown_table(header, body)


def main() -> None:
    args = parse_args()
    setup = dict(PROTOCOLS[args.protocol])
    if args.smoke:
        setup.update(SMOKE)
        device = "cpu"
    else:
        device = args.device or ("cuda" if gpu_available() else "cpu")
    if args.epochs:
        setup["epochs"] = args.epochs
    if args.limit_train is not None:
        setup["limit_train"] = args.limit_train or None
    out_root = Path(args.out or ROOT / "runs" / f"accuracy-{args.protocol}{'-smoke' if args.smoke else ''}")
    out_root.mkdir(parents=True, exist_ok=True)

    if setup["dataset"] == "cifar10-pack" and not args.report_only:
        # Decode the pack once here: the runs then read kdwrap's cache instead of each decoding 60,000 JPEGs.
        from kdwrap.demo.data import load_cifar10_pack

        load_cifar10_pack(args.data)

    # Seed by seed: a benchmark stopped half-way still has complete pairs to compare with plain.
    runs = plan_runs(args.variants, args.seeds, out_root)
    fill = placeholders(args.protocol, setup, out_root)  # the labels' (no run folder in them)
    cores = os.cpu_count() or 1
    jobs = args.jobs or (len(runs) if device.startswith("cuda") else min(len(runs), cores))
    threads = max(1, cores // jobs)
    for r in runs:
        r["cmd"] = run_command(args, setup, r["variant"], r["seed"], r["out"], device, threads,
                               placeholders(args.protocol, setup, out_root, r["seed"]))
    tag, desc = device_description(device)
    wall = 0.0
    if not args.report_only:
        print(f"{len(runs)} runs of {setup['model']} on {setup['dataset']}, {setup['epochs']} epoch(s), {jobs} at a "
              f"time on {desc}; logs and run folders in {out_root}", flush=True)
        print("first command:", " ".join(runs[0]["cmd"]), flush=True)
        t0 = time.time()
        launch_all(runs, jobs, threads, len(runs) * setup["epochs"])
        wall = time.time() - t0

    earlier = []
    for path in args.merge:
        old = json.loads(Path(path).read_text())
        if old["meta"]["protocol"] != args.protocol or old["meta"]["setup"] != setup:
            raise SystemExit(f"--merge {path}: its protocol or setup differs from this run's; only runs of the same "
                             f"setup can share a table (it: {old['meta']['protocol']} {old['meta']['setup']})")
        earlier.append(old["results"])
    rows = summarise(runs, args.variants, tuple(earlier), fill, args.baseline)
    if not rows:
        raise SystemExit(f"no finished epoch in {out_root}")
    date = datetime.date.today().isoformat()
    subset = f", {setup['limit_train']:,}-image class-balanced training subset" if setup.get("limit_train") else ""
    what = (f"{setup['model']} on {setup['dataset']}{subset}, {setup['epochs']} epoch(s), batch {setup['batch_size']}, "
            f"SGD {'Nesterov ' if setup['nesterov'] else ''}momentum 0.9, lr {setup['lr']} {setup['schedule']}, "
            f"wd {setup['weight_decay']}, {'pad-4 crop + flip' if setup['augment'] else 'no augmentation'}, "
            f"seeds {sorted({s for r in rows if r['variant'] not in ONE_SEED for s in r['seeds']})}")
    print(f"\nTest accuracy (%), {what}; {desc}" + (f"; wall time {wall:.0f} s" if wall else ""))
    unfinished = [r["name"] for r in runs if count_epochs(r["out"]) < setup["epochs"]]
    if unfinished:
        print(f"NOT FINISHED (partial curves): {', '.join(unfinished)}")
    for kind in ("best", "last"):
        print(f"\n{kind} epoch:\n" + format_table(rows, kind))
    print("\nONE (branch 0) is the deployed model (kdwrap.export); ONE-E is the gated ensemble of all branches from "
          "the same runs. 'best' is the maximum over epochs of the test accuracy (the papers' convention), 'last' the "
          "final epoch's; ± is the standard deviation over seeds; the interval is the paired 95 % t-interval of the "
          "difference to plain over seeds (same seed: same initial weights and data order).")
    for v in args.variants:
        if v in NOTES:
            print(NOTES[v].format(teacher_seed=ONE_SEED["teacher"]))
    if setup["dataset"] == "cifar10-pack":
        print("The CIFAR-10 pack is a lossy JPEG re-encoding of CIFAR-10: absolute accuracies run below published ones.")
    if args.smoke:
        print("SMOKE RUN: 1 epoch on 512 training images, tested on 256; the accuracies are meaningless (they only "
              "show that the plumbing works).")

    meta = {"date": date, "device": desc, "protocol": args.protocol, "setup": setup, "seeds": args.seeds,
            "merged": args.merge, "variants": {v: VARIANTS[v] for v in args.variants}, "smoke": args.smoke, "jobs": jobs,
            "wall_seconds": round(wall, 1), "unfinished": unfinished,
            **({"teacher_model": fill["teacher_model"]} if "teacher" in args.variants else {}),
            "command": " ".join(["python", "benchmarks/accuracy.py", *sys.argv[1:]]),
            # relative to the repository: a record names no path of the machine it ran on
            "train_command_example": " ".join(runs[0]["cmd"][1:]).replace(f"{ROOT}{os.sep}", "")}
    stem = f"accuracy_{args.protocol}{'-' + args.name if args.name else ''}{'_smoke' if args.smoke else ''}_{tag}_{date}"
    out = RESULTS / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")
    title = (f"{what}\nmean, band: min-max over seeds; {desc}, {date}"
             + ("\nSMOKE RUN: the accuracies are meaningless" if args.smoke else ""))
    if plot_curves({r["reported"]: r["curves"] for r in rows}, out.with_suffix(".png"), title):
        print(f"wrote {out.with_suffix('.png')}")
    else:
        print("matplotlib is not installed: no PNG")


if __name__ == "__main__":
    main()
