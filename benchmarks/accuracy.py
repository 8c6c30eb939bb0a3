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
    # CIFAR ResNet-32 in one 10-minute GPU call: plain, ONE m=3, OSAKD, 3 seeds, CUDA graphs; prints its expected
    # wall time first, stops the runs at the deadline (they resume) and writes the table there
    python benchmarks/accuracy.py --protocol one-resnet32-gpu-call --deadline 450 --results $OUT
    # DML (2 peers) and KD on the LeNet-5 protocol: KD's teacher, a plain CIFAR ResNet-20 (TEACHER_MODELS), is
    # trained first (once, seed 0) in the same --out folder and reported as its own row
    python benchmarks/accuracy.py --protocol osakd-cifar10 --variants plain dml-2 kd --seeds 0 1 2
    # plumbing check on a CPU: 1 epoch on 512 training / 256 test images (accuracies meaningless)
    python benchmarks/accuracy.py --protocol osakd-cifar10 --smoke

Run folders go to --out (default runs/accuracy-<protocol>[-smoke]); a run that is already there is resumed, so the
same command continues an interrupted benchmark. Reported per model: test accuracy at the best epoch (the papers'
convention) and the last, mean ± standard deviation over seeds with each seed's value, the paired difference to
plain with its 95 % t-interval over seeds and the verdict (beyond / within noise, see kdwrap.demo.seed_statistics), and the last
epoch's training accuracy (so a reader sees whether the network fits its training set). ONE gives two rows from the
same runs: ONE (branch 0), the deployed model, and ONE-E, the gated ensemble (not a model of the original size).
DML's row is peer 0, the deployed peer (every peer's accuracy is in its runs' history.json). A variant that needs
another's run (KD needs its teacher) gets it added to the variants and started first; the teacher is trained once,
with seed 0, and serves every seed's KD run.
Writes benchmarks/results/accuracy_<protocol>_<device>_<date>.json and a PNG of test-accuracy curves.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from common import Deadline, Stopped, command_line, portable_path, stop_on_sigterm, write_json

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train_cifar.py"
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT))

from kdwrap.demo.seed_statistics import plot_curves  # noqa: E402

from accuracy_protocols import (  # noqa: E402  (after the checkout joins sys.path)
    GPU_PLANS, LABELS, NEEDS, NOTES, ONE_SEED, PROTOCOLS, REFERENCE_RAMPUP_SHARE, SMOKE, TEACHER_MODELS, VARIANTS,
)
from accuracy_table import format_table, summarise  # noqa: E402

RESERVE_S = 20.0  # before --deadline: stopping the runs, the tables, the JSON and the plot
REFRESH_S = 30.0  # while epochs finish, the JSON and plot are rewritten at most this often
TRAIN_KEYS = ("dataset", "model", "epochs", "batch_size", "lr", "weight_decay", "schedule", "limit_train",
              "limit_test", "holdout")


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
    p.add_argument("--finished-only", action="store_true",
                   help="leave the runs that have not finished every epoch out of the tables (listed as not finished): "
                   "a report of a table still growing then mixes no partial curve into a mean")
    p.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                   help="earlier results of the same protocol (benchmarks/results/accuracy_*.json): their seeds join "
                   "this run's in the tables, so a table grows by seeds across sessions")
    p.add_argument("--baseline", default="plain", metavar="VARIANT",
                   help="the variant every row is compared with (default plain), e.g. plain-lr0.3x")
    p.add_argument("--controls", nargs="+", default=[], metavar="VARIANT",
                   help="the free controls (e.g. plain-ls-lr0.3x plain-ema-lr0.3x): every row is also compared with "
                   "the stronger of them (the higher mean over seeds, per reading: best and last epoch)")
    p.add_argument("--name", default="", metavar="NAME",
                   help="added to the result files' names (accuracy_<protocol>-NAME_...), so that two tables of one "
                   "protocol and day do not overwrite each other, e.g. --name family-lr0.3x")
    p.add_argument("--select-lr", nargs="+", type=float, default=None, metavar="LR",
                   help="choose the protocol's learning rate: plain at each LR, evaluated on a validation split held "
                   "out of the training set (--holdout), never on the test set; the table's best row is the choice")
    p.add_argument("--holdout", type=int, default=5000, metavar="N",
                   help="with --select-lr: training images held out as the validation split (default 5000)")
    p.add_argument("--train-args", default="", help="extra arguments for train_cifar.py, e.g. \"--channels-last\"")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="seconds from the start: start no run after, and stop the running ones (each keeps its last "
                   "finished epoch and resumes with the same command) in time to write the tables, JSON and plot")
    p.add_argument("--results", default=str(RESULTS), metavar="DIR",
                   help="where the JSON and PNG go (default benchmarks/results), rewritten as epochs finish")
    args = p.parse_args()
    if args.select_lr:
        if args.variants:
            p.error("--select-lr runs plain at each learning rate: drop --variants")
        args.variants = lr_variants(args.select_lr)
        args.baseline = args.variants[0]
        args.name = args.name or "lr-selection"
    elif PROTOCOLS[args.protocol]["lr"] is None:
        p.error(f"--protocol {args.protocol} has no learning rate yet: choose it with --select-lr LR [LR ...]")
    args.variants = with_needs(args.variants or PROTOCOLS[args.protocol]["variants"])
    if args.baseline not in VARIANTS:
        p.error(f"--baseline {args.baseline!r} is not a variant; valid: {', '.join(VARIANTS)}")
    if args.variants[0] != args.baseline:
        args.variants = [args.baseline] + [v for v in args.variants if v != args.baseline]
    unknown = [c for c in args.controls if c not in VARIANTS]
    if unknown:
        p.error(f"--controls {unknown}: not variants; valid: {', '.join(VARIANTS)}")
    args.variants += [c for c in args.controls if c not in args.variants]
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
            "lr_times_0_3": f"{0.3 * setup['lr']:g}", "lr_times_0_1": f"{0.1 * setup['lr']:g}",
            "epoch_samples": str(epoch_samples(setup)),
            "teacher_model": TEACHER_MODELS.get(protocol, setup["model"])}
    for need in NEEDS.values():
        fill[f"{need}_run"] = str(out_root / run_name(need, ONE_SEED.get(need, seed)))
    return fill


