"""The model zoo sweep: does each method wrap, train a step and export on every kind of model a user brings?

    python benchmarks/zoo.py                              # every model of benchmarks/zoo_models.txt, ONE and OSAKD
    python benchmarks/zoo.py --methods one --models timm/pit_ti_224 tv/mnasnet0_5
    python benchmarks/zoo.py --make-list                  # rewrite zoo_models.txt from the installed timm/torchvision
    python benchmarks/zoo.py --record-splits before.json  # where kdwrap cuts each model, no training
    python benchmarks/zoo.py --compare-splits before.json after.json  # the same after a change?
    python benchmarks/zoo.py --methods pcl --wrap-options '{"augment": null}'   # options besides the defaults

The list (in the repository, so a sweep is repeatable) holds one model per timm family (timm's modules; the smallest
by name: atto/femto/pico/nano/tiny/small before the others) and every torchvision classifier. Per model and method,
in its own process with a time limit (--timeout): build it (pretrained=False, 10 classes), wrap it, one training
step on a batch of 2 at the model's own input size (--size: another), export, and compare the exported model's eval
outputs with the wrapper's; each row keeps the process's peak resident memory. Where the wrapper can run its branches
fused (ONE, OKDDip, PCL), one more training step runs them fused whatever this machine's default execution is; the
row's "fused" field says "ok", the error, or "no" with the reason the tail cannot be fused (the status is about the
default execution). --wrap-options passes options besides the methods' defaults. --jobs processes run at once
(default: one per core); --retry-timeout runs the models that ran out of time (or whose process died) again, one at a
time, with a longer limit. Prints a table and a summary per method and writes
benchmarks/results/zoo_<device>_<date>.json.

--record-splits FILE trains nothing: per model (in its own process, as above) it records where kdwrap cuts it (ONE's
split with its rule, the cuts it considered and its summary, OKDDip's split, BYOT's exits and summary), or the error
when a wrapper cannot be built. Two recordings made before and after a change to kdwrap.graph must be equal
(--compare-splits BEFORE AFTER says where they differ); an existing FILE is completed, not overwritten.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LIST = HERE / "zoo_models.txt"
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))
from common import command_line  # noqa: E402

# Name parts of a family's small members, smallest first: the sweep takes the first model of a family matching the
# earliest of them (a family with none takes its first name).
SMALL = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "mini", "small", "_s", "18", "b0", "_t")
# torchvision classifiers whose own input size is not 224.
TV_SIZES = {"inception_v3": 299}
NUM_CLASSES = 10


# Methods that cut the model and trace it: traced at the model's own input size, their split and cut reported.
TRACED_AT_SIZE = ("one", "pcl")


def make_list() -> list[str]:
    import timm
    import torchvision

    names = []
    for module in sorted(timm.list_modules()):
        family = sorted(timm.list_models(module=module))
        if not family:
            continue

        def rank(name: str) -> tuple[int, int, str]:
            hit = next((i for i, part in enumerate(SMALL) if part in name), len(SMALL))
            return hit, len(name), name

        names.append("timm/" + min(family, key=rank))
    names += ["tv/" + n for n in sorted(torchvision.models.list_models(module=torchvision.models))]
    return names


def build(name: str) -> tuple[Any, int]:
    """(model, input size) for 'timm/NAME' or 'tv/NAME'."""
    source, model = name.split("/", 1)
    if source == "timm":
        import timm

        net = timm.create_model(model, pretrained=False, num_classes=NUM_CLASSES)
        return net, int(net.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    import torchvision

    kwargs = {"aux_logits": False, "init_weights": True} if model in ("inception_v3", "googlenet") else {}
    return torchvision.models.get_model(model, weights=None, num_classes=NUM_CLASSES, **kwargs), TV_SIZES.get(model, 224)


def check_one(name: str, method: str, options: dict[str, Any] | None = None, size: int | None = None) -> dict[str, Any]:
    """Build, wrap (with ``options`` besides the method's defaults), one training step at the model's input size (or
    ``size`` pixels), export, compare: the result row (status ok / error with its message), with the process's peak
    resident memory."""
    import torch

    import kdwrap

    torch.manual_seed(0)
    torch.set_num_threads(1)
    row: dict[str, Any] = {"model": name, "method": method}
    stage = "build"
    try:
        net, own_size = build(name)
        size = size or own_size
        row["size"] = size
        stage = "wrap"
        t0 = time.perf_counter()
        traced_at = {"input_size": (3, size, size)} if method in TRACED_AT_SIZE else {}
        model, loss_fn = kdwrap.wrap(net, method=method, **traced_at, **(options or {}))
        row["wrap_s"] = round(time.perf_counter() - t0, 2)
        if method in TRACED_AT_SIZE:
            row["split"] = model.split
            row["cut_values"] = model.cut_values
        stage = "train"
        x, y = torch.randn(2, 3, size, size), torch.tensor([0, 1])
        train_step(model, loss_fn, x, y)
        stage = "export"
        model.eval()
        deployed = kdwrap.export(model).eval()
        with torch.no_grad():
            want, got = model(x), deployed(x)
        got = got if isinstance(got, torch.Tensor) else (got[model.output] if getattr(model, "output", None) is not None
                                                          else got[0])
        err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))
        if not err < 1e-3:
            raise AssertionError(f"export differs from the wrapper: relative max error {err:.2e}")
        row["status"] = "ok"
        row.update(fused_step(model, loss_fn, x, y))
    except Exception as exc:  # every failure is a row: the sweep reports, it does not stop
        row.update(status="error", stage=stage, error=describe_error(exc))
    row["peak_rss_gb"] = peak_rss_gb()
    return row


def train_step(model: Any, loss_fn: Any, x: Any, y: Any) -> None:
    """One training forward, loss and backward; a non-finite loss is an error."""
    import torch

    model.train()
    loss = loss_fn(model(x), y)
    loss.backward()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss {loss.item()}")


def describe_error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"


def peak_rss_gb() -> float:
    """This process's peak resident memory (Linux reports kilobytes)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def fused_step(model: Any, loss_fn: Any, x: Any, y: Any) -> dict[str, Any]:
    """For a wrapper whose branches can run fused (ONE, OKDDip, PCL): one more training step with the fused graphs,
    whatever the default execution chose on this machine ("fused": "ok", or the error), or why the tail cannot be
    fused ("fused": "no" and the reason). A separate field: the row's status is about the default execution."""
    if not hasattr(model, "fusion_error"):
        return {}
    if not model.branch_execution.fused:
        return {"fused": "no", "fusion_error": (model.fusion_error or "")[:300]}
    setting, model.execution = model.execution, "fused"
    try:
        train_step(model, loss_fn, x, y)
    except Exception as exc:
        return {"fused": "error: " + describe_error(exc)}
    finally:
        model.execution = setting
    return {"fused": "ok"}


def record_splits(name: str) -> dict[str, Any]:
    """Where kdwrap cuts model ``name``, without training: the fields of one --record-splits row."""
    import copy

    import torch

    import kdwrap

    def error(exc: Exception) -> str:
        return f"{type(exc).__name__}: {str(exc)[:600]}"

    torch.manual_seed(0)
    torch.set_num_threads(1)
    row: dict[str, Any] = {"model": name}
    try:
        net, size = build(name)
    except Exception as exc:  # every failure is a field of the row
        return {**row, "build_error": error(exc)}
    input_size = (3, size, size)
    try:
        model, _ = kdwrap.one(copy.deepcopy(net), input_size=input_size)
        c = model.split_choice
        row["one"] = {"split": model.split, "rule": c.rule, "automatic": c.automatic, "considered": list(c.considered),
                      "cut_values": model.cut_values, "channels": [model.trunk_channels, model.trunk_channels_dim],
                      "main_value": model.main_value}
        try:
            row["one"]["summary"] = model.summary()
        except Exception as exc:
            row["one"]["summary_error"] = error(exc)
    except Exception as exc:
        row["one"] = {"error": error(exc)}
    try:
        model, _ = kdwrap.okddip(copy.deepcopy(net), input_size=input_size)
        row["okddip"] = {"split": model.split, "rule": model.split_choice.rule, "classifier": model.classifier}
    except Exception as exc:
        row["okddip"] = {"error": error(exc)}
    try:
        model, _ = kdwrap.byot(copy.deepcopy(net), input_size=input_size)
        row["byot"] = {"stages": list(model.stages), "classifier": model.classifier,
                       "heads": [type(h).__name__ for h in model.heads], "summary": model.summary()}
    except Exception as exc:
        row["byot"] = {"error": error(exc)}
    return row


def run_isolated(name: str, method: str, timeout: float, options: str | None = None,
                 size: int | None = None) -> dict[str, Any]:
    t0 = time.time()
    cmd = [sys.executable, __file__, "--check", name, "--methods", method]
    if options:
        cmd += ["--wrap-options", options]
    if size:
        cmd += ["--size", str(size)]
    if method == "record-splits":
        cmd = [sys.executable, __file__, "--record-one", name]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        line = next((ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("{")), None)
        last = (out.stderr.strip().splitlines() or ["no output"])[-1][:300]
        if out.returncode < 0:  # killed: the kernel's OOM killer sends SIGKILL and the process prints nothing
            last = f"the process was killed by signal {-out.returncode}" + (
                " (SIGKILL: out of memory, see dmesg)" if out.returncode == -9 else "")
        row = json.loads(line) if line else {"model": name, "method": method, "status": "error", "stage": "process",
                                             "error": last}
    except subprocess.TimeoutExpired:
        row = {"model": name, "method": method, "status": "timeout", "error": f"over {timeout:.0f} s"}
    row["seconds"] = round(time.time() - t0, 1)
    return row


def compare_splits(before: Path, after: Path) -> int:
    """Print how two --record-splits recordings differ, per model recorded in both (``seconds`` aside); 1 if any."""
    old, new = (json.loads(path.read_text()) for path in (before, after))
    both = [name for name in old if name in new]
    differ = 0
    for name in both:
        a, b = ({k: v for k, v in row.items() if k != "seconds"} for row in (old[name], new[name]))
        if a != b:
            differ += 1
            fields = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            print(f"{name}: differs in {', '.join(fields)}")
    only = sorted(set(old) ^ set(new))
    print(f"{len(both)} models recorded in both: {len(both) - differ} equal, {differ} different"
          + (f"; {len(only)} recorded in one only ({', '.join(only[:5])}{' ...' if len(only) > 5 else ''})"
             if only else ""))
    return 1 if differ else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help="default: every model of zoo_models.txt")
    p.add_argument("--match", default=None, metavar="REGEX", help="only the listed models matching REGEX")
    p.add_argument("--methods", nargs="+", default=["one", "osakd"])
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per model and method (default 300)")
    p.add_argument("--retry-timeout", type=float, default=None, metavar="SECONDS",
                   help="after the pass, run each model that ran out of time or whose process died again, alone, "
                        "with this limit (a model that is only slow on a loaded machine is not a failure)")
    p.add_argument("--make-list", action="store_true", help="rewrite zoo_models.txt and exit")
    p.add_argument("--record-splits", type=Path, default=None, metavar="FILE",
                   help="record where kdwrap cuts each model (JSON, no training) and exit")
    p.add_argument("--compare-splits", type=Path, nargs=2, default=None, metavar=("BEFORE", "AFTER"),
                   help="compare two --record-splits recordings field by field (time taken aside) and exit 1 if a "
                        "model recorded in both differs")
    p.add_argument("--check", default=None, help=argparse.SUPPRESS)  # one model, in this process (a worker)
    p.add_argument("--record-one", default=None, help=argparse.SUPPRESS)  # the same for --record-splits
    p.add_argument("--wrap-options", default=None, metavar="JSON",
                   help="options for every wrapper besides its defaults, e.g. '{\"augment\": null}' (PCL without "
                        "views)")
    p.add_argument("--size", type=int, default=None, metavar="PX",
                   help="train and compare at PX x PX instead of each model's own input size")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    try:
        if not isinstance(json.loads(args.wrap_options or "{}"), dict):
            raise ValueError("not an object")
    except ValueError as err:
        p.error(f"--wrap-options must be a JSON object of option names and values, e.g. '{{\"augment\": null}}': {err}")
    if args.compare_splits:
        sys.exit(compare_splits(*args.compare_splits))
    if args.check:
        print(json.dumps(check_one(args.check, args.methods[0], json.loads(args.wrap_options or "{}"), args.size)))
        return
    if args.record_one:
        warnings.simplefilter("ignore")  # the JSON line is the worker's output
        print(json.dumps(record_splits(args.record_one)))
        return
    if args.make_list:
        names = make_list()
        LIST.write_text("\n".join(names) + "\n")
        print(f"wrote {len(names)} models to {LIST}")
        return
    names = args.models or [ln.strip() for ln in LIST.read_text().splitlines() if ln.strip()]
    if args.match:
        names = [n for n in names if re.search(args.match, n)]
    if args.record_splits:
        recorded = json.loads(args.record_splits.read_text()) if args.record_splits.exists() else {}
        todo = [n for n in names if n not in recorded]
        print(f"recording the splits of {len(todo)} models, {args.jobs} at a time", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            for row in pool.map(lambda n: run_isolated(n, "record-splits", args.timeout), todo):
                recorded[row["model"]] = row
                found = row.get("one", {}).get("split", row.get("error", ""))
                print(f"{row['model']:<40} {row['seconds']:>6.1f} s  {found}", flush=True)
                args.record_splits.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    jobs = [(n, m) for n in names for m in args.methods]
    print(f"{len(names)} models x {len(args.methods)} methods, {args.jobs} at a time, {args.timeout:.0f} s each at most",
          flush=True)
    t0 = time.time()
    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda job: run_isolated(*job, args.timeout, args.wrap_options, args.size), jobs):
            rows.append(row)
            print(f"{row['model']:<40} {row['method']:<6} {row['status']:<7} {row['seconds']:>6.1f} s  "
                  f"{row.get('error', row.get('split', ''))}", flush=True)
    retry = [i for i, r in enumerate(rows) if r["status"] == "timeout" or r.get("stage") == "process"]
    if args.retry_timeout and retry:
        print(f"\nretrying {len(retry)} alone, {args.retry_timeout:.0f} s each at most", flush=True)
        for i in retry:
            first = rows[i]
            row = run_isolated(first["model"], first["method"], args.retry_timeout, args.wrap_options,
                               args.size)
            row["first_attempt"] = {k: first[k] for k in ("status", "seconds", "error") if k in first}
            rows[i] = row
            print(f"{row['model']:<40} {row['method']:<6} {row['status']:<7} {row['seconds']:>6.1f} s  "
                  f"{row.get('error', row.get('split', ''))}", flush=True)
    wall = time.time() - t0
    print()
    from common import markdown_table

    body = [[r["model"], r["method"], r["status"], str(r.get("wrap_s", "")), r.get("split", ""), r.get("error", "")]
            for r in rows if r["status"] != "ok"]
    if body:
        print(markdown_table(["model", "method", "status", "wrap s", "split", "error"], body) + "\n")
    summary = {}
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        ok = sum(r["status"] == "ok" for r in mine)
        summary[method] = {"ok": ok, "total": len(mine)}
        fused = [r["fused"] for r in mine if "fused" in r]
        if fused:
            summary[method]["fused"] = {"ok": fused.count("ok"), "not fusable": fused.count("no"),
                                        "error": sum(f.startswith("error") for f in fused)}
        print(f"{method}: {ok} / {len(mine)} ok ({100 * ok / max(len(mine), 1):.1f} %)"
              + (f"; fused execution: {summary[method]['fused']}" if fused else ""))
    date = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"zoo_cpu_{date}.json"
    import timm
    import torch
    import torchvision

    meta = {"date": date, "machine": f"{os.cpu_count()}-core {platform.machine()} CPU", "wall_seconds": round(wall),
            "torch": torch.__version__, "timm": timm.__version__, "torchvision": torchvision.__version__,
            "command": command_line("benchmarks/zoo.py", sys.argv[1:])}
    out.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
