"""Time kdwrap's k-NN backends on the banks OSAKD meets (probability vectors, k=8), against the floor: one matmul
pass over the bank (``queries @ bank.T``), which any exact search must at least match.

    python benchmarks/knn_speed.py --device cpu --threads 1   # (16,384 x 10, 64), (65,536 x 100, 128), (65,536 x 1000, 256)
    python benchmarks/knn_speed.py --device cpu --quick       # drop 65,536 x 1000
    python benchmarks/knn_speed.py --device cuda --full       # adds 1,281,167 x 1000, 256 queries (ImageNet-1k)
    python benchmarks/knn_speed.py --device cuda --banks 1281167:1000:256 --deadline 60   # banks N:C:QUERIES

Backends timed: ``torch`` (kdwrap's chunked brute force with blocked selection), ``torch+norms`` (the same with
the bank's squared norms given, as OSAKD's memory bank keeps them), ``faiss`` (when installed),
``cdist`` (a plain ``torch.cdist(q, bank).topk`` reference) and ``matmul`` (the floor). Median of ``--repeats``
rounds after one warm-up (and the fastest round), the backends taking turns within a round (so a load change on a shared machine hits all
alike); CUDA events on GPU. ``--threads N`` sets the CPU threads of torch and faiss. Prints a table with each
backend's ratio to the floor and writes ``benchmarks/results/knn_speed_<device>.json`` (with the machine's load
average) and a PNG bar plot when matplotlib is installed. The JSON is rewritten after every bank: "results" holds the
banks timed so far, "not_measured" the others and why; ``--deadline SECONDS`` (from the process's start) skips a bank
whose expected time would not fit, and ``--report FILE`` prints the table and draws the plot of such a file.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import Deadline, Stopped, command_line, markdown_table, pyplot, read_rows, stop_on_sigterm, write_json  # noqa: E402
from kdwrap.knn import faiss_available, knn_search  # noqa: E402
from kdwrap._timing import elapsed_ms  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (bank entries, classes, queries): a CIFAR-10 bank with OSAKD's batch of 64, a CIFAR-100-sized and an
# ImageNet-class-count bank.
SHAPES = [(16384, 10, 64), (65536, 100, 128), (65536, 1000, 256)]
FULL = (1281167, 1000, 256)
RESERVE_S = 10.0  # the last JSON, the table and the plot, kept free before a deadline
# Seconds per bank element to create a bank (on the CPU), copy it and time it, per device: a bank is skipped when
# this much would not fit before --deadline. The ImageNet-sized bank (1.3e9 elements) took about 15 s on the H200
# machine; on a small CPU the timing itself dominates. The rounds also stop at the deadline.
SECONDS_PER_ELEMENT = {"cuda": 1e-8, "cpu": 2e-7}


def timeit(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
           deadline: Deadline | None = None) -> dict[str, list[float]]:
    """Milliseconds of each function in ``repeats`` rounds after one warm-up. The functions take turns within
    each round, so a load change on a shared machine hits all of them alike; rounds stop before ``deadline``."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    t0 = time.perf_counter()
    for name, fn in fns.items():
        elapsed_ms(fn, device)
    round_s = time.perf_counter() - t0
    for _ in range(repeats):
        if deadline is not None and times[next(iter(fns))] and not deadline.allows(round_s + RESERVE_S):
            break
        for name, fn in fns.items():
            times[name].append(elapsed_ms(fn, device))
    return times


