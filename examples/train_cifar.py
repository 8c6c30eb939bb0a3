"""Train an image classifier plain or with kdwrap (ONE, OSAKD, DML, OKDDip, BYOT; KD from a teacher run), with the ONE
paper's CIFAR protocol as defaults.

Defaults: CIFAR ResNet-32, batch 128, SGD (Nesterov, momentum 0.9), learning rate 0.1 with cosine decay (per step),
weight decay 5e-4, pad-4 random crop + horizontal flip, 300 epochs. Data is held on the device as uint8 tensors and
augmented there, so a GPU never waits for a data loader.

    # CIFAR-10 from the JPEG pack the repository ships (data/cifar10-jpeg.npz), 30 epochs of ONE with 3 branches
    python examples/train_cifar.py --method one --epochs 30 --out runs/one
    # OSAKD; --resume continues from runs/osakd/last.pt after an interruption
    python examples/train_cifar.py --method osakd --out runs/osakd --resume
    # DML with 2 peers (peer 0 is deployed)
    python examples/train_cifar.py --method dml --peers 2 --epochs 30 --out runs/dml
    # OKDDip (3 peers + the group leader, deployed) and BYOT (exits at the stage ends)
    python examples/train_cifar.py --method okddip --epochs 30 --out runs/okddip
    python examples/train_cifar.py --method byot --epochs 30 --out runs/byot
    # KD: first a plain teacher, then a student distilled from it (the teacher's model comes from its run)
    python examples/train_cifar.py --method plain --model cifar_resnet56 --epochs 30 --out runs/teacher
    python examples/train_cifar.py --method kd --teacher runs/teacher --model cifar_resnet20 --epochs 30 --out runs/kd
    # CIFAR-100 through torchvision (downloads into --data, default ./data; needs network access)
    python examples/train_cifar.py --dataset torchvision-cifar100 --method one --out runs/c100-one
    # a quick check on a CPU
    python examples/train_cifar.py --method one --epochs 1 \\
        --limit-train 512 --limit-test 256 --device cpu --out runs/kd-check

Written to --out: last.pt (the full checkpoint, every epoch), history.json (per-epoch test accuracy of the deployed
branch or peer and, for ONE, of the ensemble ONE-E; for DML, of every peer), and at the end deployed.pt: the
state_dict of kdwrap.export(model), which loads into the plain architecture (timm.create_model(name,
num_classes=...) or kdwrap.models.*). A KD run's checkpoint holds the student only: resuming it loads the teacher
from --teacher again.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import kdwrap
from kdwrap.controls import WeightAverage, label_smoothing_loss
import kdwrap.models  # noqa: F401  (registers cifar_resnet20/32/44/56/110 and small_cnn with timm)
from kdwrap.methods.osakd import DEFAULT_ALPHA as OSAKD_DEFAULT_ALPHA
from kdwrap.demo.data import Dataset, channel_stats, load_cifar10_pack, load_fashion_mnist, normalize, random_crop_flip

DATASETS = ("cifar10-pack", "torchvision-cifar10", "torchvision-cifar100", "fashion-mnist")

# The settings a checkpoint must share with the command that resumes it (the others, such as --device or
# --no-progress, may change between runs).
RUN_KEYS = (
    "method", "dataset", "model", "epochs", "batch_size", "lr", "weight_decay", "augment", "seed", "limit_train",
    "limit_test", "branches", "split", "branch_init", "temperature", "rampup_epochs", "k", "alpha", "bank_size",
    "knn_backend", "distill", "schedule", "nesterov", "peers", "teacher", "holdout", "label_smoothing", "ema_decay",
)
# Settings added after runs were recorded, with the value those runs used: their checkpoints lack the key and still
# resume.
LATER_KEYS = {"peers": 2, "teacher": None, "holdout": None, "label_smoothing": 0.0, "ema_decay": None}
# --temperature's default, each method's own (kdwrap's). Methods without a temperature record ONE's 3, the default
# of every run before the default depended on the method, so that their checkpoints still resume.
TEMPERATURES = {"one": 3.0, "kd": 4.0, "dml": 1.0, "okddip": 3.0, "byot": 3.0, "pcl": 3.0}
# --alpha's default, likewise: OSAKD's, KD's and BYOT's own; the other methods record 0.9, every earlier run's default.
ALPHAS = {"osakd": OSAKD_DEFAULT_ALPHA, "kd": 0.9, "byot": 0.1}
# --branches' default: OKDDip's 4 (3 peers and the leader); the other methods record ONE's 3, every earlier run's.
BRANCHES = {"okddip": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10-pack", choices=DATASETS,
                   help="cifar10-pack (default): the CIFAR-10 JPEG pack (--data, default the repository's "
                   "data/cifar10-jpeg.npz or $KDWRAP_CIFAR10_PACK); torchvision-cifar10/100: "
                   "torchvision's download into --data (default ./data); fashion-mnist: the official idx files in "
                   "--data (default /usr/share/datasets/fashion-mnist)")
    g.add_argument("--data", metavar="PATH", default=None,
                   help="the pack file (cifar10-pack) or the dataset folder (other datasets)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="pad-4 random crop + horizontal flip (default: on for CIFAR, off for Fashion-MNIST)")
    g.add_argument("--limit-train", type=int, default=None, metavar="N",
                   help="train on a seeded class-stratified subset of N images (quick runs)")
    g.add_argument("--limit-test", type=int, default=None, metavar="N", help="test on a seeded subset of N images")
    g.add_argument("--holdout", type=int, default=None, metavar="N",
                   help="validation run: hold out a class-stratified N of the training images (the same N for every "
                   "seed) and evaluate on them instead of the test set, which is then never read (for choosing "
                   "settings such as --lr); history.json's test_acc is then the validation accuracy")

    g = p.add_argument_group("model and method")
    g.add_argument("--method", default="plain", choices=list(WRAPPERS),
                   help="plain (default), one, osakd, dml, okddip, byot, pcl (online); kd (from a trained --teacher)")
    g.add_argument("--model", default=None,
                   help="any timm model name (built with pretrained=False) or cifar_resnet20/32/44/56/110, "
                   "small_cnn (default: cifar_resnet32; small_cnn for fashion-mnist)")
    g.add_argument("--branches", type=int, default=None,
                   help="ONE, OKDDip, PCL: number of branches (default: ONE, PCL 3; OKDDip 4, the last is the group "
                   "leader)")
    g.add_argument("--split", default=None,
                   help="ONE, OKDDip, PCL: first module of the replicated tail (default: automatic)")
    g.add_argument("--branch-init", default="reinit", choices=["reinit", "copy"],
                   help="ONE, OKDDip, PCL: branches 1..m-1 re-initialised (default, as the reference code) or "
                   "copies of branch 0")
    g.add_argument("--temperature", type=float, default=None,
                   help="ONE, KD, DML, OKDDip, BYOT, PCL: distillation temperature (default: the method's; ONE, "
                   "OKDDip, BYOT, PCL 3, KD 4, DML 1)")
    g.add_argument("--rampup-epochs", type=float, default=0.0,
                   help="ONE, OKDDip, PCL: epochs of the sigmoid ramp-up of the KL weight (the papers: 80 of 300; "
                   "default 0 = off)")
    g.add_argument("--k", type=int, default=8, help="OSAKD: neighbours per soft label (default 8)")
    g.add_argument("--alpha", type=float, default=None,
                   help="OSAKD: weight of cross-entropy; KD, BYOT: weight of the distillation term (each method's own "
                   f"convention, as in kdwrap; see docs/methods.md) (default: OSAKD {OSAKD_DEFAULT_ALPHA}, KD 0.9, "
                   "BYOT 0.1)")
    g.add_argument("--bank-size", type=int, default=16384, help="OSAKD: memory bank entries (default 16384)")
    g.add_argument("--distill", default="mse", choices=["mse", "kl"],
                   help="OSAKD: distance of the output to its soft label (default mse, the paper's)")
    g.add_argument("--knn-backend", default="auto", choices=["auto", "torch", "faiss"], help="OSAKD: k-NN backend")
    g.add_argument("--label-smoothing", type=float, default=0.0, metavar="EPS",
                   help="plain: cross-entropy with label smoothing EPS (the free control; 0.1 is usual)")
    g.add_argument("--ema-decay", type=float, default=None, metavar="D",
                   help="plain: keep an exponential moving average of the weights (PCL's temporal-mean rule; PCL's "
                        "decay is 0.999), evaluate and deploy it; the live weights' accuracy is logged beside it")
    g.add_argument("--peers", type=int, default=2, help="DML: number of peers (default 2); peer 0 is deployed")
    g.add_argument("--teacher", metavar="RUN", default=None,
                   help="KD: the --out folder (or its last.pt) of a finished train_cifar.py --method plain run; "
                   "its model and weights are loaded and frozen")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=300, help="default 300, as in the ONE paper")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default 0.1)")
    g.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                   help="cosine: decayed to 0 per step (default); constant: the OSAKD paper's fixed rate")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True,
                   help="Nesterov momentum (default on; the OSAKD paper uses plain momentum 0.9)")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, metavar="DIR", help="checkpoints, history.json and deployed.pt go here")
    g.add_argument("--resume", action="store_true", help="continue from DIR/last.pt (start fresh if there is none)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="autocast dtype (default: bf16 on CUDA, none on CPU)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convolutions on GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    g.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="with --compile: torch.compile's mode (reduce-overhead: CUDA graphs, about 3x faster steps "
                   "of a CIFAR ResNet on a GPU, where eager steps wait on kernel launches)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    args = p.parse_args(argv)

    if args.model is None:
        args.model = "small_cnn" if args.dataset == "fashion-mnist" else "cifar_resnet32"
    if args.augment is None:
        args.augment = args.dataset != "fashion-mnist"
    if args.temperature is None:
        args.temperature = TEMPERATURES.get(args.method, TEMPERATURES["one"])
    if args.alpha is None:
        args.alpha = ALPHAS.get(args.method, 0.9)
    if args.branches is None:
        args.branches = BRANCHES.get(args.method, 3)
    for name in ("epochs", "batch_size", "branches", "k"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.peers < 2:
        p.error(f"--peers {args.peers}: mutual learning needs at least 2 peers (the paper's default is 2)")
    if args.method == "kd" and args.teacher is None:
        p.error("--method kd needs --teacher RUN: the --out folder of a finished plain run, e.g. of "
                "train_cifar.py --method plain --model cifar_resnet56 --out runs/teacher")
    if args.method != "plain" and (args.label_smoothing or args.ema_decay is not None):
        p.error(f"--label-smoothing and --ema-decay are the free controls of plain training (this run is --method "
                f"{args.method}): drop them, or use --method plain")
    if args.method != "kd" and args.teacher is not None:
        p.error(f"--teacher is read by --method kd only (this run is --method {args.method}): drop it or use kd")
    return args


# --- data ---------------------------------------------------------------------------------------------------------

def load_data(args: argparse.Namespace) -> Dataset:
    """The whole dataset as uint8 ``N x C x H x W`` images and int64 labels, on the CPU."""
    if args.dataset == "cifar10-pack":
        ds = load_cifar10_pack(args.data)
    elif args.dataset.startswith("torchvision-"):
        import torchvision

        cls = torchvision.datasets.CIFAR10 if args.dataset.endswith("cifar10") else torchvision.datasets.CIFAR100
        root = args.data or "./data"
        train, test = (cls(root, train=t, download=True) for t in (True, False))
        ds = Dataset(
            torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(train.targets),
            torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(test.targets),
            tuple(train.classes),
        )
    else:
        ds = load_fashion_mnist(args.data) if args.data else load_fashion_mnist()
        # The idx files are uint8; back to uint8 so every dataset takes a quarter of the float32 memory on the device.
        ds = ds._replace(x_train=(ds.x_train * 255).round().to(torch.uint8),
                         x_test=(ds.x_test * 255).round().to(torch.uint8))
    if args.holdout:
        # Seed 0 for every run: runs compared on the validation split are validated on the same images.
        ds = ds.holdout(args.holdout, seed=0)
    ds = ds.subset_train(args.limit_train, seed=args.seed)
    if args.limit_test is not None and args.limit_test < len(ds.y_test):
        # Seed 0 for every run, so runs with different seeds are tested on the same images.
        keep = torch.randperm(len(ds.y_test), generator=torch.Generator().manual_seed(0))[: args.limit_test]
        ds = ds._replace(x_test=ds.x_test[keep], y_test=ds.y_test[keep])
    return ds


# --- model ----------------------------------------------------------------------------------------------------------

def load_teacher(run: str, in_chans: int, num_classes: int) -> nn.Module:
    """The trained network of a finished plain run of this script (its --out folder or its last.pt), for KD.

    The checkpoint names the model (``model_args``), so a teacher of any architecture loads without repeating it.
    """
    import timm

    path = Path(run)
    ckpt_path = path / "last.pt" if path.is_dir() else path
    fix = "pass the --out folder (or last.pt) of a finished train_cifar.py --method plain run"
    if not ckpt_path.is_file():
        raise SystemExit(f"--teacher {run}: {ckpt_path} does not exist; {fix}")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model_args" not in ckpt:
        # deployed.pt holds the weights but not the model's name.
        raise SystemExit(f"--teacher {run}: {ckpt_path} is not a full train_cifar.py checkpoint (last.pt); {fix}")
    cfg, margs = ckpt["config"], ckpt["model_args"]
    if cfg["method"] != "plain":
        raise SystemExit(f"--teacher {run}: a --method {cfg['method']} run; KD's teacher is a plain run: train one "
                         f"with --method plain --model {margs['model']} --out DIR and pass --teacher DIR")
    if ckpt["epoch"] < cfg["epochs"]:
        raise SystemExit(f"--teacher {run}: the run stopped after epoch {ckpt['epoch']} of {cfg['epochs']}; finish "
                         "it first (run its command again with --resume)")
    for key, mine in (("num_classes", num_classes), ("in_chans", in_chans)):
        if margs[key] != mine:
            raise SystemExit(f"--teacher {run}: the teacher has {key}={margs[key]} but this dataset {mine}; train the "
                             f"teacher on this run's dataset (it was trained on {cfg['dataset']})")
    teacher = timm.create_model(margs["model"], pretrained=False, in_chans=in_chans, num_classes=num_classes)
    teacher.load_state_dict(ckpt["model"])
    acc = ckpt["history"].get("last_test_acc")
    print(f"teacher: {margs['model']} from {ckpt_path}, {cfg['epochs']} epoch(s) on {cfg['dataset']}"
          + (f", its last test acc {acc:.2f} %" if acc is not None else ""))
    return teacher


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Wrapped = tuple[nn.Module, Loss]
Size = tuple[int, int, int]


def _plain(args: argparse.Namespace, net: nn.Module, input_size: Size, num_classes: int) -> Wrapped:
    return net, label_smoothing_loss(args.label_smoothing)


def _one(args: argparse.Namespace, net: nn.Module, input_size: Size, num_classes: int) -> Wrapped:
    # input_size: kdwrap traces the model at the dataset's image size, not at the size timm's config names.
    return kdwrap.one(net, branches=args.branches, split=args.split, temperature=args.temperature,
                      rampup_steps=args.rampup_steps, input_size=input_size,
                      reinit_branches=args.branch_init == "reinit")


def _osakd(args: argparse.Namespace, net: nn.Module, input_size: Size, num_classes: int) -> Wrapped:
    return kdwrap.osakd(net, k=args.k, alpha=args.alpha, bank_size=args.bank_size, backend=args.knn_backend,
                        distill=args.distill)


def _kd(args: argparse.Namespace, net: nn.Module, input_size: Size, num_classes: int) -> Wrapped:
    # Rebuilt from --teacher on every start: the teacher is outside the wrapper's state_dict, so a resumed run
    # finds it there again. deploy.py passes a stand-in as teacher_net: the deployed student never runs the teacher.
    teacher = getattr(args, "teacher_net", None)
    if teacher is None:
        teacher = load_teacher(args.teacher, input_size[0], num_classes)
    return kdwrap.kd(net, teacher, temperature=args.temperature, alpha=args.alpha)


def _dml(args: argparse.Namespace, net: nn.Module, input_size: Size, num_classes: int) -> Wrapped:
    return kdwrap.dml(net, peers=args.peers, temperature=args.temperature)


def _okddip(args: argparse.Namespace, net: nn.Module, input_size: Size, num_classes: int) -> Wrapped:
    return kdwrap.okddip(net, branches=args.branches, split=args.split, temperature=args.temperature,
                         rampup_steps=args.rampup_steps, input_size=input_size,
                         reinit_branches=args.branch_init == "reinit")


def _pcl(args: argparse.Namespace, net: nn.Module, input_size: Size, num_classes: int) -> Wrapped:
    # With --augment, kdwrap gives each peer its own crop and flip (the paper's protocol) and the loop none.
    return kdwrap.pcl(net, branches=args.branches, split=args.split, temperature=args.temperature,
                      rampup_steps=args.rampup_steps, input_size=input_size,
                      reinit_branches=args.branch_init == "reinit", augment="crop_flip" if args.augment else None)


def _byot(args: argparse.Namespace, net: nn.Module, input_size: Size, num_classes: int) -> Wrapped:
    return kdwrap.byot(net, alpha=args.alpha, temperature=args.temperature, input_size=input_size)


# --method -> the model and loss it trains: a new method is one entry here (and its options in parse_args).
WRAPPERS: dict[str, Callable[[argparse.Namespace, nn.Module, Size, int], Wrapped]] = {
    "plain": _plain, "one": _one, "osakd": _osakd, "dml": _dml, "kd": _kd, "okddip": _okddip, "byot": _byot,
    "pcl": _pcl,
}


def build_model(
    args: argparse.Namespace, in_chans: int, num_classes: int, input_size: tuple[int, int, int]
) -> tuple[nn.Module, nn.Module, Loss]:
    """``(net, model, loss_fn)``: the plain network, the model to train and its loss (``model is net`` for plain)."""
    import timm

    if not timm.is_model(args.model):
        raise SystemExit(f"unknown model {args.model!r}: use a timm model name or cifar_resnet20/32/44/56/110")
    net = timm.create_model(args.model, pretrained=False, in_chans=in_chans, num_classes=num_classes)
    model, loss_fn = WRAPPERS[args.method](args, net, input_size, num_classes)
    return net, model, loss_fn


def export_model(args: argparse.Namespace, model: nn.Module) -> nn.Module:
    """The deployable network: the original architecture (for plain training, the model itself)."""
    return model if args.method == "plain" else kdwrap.export(model)


# --- evaluation ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, prep: Callable[[torch.Tensor], torch.Tensor],
    autocast: Callable[[], Any], ensemble: bool = False, batch_size: int = 1000,
) -> tuple[float, float | None]:
    """Test accuracy (%) of ``model(x)`` (for ONE: the deployed branch) and, if ``ensemble``, of ONE-E."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=y.device)
    correct_e = torch.zeros_like(correct)
    for i in range(0, len(y), batch_size):
        xb, yb = prep(x[i:i + batch_size]), y[i:i + batch_size]
        with autocast():
            correct += (model(xb).argmax(1) == yb).sum()
            if ensemble:
                correct_e += (model.forward_ensemble(xb).argmax(1) == yb).sum()
    n = max(1, len(y))
    return 100.0 * correct.item() / n, (100.0 * correct_e.item() / n if ensemble else None)


