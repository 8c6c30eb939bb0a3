"""Command line: ``python -m kdwrap demo`` / ``kdwrap demo``, ``kdwrap compare``, ``kdwrap summary MODEL``."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from .errors import KDWrapError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _split_arg(text: str) -> Any:
    return int(text) if text.lstrip("-").isdigit() else text


def build_parser() -> argparse.ArgumentParser:
    """The ``kdwrap`` argument parser (sub-commands ``demo``, ``compare`` and ``summary``)."""
    from .api import METHODS
    from .demo.data import CIFAR10_PACK_ENV
    from .methods.osakd import DEFAULT_ALPHA

    parser = argparse.ArgumentParser(
        prog="kdwrap",
        description="kdwrap: knowledge distillation (ONE, OSAKD, DML, OKDDip, BYOT, PCL online; KD from a trained "
        "teacher) as a two-line change to a training loop.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"kdwrap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train a small model plain, with ONE and with OSAKD over several seeds on real images; compare the "
        "exported models",
        description="Train one model three ways (plain, ONE with 3 branches, OSAKD) for each seed from the same "
        "initial weights, export each with kdwrap.export and report the deployed models' test accuracy: mean ± std "
        "over seeds, the paired difference to plain with its 95 % interval, and whether it is beyond noise. Unset "
        "options take per-dataset defaults. Durations below: 2-core x86_64 CPU, the trainings two at a time. The "
        "demo is kdwrap compare on the shipped pack with three methods; kdwrap compare runs every method and the "
        "free controls on your own images and model.",
    )
    demo.add_argument("--dataset", default="auto", choices=["auto", "cifar10-pack", "fashion-mnist", "digits"],
                      help="auto (default): the CIFAR-10 JPEG pack shipped with kdwrap (data/cifar10-jpeg.npz), "
                      "LeNet-5 on 10,000 images, about 4 minutes with 3 seeds; fashion-mnist: Debian's "
                      "dataset-fashion-mnist files, small_cnn on 10,000 images; digits: scikit-learn's 8x8 digits, "
                      "too small to show distillation (the fallback when the pack cannot be read)")
    demo.add_argument("--data", metavar="PATH", default=None,
                      help="CIFAR-10 pack file or Fashion-MNIST folder (default: the shipped pack, or "
                      f"${CIFAR10_PACK_ENV}"
                      "; Debian's folder for Fashion-MNIST)")
    demo.add_argument("--model", default=None,
                      help="timm model name, pretrained=False (default: lenet5 for CIFAR-10, small_cnn for grey "
                      "images); per image, a cifar_resnet20 training step takes about 30x lenet5's on a CPU")
    demo.add_argument("--epochs", type=_positive_int, default=None,
                      help="default: 20 cifar10-pack (about 12 s per epoch for all 9 trainings), "
                      "10 fashion-mnist, 20 digits")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                      help="seeds (default 0 1 2); each adds a third of the time; one seed gives no interval")
    demo.add_argument("--batch-size", type=_positive_int, default=None, help="default: 64")
    demo.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 0.02; 0.05 digits)")
    demo.add_argument("--weight-decay", type=float, default=5e-4)
    demo.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda, cuda:1, ...")
    demo.add_argument("--limit-train", type=int, default=None, metavar="N",
                      help="train on a class-balanced subset of N images (default: 10000 for cifar10-pack and "
                      "fashion-mnist, all for digits; 0 = all, about 5x the time for CIFAR-10)")
    demo.add_argument("--branches", type=_positive_int, default=3, help="ONE branches (default 3)")
    demo.add_argument("--k", type=_positive_int, default=8, help="OSAKD neighbours (default 8)")
    demo.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                      help=f"OSAKD weight of the hard-label loss (default {DEFAULT_ALPHA})")
    demo.add_argument("--bank-size", type=int, default=16384, help="OSAKD memory bank (default 16384; 0 = in-batch)")
    demo.add_argument("--methods", nargs="+", default=["plain", "one", "osakd"], type=str.lower,
                      choices=["plain", "one", "osakd"], metavar="METHOD",
                      help="which of plain, one, osakd to train (default: all three; plain, the baseline, always)")
    demo.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                      help="trainings at once, each its own process (default: one per CPU core; 1 on a GPU)")
    demo.add_argument("--threads", type=int, default=1, metavar="N",
                      help="CPU threads per training (default 1: deterministic results for a seed, and no "
                      "oversubscribed cores; 0 = torch's default)")
    demo.add_argument("--save-dir", default="kdwrap-demo", metavar="DIR",
                      help="curves.png, results.json and the first seed's exported state_dicts (default ./kdwrap-demo)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    _add_compare(sub)

    summ = sub.add_parser("summary", help="print kdwrap.summary of a timm model wrapped for a method",
                          description="Wrap an untrained timm model (or kdwrap's lenet5 / small_cnn / cifar_resnet*) "
                          "for a method and print kdwrap.summary: parameter counts while training and deployed; for "
                          "ONE and OKDDip also the split and FLOP shares.")
    summ.add_argument("model", metavar="MODEL_NAME", help="timm model name, e.g. resnet18 or cifar_resnet32")
    summ.add_argument("--method", default="one", choices=list(METHODS),
                      help=f"{', '.join(METHODS)} (default: one)")
    summ.add_argument("--split", type=_split_arg, default=None,
                      help="ONE, OKDDip: first module of the replicated tail (default: automatic)")
    summ.add_argument("--branches", type=_positive_int, default=None,
                      help="ONE, OKDDip: number of branches (default: ONE 3, OKDDip 4)")
    summ.add_argument("--peers", type=_positive_int, default=None, help="DML: number of peers (default: 2)")
    summ.add_argument("--teacher", metavar="MODEL_NAME", default=None,
                      help="KD: the teacher's timm model name, untrained (default: MODEL_NAME)")
    summ.add_argument("--num-classes", type=_positive_int, default=None, help="default: the model's own")
    summ.add_argument("--in-chans", type=_positive_int, default=None, help="default: the model's own")
    summ.add_argument("--input-size", type=_positive_int, default=None, metavar="PX",
                      help="image height = width for the summary's shape trace (default: the model's own)")
    return parser


def _add_compare(sub: Any) -> None:
    from .demo.compare import COMPARE_METHODS
    from .demo.recipes import RECIPES

    cmp = sub.add_parser(
        "compare",
        help="compare kdwrap's methods with plain training and its free controls on your images and model",
        description="Train your model plain, with label smoothing (plain-ls), with a weight average (plain-ema) and "
        "with each kdwrap method, for each seed from the same initial weights and data order; test each deployed "
        "model (kdwrap.export) and report its accuracy over seeds, the paired difference to plain and to the best "
        "control with a 95 % interval and a verdict, its step time relative to plain, peak memory and parameters. "
        "Results, report.md, curves.png and each deployed state_dict go under --out; a second call with the same "
        "--out resumes (finished trainings are kept, new seeds or methods are added).")
    cmp.add_argument("--data", metavar="PATH", default=None,
                     help="a folder with train/ and val/ subfolders, one subfolder per class in each (torchvision's "
                     "ImageFolder layout); or a CIFAR-10 pack (.npz) or Fashion-MNIST folder (default: the CIFAR-10 "
                     "pack shipped with kdwrap)")
    cmp.add_argument("--model", default=None,
                     help="a timm or torchvision model name (untrained, classes from the data) or "
                     "package.module:callable taking num_classes= (default: lenet5 on the CIFAR-10 pack; needed for "
                     "an image folder)")
    cmp.add_argument("--img-size", type=_positive_int, default=None, metavar="PX",
                     help="resize every image of the folder to PX x PX (needed when its images differ in size)")
    cmp.add_argument("--epochs", type=_positive_int, default=None, help="default: 20")
    cmp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                     help="seeds (default 0 1 2); one seed gives no interval")
    cmp.add_argument("--out", default="kdwrap-compare", metavar="DIR",
                     help="where the results go and where a second call resumes from (default ./kdwrap-compare)")
    cmp.add_argument("--methods", nargs="+", default=None, type=str.lower, metavar="METHOD",
                     help=f"any of {', '.join(RECIPES)} (default: {' '.join(COMPARE_METHODS)}; kd too with "
                     "--teacher); plain, the baseline, always")
    cmp.add_argument("--option", action="append", default=[], metavar="METHOD.NAME=VALUE",
                     help="an option of one method, repeatable: one.branches=2, osakd.k=16, dml.peers=3, "
                     "plain-ema.decay=0.99, kd.temperature=2 (the method's own names; see docs/methods.md)")
    cmp.add_argument("--teacher", metavar="CHECKPOINT", default=None,
                     help="a trained teacher's state_dict for kd (e.g. a state_dict a comparison saved); adds kd")
    cmp.add_argument("--teacher-model", metavar="NAME", default=None,
                     help="the teacher's architecture, as --model names it (default: --model)")
    cmp.add_argument("--batch-size", type=_positive_int, default=None, help="default: 64")
    cmp.add_argument("--lr", type=float, default=None,
                     help="peak learning rate, cosine schedule (default: 0.02; 0.05 for an image folder)")
    cmp.add_argument("--weight-decay", type=float, default=5e-4)
    cmp.add_argument("--limit-train", type=int, default=None, metavar="N",
                     help="train on a class-balanced subset of N images (default: 10000 for the CIFAR-10 pack and "
                     "Fashion-MNIST, all of an image folder; 0 = all)")
    cmp.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                     help="pad-4 random crop and flip (default: on for an image folder, off for the CIFAR-10 pack)")
    cmp.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda, cuda:1, ...")
    cmp.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                     help="bfloat16 autocast and channels_last (default: on a GPU)")
    cmp.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                     help="trainings at once, each its own process on a CPU (default: one per CPU core; 1 on a GPU)")
    cmp.add_argument("--threads", type=int, default=1, metavar="N",
                     help="CPU threads per training (default 1; 0 = torch's default)")
    cmp.add_argument("--no-progress", action="store_true", help="no progress bar")


# The summary options each method reads; one given to another method is an error, not silently ignored.
_SUMMARY_OPTIONS = {"split": ("one", "okddip", "pcl"), "branches": ("one", "okddip", "pcl"), "peers": ("dml",), "teacher": ("kd",)}


def _summary(args: argparse.Namespace) -> int:
    import timm

    from . import api
    from . import models as _models  # noqa: F401  (registers kdwrap's models with timm)

    if not timm.is_model(args.model):
        print(f"kdwrap summary: unknown model {args.model!r}; see timm.list_models() or use one of "
              f"{', '.join(_models.TIMM_MODELS)}", file=sys.stderr)
        return 2
    options = {name: getattr(args, name) for name in _SUMMARY_OPTIONS if getattr(args, name) is not None}
    foreign = [name for name in options if args.method not in _SUMMARY_OPTIONS[name]]
    if foreign:
        print(f"kdwrap summary: --method {args.method} reads no " + ", ".join(
            f"--{name} (a {'/'.join(_SUMMARY_OPTIONS[name])} option)" for name in foreign), file=sys.stderr)
        return 2

    kw = {k: v for k, v in (("num_classes", args.num_classes), ("in_chans", args.in_chans)) if v is not None}

    def create(name: str) -> Any:
        net = timm.create_model(name, pretrained=False, **kw)
        cfg = getattr(net, "pretrained_cfg", None)
        if isinstance(cfg, dict) and (args.input_size or args.in_chans):
            c, h, w = cfg.get("input_size", (3, 224, 224))
            c = args.in_chans or c
            h = w = args.input_size or h
            net.pretrained_cfg = {**cfg, "input_size": (c, h, w)}
        return net

    if args.method == "kd":
        options["teacher"] = create(options.get("teacher", args.model))
    model, _ = api.wrap(create(args.model), method=args.method, **options)
    print(api.summary(model))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    run_demo(
        dataset=args.dataset, data=args.data, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, device=args.device, seeds=args.seeds,
        limit_train=args.limit_train, branches=args.branches, k=args.k, alpha=args.alpha,
        bank_size=args.bank_size, save_dir=args.save_dir, jobs=args.jobs, threads=args.threads,
        progress=not args.no_progress,
        methods=args.methods,
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .demo.compare import run_compare

    run_compare(
        data=args.data, model=args.model, img_size=args.img_size, epochs=args.epochs, seeds=args.seeds, out=args.out,
        methods=args.methods, options=args.option, teacher=args.teacher, teacher_model=args.teacher_model,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, limit_train=args.limit_train,
        augment=args.augment, device=args.device, amp=args.amp, jobs=args.jobs, threads=args.threads,
        progress=not args.no_progress,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m kdwrap`` and the ``kdwrap`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return {"demo": _demo, "compare": _compare, "summary": _summary}[args.command](args)
    except (KDWrapError, ValueError, FileNotFoundError, ImportError) as e:
        if os.environ.get("KDWRAP_DEBUG"):
            raise
        print(f"kdwrap {args.command}: error: {e}\n(set KDWRAP_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
