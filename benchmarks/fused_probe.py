"""Fused vs sequential execution of ONE's branches, training forward + backward of the branches only.

    python benchmarks/fused_probe.py [--threads 2] [--repeats 15] [--cases cifar32,resnet50] [--device cpu]
        [--cifar-batches 32,128] [--resnet50-batches 8,32] [--resnet50-px 64] [--channels-last]

For each case: the wrapper's trunk output ``f`` is computed once (detached); one timed step is
``logits = branches(f)`` (sequential: ``[b(f) for b in model.branches]``; fused: ``kdwrap.fused.fuse_branches`` with
each ``--conv-modes`` value; ``auto`` is ``split`` on CPU), then ``sum(z.square().mean() for z in logits).backward()``.
Reports the median (and min) over ``--repeats`` steps (two interleaved rounds, 3 warm-up steps each), in
milliseconds, and the fused / sequential ratios. BN buffers update as in training.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import kdwrap
from kdwrap.fused import fuse_branches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(run, f: torch.Tensor) -> None:
    logits = run(f)
    loss = sum(z.float().square().mean() for z in logits)
    loss.backward()


def bench(name: str, net: torch.nn.Module, input_size, batch: int, branches: int, split, repeats: int,
          device: torch.device, channels_last: bool = False, conv_modes=("auto", "grouped")) -> dict:
    model, _ = kdwrap.one(net, branches=branches, split=split)
    model.to(device).train()
    x = torch.randn(batch, *input_size, device=device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        f = model.trunk(x).detach()
    runs = {"sequential": lambda f: [b(f) for b in model.branches]}
    for mode in conv_modes:
        runs[f"fused[{mode}]"] = fuse_branches(model.branches, training=True, conv_mode=mode)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(2):  # two interleaved rounds, against drifting machine load
        for label, run in runs.items():
            for i in range(3 + (repeats + 1) // 2):
                model.zero_grad(set_to_none=True)
                _sync(device)
                t0 = time.perf_counter()
                _step(run, f)
                _sync(device)
                if i >= 3:
                    times[label].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    low = {k: min(v) * 1e3 for k, v in times.items()}
    parts = [f"{k} {med[k]:8.2f} ms (min {low[k]:7.2f})" for k in runs]
    ratios = [f"{k}/sequential {med[k] / med['sequential']:.2f}" for k in runs if k != "sequential"]
    print(f"{name:26s} batch {batch:4d} f={str(tuple(f.shape)):18s} " + " | ".join(parts + ratios), flush=True)
    return {"case": name, "batch": batch, "median_ms": med, "min_ms": low}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--branches", type=int, default=3)
    ap.add_argument("--cases", default="cifar32,resnet50")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--cifar-batches", default="32,128")
    ap.add_argument("--resnet50-batches", default="8,32")
    ap.add_argument("--resnet50-px", type=int, default=64)
    ap.add_argument("--conv-modes", default="auto,grouped", help="fuse_branches conv_mode values to time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"{args.branches} branches, channels_last={args.channels_last}")
    cases = args.cases.split(",")
    if "cifar32" in cases:
        from kdwrap.models import cifar_resnet32

        for batch in map(int, args.cifar_batches.split(",")):
            bench("cifar_resnet32 layer3", cifar_resnet32(num_classes=100), (3, 32, 32), batch, args.branches,
                  "layer3", args.repeats, device, args.channels_last, args.conv_modes.split(","))
    if "resnet50" in cases:
        import timm

        px = args.resnet50_px
        for batch in map(int, args.resnet50_batches.split(",")):
            bench(f"timm resnet50 layer4 {px}px", timm.create_model("resnet50", num_classes=100), (3, px, px), batch,
                  args.branches, None, args.repeats, device, args.channels_last, args.conv_modes.split(","))


if __name__ == "__main__":
    main()