def probabilities(n: int, c: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    # Peaked softmax outputs, like a classifier's part-way through training.
    return (torch.randn(n, c, generator=gen) * 3).softmax(1).to(device)


def parse_bank(spec: str) -> tuple[int, int, int]:
    """``N:C:QUERIES`` -> (bank entries, classes, queries)."""
    n, c, q = (int(v) for v in spec.split(":"))
    return n, c, q


def measure(shape: tuple[int, int, int], backends: list[str], args: argparse.Namespace, device: torch.device,
            gen: torch.Generator, deadline: Deadline) -> dict[str, Any]:
    """One bank's row: every backend's median and fastest round, and their ratios to the matmul floor."""
    n, c, b = shape
    bank = probabilities(n, c, device, gen)
    q = probabilities(b, c, device, gen)
    norms = (bank * bank).sum(1)
    row: dict[str, Any] = {"bank": n, "classes": c, "queries": b, "k": args.k}
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
    times = timeit(fns, args.repeats, device, deadline)
    others = [x for x in backends if x != "matmul"]
    row["repeats"] = len(times[backends[0]])
    row["ms"] = {name: round(statistics.median(t), 3) for name, t in times.items()}
    row["ms_min"] = {name: round(min(t), 3) for name, t in times.items()}
    if "matmul" in backends:
        row["ratio_to_matmul"] = {x: round(row["ms"][x] / row["ms"]["matmul"], 2) for x in others}
        # The fastest round of each: on a shared machine, much less inflated by other jobs than the median.
        row["ratio_to_matmul_min"] = {x: round(row["ms_min"][x] / row["ms_min"]["matmul"], 2) for x in others}
    return row


def format_table(rows: list[dict[str, Any]], missing: list[dict[str, Any]] = ()) -> str:
    """Median ms per backend and the ratio to the matmul floor (fastest rounds' ratio in brackets); the banks of
    ``missing`` (a JSON's "not_measured") with their reason."""
    backends = list(dict.fromkeys(b for r in rows for b in r["ms"]))
    others = [b for b in backends if b != "matmul" and "matmul" in backends]
    header = ["bank N x C", "queries", "rounds", *(f"{b} ms" for b in backends), *(f"{b} / matmul" for b in others)]
    body = [[f"{r['bank']:,} x {r['classes']}", str(r["queries"]), str(r.get("repeats", "")),
             *(f"{r['ms'][b]:.3f}" for b in backends),
             *(f"{r['ratio_to_matmul'][b]:.2f}x ({r['ratio_to_matmul_min'][b]:.2f}x)" for b in others)]
            for r in rows]
    for m in missing:
        why = "not measured: the run stopped first" if m["reason"] == "pending" else m["reason"]
        body.append([f"{m['bank']:,} x {m['classes']}", str(m["queries"]), "0", why,
                     *[""] * (len(header) - 4)])
    return markdown_table(header, body)


def report(path: Path) -> None:
    """Print the table of a knn_speed.py JSON (finished or cut short) and draw its plot beside it."""
    meta, rows, missing, state = read_rows(path)
    print(f"\nk-NN search, k={meta.get('k', 8)}, median of up to {meta['repeats']} rounds; {meta['device']}, "
          f"torch {meta['torch']}{state}\n")
    print(format_table(rows, missing))
    plt = pyplot() if rows else None
    if plt is None:
        return
    backends = list(dict.fromkeys(b for r in rows for b in r["ms"]))
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    width = 0.8 / len(backends)
    for j, backend in enumerate(backends):
        ax.bar([i + j * width for i in range(len(rows))], [r["ms"][backend] for r in rows], width, label=backend)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r['bank']:,}x{r['classes']}\nq={r['queries']}" for r in rows], fontsize=8)
    ax.set_ylabel("ms (median)")
    ax.set_yscale("log")
    ax.set_title(f"k-NN search, k={meta.get('k', 8)}, {meta['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    plt.close(fig)
    print(f"wrote {path.with_suffix('.png')}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--full", action="store_true", help="add the 1,281,167 x 1000 bank (meant for GPU)")
    ap.add_argument("--quick", action="store_true", help="skip the 65,536 x 1000 bank")
    ap.add_argument("--banks", nargs="+", type=parse_bank, default=None, metavar="N:C:QUERIES",
                    help="time these banks instead (e.g. 1281167:1000:256), in this order")
    ap.add_argument("--k", type=int, default=8, help="neighbours (default 8, OSAKD's)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backends", nargs="+", default=["torch", "torch+norms", "faiss", "cdist", "matmul"])
    ap.add_argument("--threads", type=int, default=None, help="torch/faiss CPU threads (default: library default)")
    ap.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                    help="seconds from the start: time only the banks that fit, then write the table and plot")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: results/knn_speed_<device>.json)")
    ap.add_argument("--report", type=Path, default=None, metavar="JSON",
                    help="print the table of this knn_speed.py JSON (finished or cut short) and draw its plot")
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report)
    deadline = Deadline(args.deadline)
    stop_on_sigterm()

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
    shapes = args.banks or [s for s in SHAPES if not (args.quick and s[1] == 1000)] + ([FULL] if args.full else [])
    gen = torch.Generator().manual_seed(0)

    meta = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()}-core "
        f"{platform.machine()} CPU",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "k": args.k,
        # The 1-minute load average before and after: on a shared machine, figures taken under load are slower.
        "loadavg_1min": [round(load_before[0], 2)],
        "deadline_s": args.deadline, "complete": False, "stopped": None,
        "command": command_line("benchmarks/knn_speed.py", argv if argv is not None else sys.argv[1:]),
    }
    if "faiss" in backends:
        import faiss

        meta["faiss"] = faiss.__version__
    out = args.out or RESULTS / f"knn_speed_{args.device}.json"
    rows: list[dict[str, Any]] = []
    missing = {shape: {"bank": shape[0], "classes": shape[1], "queries": shape[2], "reason": "pending"}
               for shape in shapes}

    def save() -> None:
        write_json(out, {"meta": meta, "results": rows, "not_measured": list(missing.values())})

    save()
    try:
        for shape in shapes:
            n, c, b = shape
            if not deadline.allows(SECONDS_PER_ELEMENT[device.type] * n * c + RESERVE_S):
                missing[shape]["reason"] = "not measured: deadline"
                save()
                continue
            row = measure(shape, backends, args, device, gen, deadline)
            rows.append(row)
            del missing[shape]
            save()
            print(f"{n:>10,} x {c:<5} {b:>5} queries: "
                  + "  ".join(f"{x} {ms:.3f} ms" for x, ms in row["ms"].items()), flush=True)
    except Stopped:
        meta["stopped"] = "SIGTERM"
        print("SIGTERM: writing what was measured", flush=True)
    for m in missing.values():
        if m["reason"] == "pending":
            m["reason"] = "not measured: the run was stopped (SIGTERM)" if meta["stopped"] else "not measured: deadline"
    meta.update(complete=meta["stopped"] is None,
                loadavg_1min=[round(load_before[0], 2), round(os.getloadavg()[0], 2)])
    save()
    print(f"wrote {out}")
    report(out)


if __name__ == "__main__":
    main()