# Training images per dataset (before a subset or a held-out split).
TRAIN_SIZES = {"cifar10-pack": 50_000, "fashion-mnist": 60_000}


def epoch_samples(setup: dict[str, Any]) -> int:
    """Samples one epoch of the protocol trains on (train_cifar.py drops the last partial batch)."""
    n = TRAIN_SIZES[setup["dataset"]]
    n -= setup.get("holdout") or 0
    n = min(n, setup.get("limit_train") or n)
    return n // setup["batch_size"] * setup["batch_size"]


def lr_variants(lrs: list[float]) -> list[str]:
    """Plain at each of ``lrs`` (--select-lr), added to VARIANTS and LABELS."""
    names = []
    for lr in lrs:
        name = f"plain-lr{lr:g}"
        VARIANTS[name] = ["--method", "plain", "--lr", f"{lr:g}"]
        LABELS[name] = f"plain, lr {lr:g}"
        names.append(name)
    return names


def choose_lr(rows: list[dict[str, Any]], epochs: int) -> float | None:
    """The learning rate of the --select-lr row with the highest best-over-epochs accuracy (the protocol's own
    reading), mean over seeds, among the rows whose runs all finished; None if none did."""
    done = [r for r in rows if min(r["epochs_done"]) >= epochs]
    if not done:
        return None
    cmd = VARIANTS[max(done, key=lambda r: r["best_mean"])["variant"]]
    return float(cmd[cmd.index("--lr") + 1])


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
    if device.startswith("cuda"):
        cmd += setup.get("cuda_args", [])
    return cmd + [a.format(**fill) for a in VARIANTS[variant]] + args.train_args.split()


def expected_seconds(protocol: str, setup: dict[str, Any], runs: list[dict[str, Any]], device: str) -> float | None:
    """The wall time GPU_PLANS expects for ``runs`` of ``protocol`` on a GPU (None: no plan for it or not a GPU)."""
    plan = GPU_PLANS.get(protocol)
    if plan is None or not device.startswith("cuda"):
        return None
    steps = epoch_samples(setup) // setup["batch_size"]
    slowest = max(plan["step_ms"].values())
    epoch_s = sum(steps * plan["step_ms"].get(r["variant"], slowest) / 1e3 + plan["eval_s"] for r in runs)
    return plan["startup_s"] + plan["compile_s"] + setup["epochs"] * epoch_s


