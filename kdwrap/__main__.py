"""Command line: ``python -m kdwrap demo`` / ``kdwrap demo``, ``kdwrap summary MODEL``."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _split_arg(text: str) -> Any:
    return int(text) if text.lstrip("-").isdigit() else text


def build_parser() -> argparse.ArgumentParser:
    """The ``kdwrap`` argument parser (sub-commands ``demo`` and ``summary``)."""
    from .data import CIFAR10_PACK_DEFAULT

    parser = argparse.ArgumentParser(
        prog="kdwrap",
        description="kdwrap: online knowledge distillation (ONE, OSAKD) as a two-line change to a training loop.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train a small model plain, with ONE and with OSAKD on an offline dataset; compare the exported models",
        description="Train one model three ways (plain, ONE with 3 branches, OSAKD) from the same initial weights, "
        "export each with kdwrap.export and report the deployed models' test accuracy, size and training time. "
        "Unset options take per-dataset defaults chosen to finish in a few minutes on a 2-core CPU.",
    )
    demo.add_argument("--dataset", default="auto", choices=["auto", "digits", "fashion-mnist", "cifar10-pack"],
                      help="auto (default): Fashion-MNIST if Debian's dataset-fashion-mnist files are installed, "
                      "else scikit-learn's digits (no download)")
    demo.add_argument("--data", metavar="PATH", default=None,
                      help="Fashion-MNIST folder or CIFAR-10 pack file "
                      f"(default for cifar10-pack: {CIFAR10_PACK_DEFAULT})")
    demo.add_argument("--model", default=None,
                      help="timm model name, pretrained=False (default: small_cnn for grey images, cifar_resnet20 "
                      "for CIFAR-10)")
    demo.add_argument("--epochs", type=_positive_int, default=None,
                      help="default: 20 digits, 6 fashion-mnist, 15 cifar10-pack")
    demo.add_argument("--batch-size", type=_positive_int, default=None, help="default: 64; 128 for cifar10-pack")
    demo.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 0.05; 0.1 for cifar10-pack)")
    demo.add_argument("--weight-decay", type=float, default=5e-4)
    demo.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda, cuda:1, ...")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--limit-train", type=int, default=None, metavar="N",
                      help="train on a seeded stratified subset of N images (default: 10000 for fashion-mnist, "
                      "all otherwise; 0 = all)")
    demo.add_argument("--branches", type=_positive_int, default=3, help="ONE branches (default 3)")
    demo.add_argument("--k", type=_positive_int, default=8, help="OSAKD neighbours (default 8)")
    demo.add_argument("--alpha", type=float, default=0.9, help="OSAKD weight of the hard-label loss (default 0.9)")
    demo.add_argument("--bank-size", type=int, default=16384, help="OSAKD memory bank (default 16384; 0 = in-batch)")
    demo.add_argument("--threads", type=int, default=1, metavar="N",
                      help="CPU threads (default 1: deterministic tables, and no slowdown when cores are busy; "
                      "0 = torch's default)")
    demo.add_argument("--save-dir", default=None, metavar="DIR", help="also save the exported state_dicts here")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    summ = sub.add_parser("summary", help="print kdwrap.summary of a timm model wrapped for a method",
                          description="Wrap an untrained timm model (or kdwrap's small_cnn / cifar_resnet*) and "
                          "print kdwrap.summary: the split, parameter counts and FLOP shares.")
    summ.add_argument("model", metavar="MODEL_NAME", help="timm model name, e.g. resnet18 or cifar_resnet32")
    summ.add_argument("--method", default="one", choices=["one", "osakd"])
    summ.add_argument("--split", type=_split_arg, default=None, help="ONE split point (module name); default: auto")
    summ.add_argument("--branches", type=_positive_int, default=3)
    summ.add_argument("--num-classes", type=_positive_int, default=None, help="default: the model's own")
    summ.add_argument("--in-chans", type=_positive_int, default=None, help="default: the model's own")
    summ.add_argument("--input-size", type=_positive_int, default=None, metavar="PX",
                      help="image height = width for the summary's shape trace (default: the model's own)")
    return parser


def _summary(args: argparse.Namespace) -> int:
    import timm

    from . import api
    from . import models as _models  # noqa: F401  (registers kdwrap's models with timm)

    if not timm.is_model(args.model):
        print(f"kdwrap summary: unknown model {args.model!r}; see timm.list_models() or use one of "
              f"{', '.join(_models.TIMM_MODELS)}", file=sys.stderr)
        return 2
    kw = {k: v for k, v in (("num_classes", args.num_classes), ("in_chans", args.in_chans)) if v is not None}
    net = timm.create_model(args.model, pretrained=False, **kw)
    cfg = getattr(net, "pretrained_cfg", None)
    if isinstance(cfg, dict) and (args.input_size or args.in_chans):
        c, h, w = cfg.get("input_size", (3, 224, 224))
        c = args.in_chans or c
        h = w = args.input_size or h
        net.pretrained_cfg = {**cfg, "input_size": (c, h, w)}
    if args.method == "one":
        model, _ = api.one(net, branches=args.branches, split=args.split)
    else:
        model, _ = api.osakd(net)
    print(api.summary(model))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        dataset=args.dataset, data=args.data, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, device=args.device, seed=args.seed,
        limit_train=args.limit_train, branches=args.branches, k=args.k, alpha=args.alpha,
        bank_size=args.bank_size, save_dir=args.save_dir, threads=args.threads, progress=not args.no_progress,
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
        return {"demo": _demo, "summary": _summary}[args.command](args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        if os.environ.get("KDWRAP_DEBUG"):
            raise
        print(f"kdwrap {args.command}: error: {e}\n(set KDWRAP_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
