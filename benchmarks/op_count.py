"""Kernel launches per training step, counted on any device: the cost that dominates small models on a GPU.

    python benchmarks/op_count.py                                   # CIFAR ResNet-32, batch 8, m = 2, 3, 4
    python benchmarks/op_count.py --models cifar_resnet32 resnet18:64 --branches 3
    python benchmarks/op_count.py --models lenet5 --branches 3 --osakd-banks 0 16384   # OSAKD in-batch and bank

A small model's training step on a fast GPU is bound by the host launching kernels, not by arithmetic (the ONE
issue's H100 prototypes: CIFAR ResNet-32's plain step took 13-15 ms eager and 4.3 ms as one CUDA graph). This
script counts the ATen operators dispatched in one training step (forward, loss, backward; optimizer excluded), views
excluded since they launch no kernel, for the plain model and ONE in each execution. Fused execution is counted with
grouped convolutions (``conv_mode="grouped"``), the layout it uses on a GPU, whatever the device here. The count
does not depend on the device or its load, so it is repeatable on a CPU; the GPU time it stands for is not
measured here (benchmarks/speed.py on the GPU machine does that). OSAKD rows count a step with a full bank, and the
"host syncs" column counts ``_local_scalar_dense`` (``.item()``, ``int(tensor)``): each one stalls a GPU's queue.

Prints a table and writes benchmarks/results/op_count_<date>.json and .png.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kdwrap  # noqa: E402
import kdwrap.models  # noqa: E402,F401  (registers cifar_resnet* with timm)
from kdwrap.fused import fuse_branches  # noqa: E402
from common import command_line, markdown_table, pyplot  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# The operator behind Tensor.item() / int(tensor) / a data-dependent shape: a host sync on a GPU.
HOST_SYNC = "_local_scalar_dense"


class OpCounter(TorchDispatchMode):
    """Counts the non-view ATen operators dispatched inside the ``with`` block, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not func.is_view:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_step(model_name: str, px: int, batch: int, branches: int | None, execution: str | None,
               osakd_bank: int | None = None) -> OpCounter:
    """One training step of the plain model (no ``execution``, no ``osakd_bank``), ONE (``branches``, ``execution``)
    or OSAKD (a full bank of ``osakd_bank`` entries, so the step searches it)."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model(model_name, pretrained=False, num_classes=10)
    if osakd_bank is not None:
        model, loss_fn = kdwrap.osakd(net, bank_size=osakd_bank)
        probs = (torch.randn(osakd_bank, 10) * 3).softmax(1)
        loss_fn.bank.add(probs, torch.randint(0, 10, (osakd_bank,)))
    elif execution is None:
        model, loss_fn = net, F.cross_entropy
    else:
        model, loss_fn = kdwrap.one(net, branches=branches, execution=execution, input_size=(3, px, px))
        if execution == "fused":  # the GPU layout: one grouped convolution per layer
            model.branch_execution.fused = {mode: fuse_branches(model.branches, mode, conv_mode="grouped") for mode in (True, False)}
    model.train()
    x, y = torch.randn(batch, 3, px, px), torch.randint(0, 10, (batch,))
    loss_fn(model(x), y).backward()  # first step: lazy initialisation stays out of the count
    model.zero_grad(set_to_none=True)
    with OpCounter() as counter:
        loss_fn(model(x), y).backward()
    return counter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["cifar_resnet32"], metavar="NAME[:PX]")
    ap.add_argument("--branches", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--osakd-banks", nargs="*", type=int, default=[16384],
                    help="OSAKD rows, one per bank size (full bank; default: the default size)")
    ap.add_argument("--batch", type=int, default=8, help="the count does not depend on it")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for spec in args.models:
        name, _, px = spec.partition(":")
        px = int(px or (32 if name.startswith("cifar") else 64))
        plain = sum(count_step(name, px, args.batch, None, None).counts.values())
        rows.append({"model": name, "px": px, "variant": "plain", "ops": plain, "ratio": 1.0, "host_syncs": 0,
                     "top": []})
        counted = [(f"ONE m={m} {execution}", count_step(name, px, args.batch, m, execution).counts)
                   for m in args.branches for execution in ("sequential", "fused")]
        counted += [(f"OSAKD bank {n:,}", count_step(name, px, args.batch, None, None, n).counts)
                    for n in args.osakd_banks]
        for variant, c in counted:
            n = sum(c.values())
            rows.append({"model": name, "px": px, "variant": variant, "ops": n, "ratio": round(n / plain, 3),
                         "host_syncs": c[HOST_SYNC], "top": c.most_common(8)})
    table = markdown_table(
        ["model", "variant", "ops per step", "x plain", "host syncs", "most frequent"],
        [[f"{r['model']} ({r['px']} px)", r["variant"], str(r["ops"]), f"{r['ratio']:.2f}",
          str(r.get("host_syncs", 0)), ", ".join(f"{k} {v}" for k, v in r["top"][:5])] for r in rows],
    )
    date = datetime.date.today().isoformat()
    print("\nATen operators per training step (forward + loss + backward, views excluded), "
          f"torch {torch.__version__}\n")
    print(table)
    out = args.out or RESULTS / f"op_count_{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": date, "torch": torch.__version__, "batch": args.batch,
            "command": command_line("benchmarks/op_count.py", sys.argv[1:])}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(rows)), 3.8))
        colors = ["tab:gray" if r["variant"] == "plain" else "tab:blue" if "sequential" in r["variant"]
                  else "tab:green" for r in rows]
        ax.bar(range(len(rows)), [r["ops"] for r in rows], color=colors)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"{r['model']}\n{r['variant']}" for r in rows], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("ATen ops per training step")
        ax.set_title(f"kdwrap: kernel launches per step (views excluded), {date}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
        plt.close(fig)
        print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