# --- checkpoints ----------------------------------------------------------------------------------------------------

def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file, then rename: an interrupted save never leaves a truncated checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".json":
        tmp.write_text(json.dumps(obj, indent=1))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_states(device: torch.device) -> dict[str, Any]:
    # Data order and augmentation use generators seeded per epoch; these cover the rest (dropout, drop-path).
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    # .cpu(): the checkpoint was loaded onto the training device, but RNG states are always CPU byte tensors.
    torch.set_rng_state(states["torch"].cpu())
    random.setstate(states["python"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)


# --- training -------------------------------------------------------------------------------------------------------

def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the training described by ``args``; returns the history written to history.json."""
    from tqdm.auto import tqdm

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels once
    out = Path(args.out)
    ckpt_path = out / "last.pt"
    if ckpt_path.exists() and not args.resume:
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")

    ds = load_data(args)
    in_chans, num_classes, input_size = ds.input_size[0], ds.num_classes, ds.input_size
    # On the device once: a host-to-device copy inside the loop would stall the GPU pipeline at every step.
    mean, std = (t.to(device) for t in channel_stats(ds.x_train))
    x_train, y_train = ds.x_train.to(device), ds.y_train.to(device)
    x_test, y_test = ds.x_test.to(device), ds.y_test.to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    def prep(xb: torch.Tensor) -> torch.Tensor:
        return normalize(xb, mean, std).contiguous(memory_format=memory_format)

    steps_per_epoch = len(y_train) // args.batch_size  # drop_last: ONE's gate needs batches of >= 2 samples
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(y_train)} training images are fewer than one batch of {args.batch_size}")
    args.rampup_steps = round(args.rampup_epochs * steps_per_epoch)

    torch.manual_seed(args.seed)  # same initial weights for every method with the same seed
    net, model, loss_fn = build_model(args, in_chans, num_classes, input_size)
    out.mkdir(parents=True, exist_ok=True)  # after the checks of the model and the teacher: no empty folder on error
    model.to(device, memory_format=memory_format)
    loss_fn.to(device)
    # The weight-averaging control: evaluated and deployed in place of the live weights.
    average = WeightAverage(model, args.ema_decay).to(device) if args.ema_decay is not None else None
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=args.nesterov,
                                weight_decay=args.weight_decay)
    if args.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    else:
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    # dynamic=False: batches all have one shape (drop_last), so one graph serves the whole run. Evaluation uses the
    # eager model: it shares the parameters, and eval-mode graphs would cost another compilation.
    train_model = torch.compile(model, dynamic=False, mode=args.compile_mode) if args.compile else model
    # A CUDA-graph replay overwrites the previous step's outputs: each step starts a new generation explicitly.
    cudagraphs = args.compile and device.type == "cuda" and args.compile_mode != "default"

    config = {key: getattr(args, key) for key in RUN_KEYS}
    history: dict[str, Any] = {"config": config, "epochs": [],
                               "evaluated_on": f"validation ({args.holdout} held-out training images)"
                               if args.holdout else "test"}
    start_epoch = 0
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        saved = {**LATER_KEYS, **ckpt["config"]}
        changed = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
        if changed:
            raise SystemExit(f"--resume: settings differ from the checkpoint's (checkpoint, now): {changed}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        loss_fn.load_state_dict(ckpt["loss_fn"])
        if average is not None:
            average.load_state_dict(ckpt["average"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_states(ckpt["rng"], device)
        history, start_epoch = ckpt["history"], ckpt["epoch"]
        print(f"resumed from {ckpt_path} after epoch {start_epoch}")
    elif args.resume:
        print(f"--resume: no checkpoint in {out}, starting from scratch")

    n_params = sum(p.numel() for p in export_model(args, model).parameters())
    print(f"{args.method} {args.model} on {args.dataset}: {len(y_train):,} train / {len(y_test):,} test images "
          f"{'x'.join(map(str, input_size))}, {num_classes} classes; deployed model {n_params:,} parameters; "
          f"{args.epochs} epoch(s) x {steps_per_epoch} steps of {args.batch_size}; device {device}, amp {amp}")
    if args.method != "plain" and start_epoch == 0:
        print(kdwrap.summary(model))

    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        model.train()
        # Generators seeded by (seed, epoch): a resumed run sees the same data order and crops as an uninterrupted one.
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
        order = order.to(device)
        aug_gen = torch.Generator(device=device).manual_seed(args.seed * 100003 + epoch + 7919)
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        # Training accuracy of the deployed branch on the batches as trained (augmented, weights moving), the way
        # timm and pycls report it: free, and enough to tell a network that fits its training set from one that
        # underfits.
        correct = torch.zeros((), dtype=torch.long, device=device)
        part_sums: dict[str, torch.Tensor] = {}  # the loss's scalar parts, summed on the device over the epoch
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, unit="step",
                   disable=args.no_progress, dynamic_ncols=True)
        for step in bar:
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            xb, yb = prep(x_train[idx]), y_train[idx]
            if args.augment and args.method != "pcl":  # PCL crops and flips per peer itself
                # Padding after normalisation pads with the mean colour, as torchvision's RandomCrop on tensors.
                xb = random_crop_flip(xb, padding=4, generator=aug_gen).contiguous(memory_format=memory_format)
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast():
                logits = train_model(xb)
                loss = loss_fn(logits, yb)  # kdwrap: the only changed line of the loop
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            if average is not None:
                average.update()
            loss_sum += loss.detach()
            for name, value in getattr(loss_fn, "parts", {}).items():
                value = torch.as_tensor(value, dtype=torch.float32, device=device)
                if value.dim() == 0 and name != "loss":
                    part_sums[name] = part_sums.get(name, 0.0) + value
            correct += (logits.detach().argmax(1) == yb).sum()
            if not args.no_progress and (step % 50 == 0 or step == steps_per_epoch - 1):
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()

        acc, acc_e = evaluate(average if average is not None else model, x_test, y_test, prep, autocast,
                              ensemble=args.method == "one")
        train_loss = loss_sum.item() / steps_per_epoch
        if not math.isfinite(train_loss):
            raise SystemExit(f"epoch {epoch + 1}: the training loss is {train_loss}; lower --lr or use --amp bf16")
        train_acc = 100.0 * correct.item() / (steps_per_epoch * args.batch_size)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "test_acc": acc,
               "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0}
        if acc_e is not None:
            row["test_acc_ensemble"] = acc_e
        if part_sums:  # e.g. OSAKD's soft-label diagnostics: how far its soft labels are from the hard ones
            row["parts"] = {name: total.item() / steps_per_epoch for name, total in part_sums.items()}
        if average is not None:  # test_acc is the deployed average; this, the live weights
            row["test_acc_live"] = evaluate(model, x_test, y_test, prep, autocast)[0]
        if args.method == "dml":
            # Every peer's: which peer ends best is not known in advance, and export(model, peer=i) deploys any.
            row["test_acc_peers"] = [acc] + [evaluate(p, x_test, y_test, prep, autocast)[0] for p in model.peers[1:]]
        if args.method == "pcl":  # test_acc is the deployed temporal mean of peer 0; this, peer 0 itself
            live = kdwrap.export(model, mean=False).eval()
            row["test_acc_live_peer"] = evaluate(live, x_test, y_test, prep, autocast)[0]
        history["epochs"].append(row)
        print(f"epoch {epoch + 1:>3}/{args.epochs}  loss {train_loss:.4f}  train acc {train_acc:6.2f} %  "
              f"{'val' if args.holdout else 'test'} acc {acc:6.2f} %"
              + (f"  ONE-E {acc_e:6.2f} %" if acc_e is not None else "")
              + (f"  peers {' / '.join(f'{a:.2f}' for a in row['test_acc_peers'])} %" if "test_acc_peers" in row
                 else "")
              + f"  lr {row['lr']:.4f}  {row['seconds']:.1f} s", flush=True)

        summarise(history)
        atomic_save({
            "epoch": epoch + 1, "config": config, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "loss_fn": loss_fn.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_states(device),
            "average": average.state_dict() if average is not None else None,
            "history": history, "model_args": {"model": args.model, "in_chans": in_chans,
                                               "num_classes": num_classes, "input_size": list(input_size)},
        }, ckpt_path)
        atomic_save(history, out / "history.json")

    # Deploy: the original architecture, the size of the plain model. Its accuracy equals the last "test acc".
    deployed = average.export() if average is not None else export_model(args, model)
    torch.save(deployed.state_dict(), out / "deployed.pt")
    history["deployed_test_acc"], _ = evaluate(deployed, x_test, y_test, prep, autocast)
    history["deployed"] = {"file": "deployed.pt", "model": args.model, "in_chans": in_chans,
                           "num_classes": num_classes, "parameters": n_params}
    summarise(history)
    atomic_save(history, out / "history.json")
    line = (f"done: last test acc {history['last_test_acc']:.2f} %, best {history['best_test_acc']:.2f} % "
            f"(epoch {history['best_epoch']})")
    if "last_test_acc_ensemble" in history:
        line += (f"; ONE-E last {history['last_test_acc_ensemble']:.2f} %, "
                 f"best {history['best_test_acc_ensemble']:.2f} %")
    print(line + f"; exported model {history['deployed_test_acc']:.2f} %; saved {out / 'deployed.pt'}")
    return history


def summarise(history: dict[str, Any]) -> None:
    """Add best / last accuracies (deployed model and, for ONE, ensemble; for DML, every peer's) to ``history``."""
    rows = history["epochs"]
    best = max(rows, key=lambda r: r["test_acc"])
    history.update(last_test_acc=rows[-1]["test_acc"], best_test_acc=best["test_acc"], best_epoch=best["epoch"],
                   last_train_acc=rows[-1].get("train_acc"))
    if "test_acc_ensemble" in rows[-1]:
        history.update(last_test_acc_ensemble=rows[-1]["test_acc_ensemble"],
                       best_test_acc_ensemble=max(r["test_acc_ensemble"] for r in rows))
    if "test_acc_peers" in rows[-1]:
        history.update(last_test_acc_peers=rows[-1]["test_acc_peers"],
                       best_test_acc_peers=[max(acc) for acc in zip(*(r["test_acc_peers"] for r in rows))])


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
