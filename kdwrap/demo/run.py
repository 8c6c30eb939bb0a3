"""``kdwrap demo``: train one small classifier plain, with ONE and with OSAKD over several seeds, export each trained
model with :func:`kdwrap.export`, and compare the deployed models on the test set: mean ± std over seeds, the
paired difference to plain with its 95 % interval, and whether that difference is beyond noise.

The default data is the CIFAR-10 JPEG pack the repository ships (``data/cifar10-jpeg.npz``); the trainings run as
parallel processes, one per core. The demo is ``kdwrap compare`` on that pack with three of its recipes: its
trainings are compare's jobs (:func:`kdwrap.demo.compare.make_jobs`, :mod:`kdwrap.demo.training`,
:mod:`kdwrap.demo.job_pool`); this module keeps the demo's defaults, its fallback to digits and its own table.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import api
from ..methods.osakd import DEFAULT_ALPHA
from .compare import SOURCE_DEFAULTS, make_jobs, pick_device
from .data import Dataset, load_dataset
from .job_pool import run_jobs
from .networks import create_model
from .seed_statistics import paired_difference, plot_curves, spread

__all__ = ["DEMO_DEFAULTS", "METHODS", "DemoRow", "DemoResult", "resolve_dataset", "create_model", "format_table",
           "run_demo"]

# Per dataset: a recipe that fits the whole demo (3 methods x 3 seeds) in a few minutes on a 2-core CPU. CIFAR-10:
# the OSAKD paper's LeNet-5 on a class-balanced 10,000-image subset with no augmentation, trained until it fits its
# training set, the regime where distillation has something to correct.
# The same recipes as kdwrap compare's for these datasets (the demo is a comparison on the shipped pack).
DEMO_DEFAULTS: dict[str, dict[str, Any]] = {k: SOURCE_DEFAULTS[k] for k in ("cifar10-pack", "fashion-mnist", "digits")}
# The methods the demo compares, in table order; each builds (model, loss_fn) from a fresh network. The trainings
# themselves use kdwrap compare's recipes of the same names (_RECIPE), which build exactly these.
METHODS: dict[str, Callable[..., tuple[nn.Module, Callable]]] = {
    "plain": lambda net, **kw: (net, F.cross_entropy),
    "ONE": lambda net, branches, **kw: api.one(net, branches=branches),
    "OSAKD": lambda net, k, alpha, bank_size, **kw: api.osakd(net, k=k, alpha=alpha, bank_size=bank_size),
}
_RECIPE = {"plain": "plain", "ONE": "one", "OSAKD": "osakd"}
CURVES_FILE = "curves.png"


@dataclass
class DemoRow:
    """One line of the demo's table: a deployed model's test accuracy over seeds."""

    method: str
    accuracies: list[float]  # test accuracy (%) of the exported model, one per seed
    params: int  # parameters of the exported model
    train_time: float  # seconds per training run (mean over seeds)
    train_accuracy: float  # training accuracy (%) over the last epoch, mean over seeds
    export_bytes: int  # bytes of the exported model's saved state_dict
    note: str = ""

    @property
    def accuracy(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)


@dataclass
class DemoResult:
    """What :func:`run_demo` returns: the rows, the formatted table, the verdict lines and the settings used."""

    rows: list[DemoRow]
    table: str
    verdicts: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[list[float]]] = field(default_factory=dict)  # method -> per seed, test acc per epoch


def resolve_dataset(name: str, data: str | None) -> str:
    """Resolve ``auto``: the dataset ``data`` names (an ``.npz`` pack or a Fashion-MNIST folder), else the CIFAR-10
    pack (shipped with the repository; :func:`run_demo` falls back to digits with a warning if it cannot be read)."""
    if name != "auto":
        return name
    if data is not None:
        return "cifar10-pack" if str(data).endswith(".npz") else "fashion-mnist"
    return "cifar10-pack"


def _load(name: str, path: str | None, log: Callable[[str], None]) -> tuple[str, Dataset]:
    """The dataset; a CIFAR-10 pack that is missing or unreadable falls back to digits with a warning naming why."""
    try:
        return name, load_dataset(name, path)
    except (FileNotFoundError, ValueError, OSError) as err:
        if name != "cifar10-pack":
            raise
        msg = (f"kdwrap demo: the CIFAR-10 pack could not be read ({err}); falling back to scikit-learn's 8x8 "
               "digits, which is too small and too easy to show what distillation does")
        warnings.warn(msg, stacklevel=3)
        log("WARNING: " + msg)
        return "digits", load_dataset("digits")


def _chosen_methods(names: Sequence[str]) -> list[str]:
    """``names`` as keys of :data:`METHODS` in table order, plain first (the baseline every row is compared with)."""
    known = {m.lower(): m for m in METHODS}
    unknown = [n for n in names if n.lower() not in known]
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown}; valid: {', '.join(METHODS)}")
    chosen = {known[n.lower()] for n in names} | {"plain"}
    return [m for m in METHODS if m in chosen]


def _describe(methods: list[str], branches: int, k: int, alpha: float) -> str:
    what = {"plain": "plain", "ONE": f"ONE ({branches} branches)", "OSAKD": f"OSAKD (k={k}, alpha={alpha})"}
    return ", ".join(what[m] for m in methods)


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:,.2f} MiB"


def _rows(results: list[dict[str, Any]], seeds: list[int], methods: list[str]) -> list[DemoRow]:
    by = {(r["method"], r["seed"]): r for r in results}
    rows = []
    for method in methods:
        runs = [by[(method, s)] for s in seeds]
        for name in runs[0]["models"]:
            m = [r["models"][name] for r in runs]
            rows.append(DemoRow(
                name, [x["accuracy"] for x in m], m[0]["params"], sum(r["seconds"] for r in runs) / len(runs),
                sum(r["train_acc"] for r in runs) / len(runs), m[0]["bytes"],
                note="(same runs as ONE)" if name == "ONE-E" else ""))
    return rows


def format_table(rows: list[DemoRow]) -> str:
    """The rows as a Markdown table: accuracy over seeds, the paired difference to plain and its verdict."""
    base = rows[0].accuracies
    header = ["method", "test acc: mean ± std", "per seed", "vs plain [95 % CI]", "verdict", "train acc",
              "params", "train time / run", "exported state_dict"]
    body = []
    for r in rows:
        d = paired_difference(r.accuracies, base) if r is not rows[0] else None
        body.append([r.method, str(spread(r.accuracies)), " / ".join(f"{a:.2f}" for a in r.accuracies),
                     str(d) if d else "(baseline)", d.verdict if d else "", f"{r.train_accuracy:.1f} %",
                     f"{r.params:,}", f"{r.train_time:.1f} s" + (f" {r.note}" if r.note else ""),
                     f"{r.export_bytes:,} B ({_fmt_bytes(r.export_bytes)})"])
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body])


def _verdicts(rows: list[DemoRow]) -> list[str]:
    """One sentence per method: the difference to plain and whether it is a gain, a loss, or noise."""
    lines = []
    for r in rows[1:]:
        d = paired_difference(r.accuracies, rows[0].accuracies)
        what = {"gain beyond noise": "better than plain beyond noise",
                "loss beyond noise": "worse than plain beyond noise",
                "within noise": "not distinguishable from plain (within noise)",
                "no verdict (1 seed)": "one seed: no interval, so no verdict (run more seeds)"}[d.verdict]
        lines.append(f"{r.method}: {d.mean:+.2f} points over {d.n} seed(s), {what}")
    return lines


def run_demo(
    dataset: str = "auto", data: str | None = None, model: str | None = None, epochs: int | None = None,
    batch_size: int | None = None, lr: float | None = None, weight_decay: float = 5e-4, device: str = "auto",
    seeds: tuple[int, ...] | list[int] = (0, 1, 2), limit_train: int | None = None, branches: int = 3, k: int = 8,
    alpha: float = DEFAULT_ALPHA, bank_size: int = 16384, save_dir: str | None = "kdwrap-demo", jobs: int | None = None,
    threads: int = 1, progress: bool = True, methods: Sequence[str] = tuple(METHODS),
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Train ``model`` plain, with ONE (``branches``) and with OSAKD (``k``, ``alpha``, ``bank_size``) for each of
    ``seeds`` (same initial weights and data order for every method of a seed); export each, evaluate the exported
    models, and return the table with each method's paired difference to plain and its verdict.

    ``methods``: which of :data:`METHODS` to train (any case); plain, the baseline, always is.

    ``None`` settings take the dataset's :data:`DEMO_DEFAULTS`; ``limit_train=0`` uses the whole training set.
    ``jobs``: trainings at once, each a process (default: one per CPU core on a CPU, 1 on a GPU); ``threads``: CPU
    threads per training (one: deterministic results for a seed, no oversubscribed cores). ``save_dir``: the
    curves (PNG), the results (JSON) and seed ``seeds[0]``'s exported state_dicts go there (``None``: nothing saved).
    """
    name = resolve_dataset(dataset, data)
    if name not in DEMO_DEFAULTS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: auto, {', '.join(DEMO_DEFAULTS)}")
    methods = _chosen_methods(methods)
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    name, ds = _load(name, data, log)
    d = DEMO_DEFAULTS[name]
    model = model or d["model"]
    epochs = d["epochs"] if epochs is None else epochs
    batch_size = batch_size or d["batch_size"]
    lr = d["lr"] if lr is None else lr
    limit = d["limit_train"] if limit_train is None else (limit_train or None)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch size must be >= 1, got {epochs} and {batch_size}")
    create_model(model, ds.input_size[0], ds.num_classes, ds.input_size)  # an unknown name fails here, at once
    dev = pick_device(device)
    workers = jobs or (min(len(seeds) * len(methods), os.cpu_count() or 1) if dev.type == "cpu" else 1)
    n_train = min(limit or len(ds.y_train), len(ds.y_train))
    settings = dict(dataset=name, model=model, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                    device=str(dev), seeds=seeds, train=n_train, test=len(ds.y_test), jobs=workers,
                    threads=threads if dev.type == "cpu" else None, augment=d["augment"], branches=branches, k=k,
                    alpha=alpha, bank_size=bank_size, methods=methods)
    log(f"kdwrap demo: {name} ({n_train:,} train / {len(ds.y_test):,} test images, "
        f"{'x'.join(map(str, ds.input_size))}, {ds.num_classes} classes), model {model}, {epochs} epochs, batch "
        f"{batch_size}, SGD nesterov lr {lr} cosine, wd {weight_decay}"
        f"{', pad-4 crop + flip' if d['augment'] else ', no augmentation'}; {_describe(methods, branches, k, alpha)} "
        f"x seeds {seeds}: {len(seeds) * len(methods)} trainings, {workers} at a time on {dev}")
    out_dir = Path(save_dir) if save_dir else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    save_as = str(out_dir / "{stem}.pt") if out_dir else None
    job_list = make_jobs(
        [_RECIPE[m] for m in methods], seeds, source={"kind": name, "path": data if name != "digits" else None,
                                                      "img_size": None},
        model=model, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, augment=d["augment"],
        limit_train=limit, device=str(dev), threads=threads, save_as=lambda s: save_as if s == seeds[0] else None,
        curve_every_row=False,
        options={"one": dict(branches=branches), "osakd": dict(k=k, alpha=alpha, bank_size=bank_size)})
    start = time.perf_counter()
    saved = torch.get_num_threads()  # the in-process path sets the thread count; give the caller theirs back
    try:
        results = run_jobs(job_list, workers, len(job_list) * epochs, progress)
    finally:
        torch.set_num_threads(saved)
    wall = time.perf_counter() - start
    rows = _rows(results, seeds, methods)
    table = format_table(rows)
    verdicts = _verdicts(rows)
    curves = {m: [next(r["curve"] for r in results if r["method"] == m and r["seed"] == s) for s in seeds]
              for m in methods}
    log("")
    log(table)
    log("")
    for line in verdicts:
        log("  " + line)
    log("")
    log(f"Test accuracy of the exported models (kdwrap.export) after the last epoch, over {len(seeds)} seeds; "
        "'vs plain' is the paired difference (same seed: same initial weights and data order) with its 95 % "
        "t-interval, 'beyond noise' when that interval excludes 0. ONE-E is the gated ensemble of all branches, "
        f"from the same runs, {branches}x the tail's size. Wall time {wall:.0f} s.")
    if out_dir is not None:
        title = (f"kdwrap demo: {model} on {name} ({n_train:,} training images), {epochs} epochs, seeds {seeds}\n"
                 "test accuracy of the deployed model; mean, band: min-max over seeds")
        if plot_curves(curves, out_dir / CURVES_FILE, title):
            log(f"Curves: {out_dir / CURVES_FILE}")
        else:
            log("No curves plot: matplotlib is not installed (pip install matplotlib)")
        (out_dir / "results.json").write_text(json.dumps(
            {"settings": settings, "wall_seconds": round(wall, 1), "rows": [asdict(r) for r in rows],
             "verdicts": verdicts, "curves": curves}, indent=1) + "\n")
        log(f"Results: {out_dir / 'results.json'}; exported state_dicts of seed {seeds[0]}: {out_dir}{os.sep}*.pt")
    return DemoResult(rows, table, verdicts, settings, curves)