def launch_all(runs: list[dict[str, Any]], jobs: int, threads: int, total_epochs: int,
               deadline: Deadline | None = None, refresh: Callable[[], None] | None = None) -> None:
    """Run every command, ``jobs`` at a time, each once the runs it needs have finished; a progress bar counts
    finished epochs over all runs. When ``deadline`` leaves only RESERVE_S, or on SIGTERM, the runs still going are
    stopped (each keeps its last finished epoch: its checkpoint and history.json are written after every epoch) and
    the others are not started. ``refresh()`` is called as epochs finish, at most every REFRESH_S."""
    from tqdm import tqdm

    pending, active, finished = list(runs), [], set()
    # No bar when the output goes to a file (a log, a remote machine): a line per finished run instead.
    bar = tqdm(total=total_epochs, unit="epoch", desc=f"{len(runs)} runs", dynamic_ncols=True,
               disable=not sys.stderr.isatty())
    # PYTHONPATH: the runs import this checkout's kdwrap even where it is not installed (the GPU machine).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", PYTHONPATH=path)
    refreshed, epochs_seen = time.monotonic(), 0
    try:
        while pending or active:
            if deadline is not None and not deadline.allows(RESERVE_S):
                tqdm.write(f"deadline: stopping {len(active)} run(s); {len(pending)} not started")
                break
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
                        raise SystemExit(f"run {r['name']} failed (exit {r['proc'].returncode}); end of "
                                         f"{r['log']}:\n{tail}")
            bar.n = epochs = sum(count_epochs(r["out"]) for r in runs)
            bar.refresh()
            if refresh is not None and epochs != epochs_seen and time.monotonic() - refreshed >= REFRESH_S:
                refresh()
                refreshed, epochs_seen = time.monotonic(), epochs
    except Stopped:
        tqdm.write(f"SIGTERM: stopping {len(active)} run(s); {len(pending)} not started")
    finally:
        stop_runs(active)
        bar.close()


