"""Test accuracy of plain training vs ONE (branch and ONE-E) vs OSAKD, several seeds, all runs at once.

    # CIFAR-10 (JPEG pack), CIFAR ResNet-32, 30 epochs, cosine lr 0.1, batch 128, seeds 0 and 1: six concurrent
    # training processes sharing one GPU (about 6-7 minutes on an H100 by the prototypes' timings)
    python benchmarks/accuracy.py --data /path/to/cifar10-jpeg.npz
    # Fashion-MNIST, the OSAKD paper's small CNN (2 conv + 2 fc), no augmentation
    python benchmarks/accuracy.py --dataset fashion-mnist --data /path/to/fashion-mnist-folder
    # plumbing check on a CPU: 1 epoch on 512 training / 256 test images (accuracies meaningless)
    python benchmarks/accuracy.py --smoke --data /path/to/cifar10-jpeg.npz

Each (method, seed) is one process of examples/train_cifar.py (the only training loop), with data on the device.
Run folders go to --out (default runs/accuracy-<dataset>[-smoke]); a run that is already there is resumed, so the
same command continues an interrupted benchmark. Reported per method: test accuracy at the last epoch and the best
over epochs, mean and half the range over seeds (with each seed's value). For ONE two rows come from the same runs:
"ONE (branch 0)", the deployed model, and "ONE-E", the gated ensemble of all branches (not a deployable model of the
original size). Writes benchmarks/results/accuracy_<dataset>_<device>_<date>.json and a PNG of test-accuracy curves.
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

from common import markdown_table, pyplot

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train_cifar.py"
RESULTS = Path(__file__).resolve().parent / "results"

# Per dataset: model and protocol passed to train_cifar.py. CIFAR-10 is the ONE paper's protocol shortened to 30 epochs;
# Fashion-MNIST uses the OSAKD paper's network with kdwrap's choice of optimiser settings (no augmentation).
SETUPS: dict[str, dict[str, Any]] = {
    "cifar10-pack": {"model": "cifar_resnet32", "epochs": 30, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4},
    "fashion-mnist": {"model": "small_cnn", "epochs": 30, "batch_size": 128, "lr": 0.05, "weight_decay": 5e-4},
}
SMOKE = {"epochs": 1, "limit_train": 512, "limit_test": 256}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10-pack", choices=list(SETUPS))
    p.add_argument("--data", default=None, help="the CIFAR-10 pack file, or the Fashion-MNIST folder "
                   "(default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--methods", nargs="+", default=["plain", "one", "osakd"], choices=["plain", "one", "osakd"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=None, help="default: 30 (1 with --smoke)")
    p.add_argument("--branches", type=int, default=3, help="ONE branches")
    p.add_argument("--k", type=int, default=8, help="OSAKD neighbours")
    p.add_argument("--alpha", type=float, default=0.9, help="OSAKD weight of cross-entropy")
    p.add_argument("--bank-size", type=int, default=4096, help="OSAKD memory bank (default 4096)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu (always cpu with --smoke)")
    p.add_argument("--jobs", type=int, default=None,
                   help="concurrent processes (default: all runs at once on GPU; one per core on CPU)")
    p.add_argument("--smoke", action="store_true",
                   help="plumbing check: 1 epoch, 512 training / 256 test images, CPU; accuracies are meaningless")
    p.add_argument("--out", default=None, help="run folders (default runs/accuracy-<dataset>[-smoke])")
    p.add_argument("--train-args", default="", help="extra arguments for train_cifar.py, e.g. \"--channels-last\"")
    args = p.parse_args()
    if args.dataset == "cifar10-pack" and args.data is None:
        p.error("--data PATH of the CIFAR-10 pack (cifar10-jpeg.npz) is required")
    return args


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


def run_command(args: argparse.Namespace, setup: dict[str, Any], method: str, seed: int, out: Path,
                device: str, threads: int) -> list[str]:
    cmd = [sys.executable, str(TRAIN), "--dataset", args.dataset, "--method", method, "--seed", str(seed),
           "--model", setup["model"], "--epochs", str(setup["epochs"]), "--batch-size", str(setup["batch_size"]),
           "--lr", str(setup["lr"]), "--weight-decay", str(setup["weight_decay"]), "--device", device,
           "--threads", str(threads), "--out", str(out), "--resume", "--no-progress"]
    if args.data:
        cmd += ["--data", args.data]
    if method == "one":
        cmd += ["--branches", str(args.branches)]
    if method == "osakd":
        cmd += ["--k", str(args.k), "--alpha", str(args.alpha), "--bank-size", str(args.bank_size)]
    for key in ("limit_train", "limit_test"):
        if key in setup:
            cmd += [f"--{key.replace('_', '-')}", str(setup[key])]
    return cmd + args.train_args.split()


def launch_all(runs: list[dict[str, Any]], jobs: int, threads: int, total_epochs: int) -> None:
    """Run every command, ``jobs`` at a time; a progress bar counts finished epochs over all runs."""
    from tqdm import tqdm

    pending, active = list(runs), []
    # No bar when the output goes to a file (a log, a remote machine): a line per finished run instead.
    bar = tqdm(total=total_epochs, unit="epoch", desc=f"{len(runs)} runs", dynamic_ncols=True,
               disable=not sys.stderr.isatty())
    # PYTHONPATH: the runs import this checkout's kdwrap even where it is not installed (the GPU machine).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", PYTHONPATH=path)
    while pending or active:
        while pending and len(active) < jobs:
            r = pending.pop(0)
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


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def summarise(runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """One row per reported model: plain, ONE (branch 0), ONE-E, OSAKD."""
    reported = {"plain": [("plain", "")], "one": [("ONE (branch 0)", ""), ("ONE-E (ensemble)", "_ensemble")],
                "osakd": [("OSAKD", "")]}
    rows = []
    for method in methods:
        hists = [json.loads((r["out"] / "history.json").read_text()) for r in runs if r["method"] == method]
        seeds = [r["seed"] for r in runs if r["method"] == method]
        for label, suffix in reported[method]:
            last = [h[f"last_test_acc{suffix}"] for h in hists]
            best = [h[f"best_test_acc{suffix}"] for h in hists]
            curves = [[e[f"test_acc{suffix}"] for e in h["epochs"]] for h in hists]
            rows.append({
                "reported": label, "method": method, "seeds": seeds, "last": last, "best": best,
                "last_mean": spread(last)[0], "last_half_range": spread(last)[1],
                "best_mean": spread(best)[0], "best_half_range": spread(best)[1],
                "epoch_seconds_median": statistics.median(e["seconds"] for h in hists for e in h["epochs"]),
                "curves": curves,
            })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["reported model", "last epoch: mean ± half-range", "per seed", "best epoch: mean ± half-range",
              "per seed", "s / epoch"]
    body = [[r["reported"], f"{r['last_mean']:.2f} ± {r['last_half_range']:.2f}",
             " / ".join(f"{v:.2f}" for v in r["last"]), f"{r['best_mean']:.2f} ± {r['best_half_range']:.2f}",
             " / ".join(f"{v:.2f}" for v in r["best"]), f"{r['epoch_seconds_median']:.1f}"] for r in rows]
    return markdown_table(header, body)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        n = min(len(c) for c in r["curves"])
        epochs = list(range(1, n + 1))
        cols = list(zip(*(c[:n] for c in r["curves"])))
        mean = [sum(v) / len(v) for v in cols]
        ax.plot(epochs, mean, label=r["reported"], marker="o" if n < 5 else None)
        ax.fill_between(epochs, [min(v) for v in cols], [max(v) for v in cols], alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    args = parse_args()
    setup = dict(SETUPS[args.dataset])
    if args.smoke:
        setup.update(SMOKE)
        device = "cpu"
    else:
        device = args.device or ("cuda" if gpu_available() else "cpu")
    if args.epochs:
        setup["epochs"] = args.epochs
    out_root = Path(args.out or ROOT / "runs" / f"accuracy-{args.dataset}{'-smoke' if args.smoke else ''}")
    out_root.mkdir(parents=True, exist_ok=True)

    if args.dataset == "cifar10-pack":
        # Decode the pack once here: the runs then read kdwrap's cache instead of each decoding 60,000 JPEGs.
        sys.path.insert(0, str(ROOT))
        from kdwrap.data import load_cifar10_pack

        load_cifar10_pack(args.data)

    runs = []
    for method in args.methods:
        for seed in args.seeds:
            name = f"{method}-seed{seed}"
            runs.append({"name": name, "method": method, "seed": seed, "out": out_root / name,
                         "log": out_root / f"{name}.log"})
    cores = os.cpu_count() or 1
    jobs = args.jobs or (len(runs) if device.startswith("cuda") else min(len(runs), cores))
    threads = max(1, cores // jobs)
    for r in runs:
        r["cmd"] = run_command(args, setup, r["method"], r["seed"], r["out"], device, threads)
    tag, desc = device_description(device)
    print(f"{len(runs)} runs of {setup['model']} on {args.dataset}, {setup['epochs']} epoch(s), {jobs} at a time on "
          f"{desc}; logs and run folders in {out_root}", flush=True)
    print("first command:", " ".join(runs[0]["cmd"]), flush=True)
    t0 = time.time()
    launch_all(runs, jobs, threads, len(runs) * setup["epochs"])
    wall = time.time() - t0

    rows = summarise(runs, args.methods)
    table = format_table(rows)
    date = datetime.date.today().isoformat()
    what = (f"{setup['model']} on {args.dataset}, {setup['epochs']} epoch(s), batch {setup['batch_size']}, "
            f"SGD nesterov lr {setup['lr']} cosine, wd {setup['weight_decay']}, seeds {args.seeds}")
    print(f"\nTest accuracy (%), {what}; {desc}; wall time {wall:.0f} s for all runs\n")
    print(table)
    print("\nONE (branch 0) is the deployed model (kdwrap.export); ONE-E is the gated ensemble of all branches from "
          "the same runs. 'best' is the maximum over epochs of the test accuracy (as the ONE code reports), 'last' "
          "the final epoch's; ± is half the range over seeds.")
    if args.dataset == "cifar10-pack":
        print("The CIFAR-10 pack is a lossy JPEG re-encoding of CIFAR-10: absolute accuracies run below published ones.")
    if args.smoke:
        print("SMOKE RUN: 1 epoch on 512 training images, tested on 256; the accuracies are meaningless (they only "
              "show that the plumbing works).")

    meta = {"date": date, "device": desc, "dataset": args.dataset, "setup": setup, "seeds": args.seeds,
            "methods": args.methods, "branches": args.branches, "k": args.k, "alpha": args.alpha,
            "bank_size": args.bank_size, "smoke": args.smoke, "jobs": jobs, "wall_seconds": round(wall, 1),
            "command": " ".join(["python", "benchmarks/accuracy.py", *sys.argv[1:]]),
            "train_command_example": " ".join(runs[0]["cmd"][1:])}
    stem = f"accuracy_{args.dataset}{'_smoke' if args.smoke else ''}_{tag}_{date}"
    out = RESULTS / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")
    title = (f"{setup['model']} on {args.dataset}, {setup['epochs']} epoch(s), seeds {args.seeds}; mean, band: min-max\n"
             f"{desc}, {date}" + ("\nSMOKE RUN: the accuracies are meaningless" if args.smoke else ""))
    if plot(rows, out.with_suffix(".png"), title):
        print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
