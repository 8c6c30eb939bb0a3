"""Time kdwrap's k-NN backends on the banks OSAKD meets (probability vectors, k=8), against the floor: one matmul
pass over the bank (``queries @ bank.T``), which any exact search must at least match.

    python benchmarks/knn_speed.py --device cpu --threads 1   # (16,384 x 10, 64), (65,536 x 100, 128), (65,536 x 1000, 256)
    python benchmarks/knn_speed.py --device cpu --quick       # drop 65,536 x 1000
    python benchmarks/knn_speed.py --device cuda --full       # adds 1,281,167 x 1000, 256 queries (ImageNet-1k)

Backends timed: ``torch`` (kdwrap's chunked brute force with blocked selection), ``torch+norms`` (the same with
the bank's squared norms given, as OSAKD's memory bank keeps them), ``faiss`` (when installed),
``cdist`` (a plain ``torch.cdist(q, bank).topk`` reference) and ``matmul`` (the floor). Median of ``--repeats``
rounds after one warm-up (and the fastest round), the backends taking turns within a round (so a load change on a shared machine hits all
alike); CUDA events on GPU. ``--threads N`` sets the CPU threads of torch and faiss. Prints a table with each
backend's ratio to the floor and writes ``benchmarks/results/knn_speed_<device>.json`` (with the machine's load
average) and a PNG bar plot when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import pyplot  # noqa: E402
from kdwrap.knn import faiss_available, knn_search  # noqa: E402
from kdwrap._timing import elapsed_ms  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (bank entries, classes, queries): a CIFAR-10 bank with OSAKD's batch of 64, a CIFAR-100-sized and an
# ImageNet-class-count bank.
SHAPES = [(16384, 10, 64), (65536, 100, 128), (65536, 1000, 256)]
FULL = (1281167, 1000, 256)


def timeit(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Milliseconds of each function in ``repeats`` rounds after one warm-up. The functions take turns within
    each round, so a load change on a shared machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        elapsed_ms(fn, device)
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(elapsed_ms(fn, device))
    return times


def probabilities(n: int, c: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    # Peaked softmax outputs, like a classifier's part-way through training.
    return (torch.randn(n, c, generator=gen) * 3).softmax(1).to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--full", action="store_true", help="add the 1,281,167 x 1000 bank (meant for GPU)")
    ap.add_argument("--quick", action="store_true", help="skip the 65,536 x 1000 bank")
    ap.add_argument("--k", type=int, default=8, help="neighbours (default 8, OSAKD's)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backends", nargs="+", default=["torch", "torch+norms", "faiss", "cdist", "matmul"])
    ap.add_argument("--threads", type=int, default=None, help="torch/faiss CPU threads (default: library default)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: results/knn_speed_<device>.json)")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
        if faiss_available():
            import faiss

            faiss.omp_set_num_threads(args.threads)
    load_before = os.getloadavg()
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    backends = [b for b in args.backends if b != "faiss" or faiss_available()]
    shapes = [s for s in SHAPES if not (args.quick and s[1] == 1000)] + ([FULL] if args.full else [])
    gen = torch.Generator().manual_seed(0)

    rows = []
    others = [b for b in backends if b != "matmul"]
    print(f"{'bank N x C':>18} {'queries':>7} " + " ".join(f"{b + ' ms':>11}" for b in backends)
          + "".join(f"{b + ' / mm (min)':>18}" for b in others if "matmul" in backends))
    for n, c, b in shapes:
        bank = probabilities(n, c, device, gen)
        q = probabilities(b, c, device, gen)
        norms = (bank * bank).sum(1)
        row = {"bank": n, "classes": c, "queries": b, "k": args.k}
        fns = {}
        for backend in backends:
            if backend == "cdist":
                fns[backend] = lambda: torch.cdist(q, bank).topk(args.k, dim=1, largest=False)  # noqa: E731
            elif backend == "matmul":
                fns[backend] = lambda: q @ bank.T  # noqa: E731
            elif backend == "torch+norms":  # as OSAKD calls it: the bank keeps its squared norms
                fns[backend] = lambda: knn_search(q, bank, args.k, reference_sq_norms=norms)  # noqa: E731
            else:
                fns[backend] = lambda backend=backend: knn_search(q, bank, args.k, backend=backend)  # noqa: E731
        times = timeit(fns, args.repeats, device)
        row["ms"] = {name: round(statistics.median(t), 3) for name, t in times.items()}
        row["ms_min"] = {name: round(min(t), 3) for name, t in times.items()}
        if "matmul" in backends:
            row["ratio_to_matmul"] = {x: round(row["ms"][x] / row["ms"]["matmul"], 2) for x in others}
            # The fastest round of each: on a shared machine, much less inflated by other jobs than the median.
            row["ratio_to_matmul_min"] = {x: round(row["ms_min"][x] / row["ms_min"]["matmul"], 2) for x in others}
        rows.append(row)
        print(f"{n:>10,} x {c:<5} {b:>7} " + " ".join(f"{row['ms'][x]:>11.2f}" for x in backends)
              + "".join(f"{row['ratio_to_matmul'][x]:>9.2f}x ({row['ratio_to_matmul_min'][x]:.2f}x)" for x in others
                        if "matmul" in backends))

    meta = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()}-core "
        f"{platform.machine()} CPU",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        # The 1-minute load average before and after: on a shared machine, figures taken under load are slower.
        "loadavg_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "command": " ".join(["python", "benchmarks/knn_speed.py", *sys.argv[1:]]),
    }
    if "faiss" in backends:
        import faiss

        meta["faiss"] = faiss.__version__
    out = args.out or RESULTS / f"knn_speed_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    width = 0.8 / len(backends)
    for j, backend in enumerate(backends):
        ax.bar([i + j * width for i in range(len(rows))], [r["ms"][backend] for r in rows], width, label=backend)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r['bank']:,}x{r['classes']}\nq={r['queries']}" for r in rows], fontsize=8)
    ax.set_ylabel("ms (median)")
    ax.set_yscale("log")
    ax.set_title(f"k-NN search, k={args.k}, {meta['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