def stop_runs(active: list[dict[str, Any]], grace_s: float = 10.0) -> None:
    """Stop the running ``active`` runs: SIGTERM, then SIGKILL after ``grace_s``. Each checkpoint is written to a
    temporary file and renamed, so a run stopped while saving keeps its previous epoch."""
    for r in active:
        r["proc"].terminate()
    until = time.monotonic() + grace_s
    for r in active:
        try:
            r["proc"].wait(timeout=max(0.1, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            r["proc"].kill()
            r["proc"].wait()
        r["log_file"].close()
        r["stopped"] = True


def count_epochs(run_dir: Path) -> int:
    """Epochs finished by a run, from its history.json (written after every epoch)."""
    try:
        return len(json.loads((run_dir / "history.json").read_text())["epochs"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def main() -> None:
    args = parse_args()
    deadline = Deadline(args.deadline)
    stop_on_sigterm()
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
    if args.select_lr:
        setup.update(lr=args.select_lr[0], holdout=args.holdout)  # each variant passes its own --lr
    suffix = ("-lr-selection" if args.select_lr else "") + ("-smoke" if args.smoke else "")
    out_root = Path(args.out or ROOT / "runs" / f"accuracy-{args.protocol}{suffix}")
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
    wall = 0.0  # training's wall time; --report-only measures none (the JSON says null)
    if not args.report_only:
        print(f"{len(runs)} runs of {setup['model']} on {setup['dataset']}, {setup['epochs']} epoch(s), {jobs} at a "
              f"time on {desc}; logs and run folders in {out_root}", flush=True)
        print("first command:", " ".join(runs[0]["cmd"]), flush=True)
        expected = expected_seconds(args.protocol, setup, runs, device)
        print("expected wall time: " + (f"{expected:.0f} s ({expected / 60:.1f} min; GPU_PLANS)" if expected else
                                        f"no plan for {args.protocol} on {device}")
              + (f"; deadline {args.deadline:g} s from the start" if args.deadline else ""), flush=True)
        t0 = time.time()

        def refresh() -> None:  # a call cut short still leaves the JSON and plot of every epoch so far
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                try:
                    report(args, setup, runs, fill, out_root, device, jobs, time.time() - t0, in_progress=True)
                except SystemExit:  # no finished epoch yet
                    pass

        launch_all(runs, jobs, threads, len(runs) * setup["epochs"], deadline, refresh)
        wall = time.time() - t0
    report(args, setup, runs, fill, out_root, device, jobs, wall)


def report(args: argparse.Namespace, setup: dict[str, Any], runs: list[dict[str, Any]], fill: dict[str, str],
           out_root: Path, device: str, jobs: int, wall: float, in_progress: bool = False) -> None:
    """Print the tables of the runs in ``out_root`` (finished or not) and write their JSON and plot;
    ``in_progress``: a refresh while they train."""
    tag, desc = device_description(device)
    earlier = []
    for path in args.merge:
        old = json.loads(Path(path).read_text())
        if old["meta"]["protocol"] != args.protocol or old["meta"]["setup"] != setup:
            raise SystemExit(f"--merge {path}: its protocol or setup differs from this run's; only runs of the same "
                             f"setup can share a table (it: {old['meta']['protocol']} {old['meta']['setup']})")
        earlier.append(old["results"])
    in_table = runs
    if getattr(args, "finished_only", False):
        in_table = [r for r in runs if count_epochs(r["out"]) >= setup["epochs"]]
    rows = summarise(in_table, args.variants, tuple(earlier), fill, args.baseline, tuple(getattr(args, "controls", ())))
    if not rows:
        raise SystemExit(f"no finished epoch in {out_root}")
    date = datetime.date.today().isoformat()
    subset = f", {setup['limit_train']:,}-image class-balanced training subset" if setup.get("limit_train") else ""
    what = (f"{setup['model']} on {setup['dataset']}{subset}, {setup['epochs']} epoch(s), batch {setup['batch_size']}, "
            f"SGD {'Nesterov ' if setup['nesterov'] else ''}momentum 0.9, "
            f"lr {' / '.join(f'{lr:g}' for lr in args.select_lr) if args.select_lr else setup['lr']} {setup['schedule']}, "
            f"wd {setup['weight_decay']}, {'pad-4 crop + flip' if setup['augment'] else 'no augmentation'}, "
            f"seeds {sorted({s for r in rows if r['variant'] not in ONE_SEED for s in r['seeds']})}")
    if args.select_lr:
        what += f"; evaluated on {setup['holdout']:,} training images held out (validation), not on the test set"
    print(f"\n{'Validation' if args.select_lr else 'Test'} accuracy (%), {what}; {desc}"
          + (f"; wall time {wall:.0f} s" if wall else ""))
    unfinished = [r["name"] for r in runs if count_epochs(r["out"]) < setup["epochs"]]
    if unfinished:
        left_out = " left out of the tables" if in_table is not runs else " (partial curves)"
        print(f"NOT FINISHED{left_out}: {', '.join(unfinished)}")
    # Runs without a finished epoch have no row: a deadline or a stop came first.
    not_measured = [r["name"] for r in runs if count_epochs(r["out"]) == 0]
    if not_measured:
        print(f"NOT MEASURED (no finished epoch; not in the tables): {', '.join(not_measured)}")
    for kind in ("best", "last"):
        print(f"\n{kind} epoch:\n" + format_table(rows, kind))
    one = any(r["variant"].startswith("one-") for r in rows)
    print(("\nONE (branch 0) is the deployed model (kdwrap.export); ONE-E is the gated ensemble of all branches from "
           "the same runs. " if one else "\n")
          + "'best' is the maximum over epochs of the test accuracy (the papers' convention), 'last' the "
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

    chosen = choose_lr(rows, setup["epochs"]) if args.select_lr else None
    if args.select_lr:
        print("\nno learning rate chosen: no run has finished" if chosen is None else
              f"\nchosen learning rate: {chosen:g} (the best validation accuracy over epochs, mean over seeds); "
              "set it as the protocol's lr in PROTOCOLS")
    meta = {"date": date, "chosen_lr": chosen, "device": desc, "protocol": args.protocol, "setup": setup, "seeds": args.seeds,
            "controls": list(getattr(args, "controls", ())), "merged": [portable_path(str(m)) for m in args.merge], "variants": {v: VARIANTS[v] for v in args.variants}, "smoke": args.smoke, "jobs": jobs,
            # None: not measured by this command (--report-only trains nothing), never a 0.0 that reads as a time
            "wall_seconds": round(wall, 1) if not getattr(args, "report_only", False) else None, "unfinished": unfinished, "not_measured": not_measured,
            "deadline_s": args.deadline, "in_progress": in_progress,
            **({"teacher_model": fill["teacher_model"]} if "teacher" in args.variants else {}),
            "command": command_line("benchmarks/accuracy.py", sys.argv[1:]),
            # like "command": a record names no path of the machine it ran on
            "train_command_example": " ".join(map(portable_path, runs[0]["cmd"][1:]))}
    stem = f"accuracy_{args.protocol}{'-' + args.name if args.name else ''}{'_smoke' if args.smoke else ''}_{tag}_{date}"
    out = Path(args.results) / f"{stem}.json"
    write_json(out, {"meta": meta, "results": rows})  # whole even if the call is cut while it writes
    print(f"\nwrote {out}")
    title = (f"{what}\nmean, band: min-max over seeds; {desc}, {date}"
             + ("\nSMOKE RUN: the accuracies are meaningless" if args.smoke else ""))
    if plot_curves({r["reported"]: r["curves"] for r in rows}, out.with_suffix(".png"), title):
        print(f"wrote {out.with_suffix('.png')}")
    else:
        print("matplotlib is not installed: no PNG")


if __name__ == "__main__":
    main()
