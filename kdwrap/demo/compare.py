"""``kdwrap compare``: kdwrap's methods against plain training and the free controls, on the user's images and model.

Every (recipe, seed) training starts from the same initial weights and sees the same data order; each deployed
model (``kdwrap.export``) is tested after the last epoch; the report gives, per deployed model, the accuracy over
seeds, the paired difference to plain and to the best control with a 95 % interval and a verdict, the step time
relative to plain, the peak memory and the parameters trained and deployed (:mod:`.comparison_report`). The
results, a Markdown report, a PNG of the curves and every deployed ``state_dict`` go under ``out``, which is also
the record a second call resumes from (:mod:`.run_store`). ``kdwrap demo`` runs the same jobs (:func:`make_jobs`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .comparison_report import (CompareRow, compare_rows, compare_verdicts, format_compare_table, write_outputs)
from .data import Dataset
from .job_pool import run_jobs
from .networks import create_model
from .recipes import START_ORDER, build_trainee, choose_recipes, parse_options
from .run_store import RunStore
from .sources import describe_source, load_source, resolve_source
from .training import load_teacher

__all__ = ["SOURCE_DEFAULTS", "COMPARE_METHODS", "ComparisonResult", "make_jobs", "pick_device", "run_compare"]

# Per kind of data: the settings a comparison takes when not given. The shipped CIFAR-10 pack, Fashion-MNIST and
# digits keep the demo's recipes (a few minutes on a 2-core CPU); a folder of the user's images gets the usual
# crop-and-flip augmentation and needs --model, since no default network suits every image size.
SOURCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar10-pack": dict(model="lenet5", epochs=20, batch_size=64, lr=0.02, limit_train=10000, augment=False),
    "fashion-mnist": dict(model="small_cnn", epochs=10, batch_size=64, lr=0.02, limit_train=10000, augment=False),
    "digits": dict(model="small_cnn", epochs=20, batch_size=64, lr=0.05, limit_train=None, augment=False),
    "image-folder": dict(model=None, epochs=20, batch_size=64, lr=0.05, limit_train=None, augment=True),
}
# What compare trains when --methods is not given: every online method, plain and both controls (kd joins them
# when a teacher is given).
COMPARE_METHODS = ("plain", "plain-ls", "plain-ema", "one", "osakd", "dml", "okddip", "byot", "pcl")


@dataclass
class ComparisonResult:
    """What :func:`run_compare` returns."""

    rows: list[CompareRow]
    table: str
    verdicts: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[list[float]]] = field(default_factory=dict)  # row -> per seed, test acc per epoch
    files: list[Path] = field(default_factory=list)


def pick_device(device: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def make_jobs(recipes: Sequence[str], seeds: Sequence[int], *, save_as: Callable[[int], str | None],
              options: Mapping[str, Mapping[str, Any]], **shared: Any) -> list[dict[str, Any]]:
    """One job per (recipe, seed), the costliest recipes first; ``shared`` goes into every job; ``save_as(seed)``:
    where a seed's deployed state_dicts go (a format string of ``name``, ``stem`` and ``seed``), or None."""
    return [dict(shared, recipe=r, seed=s, options=dict(options.get(r, {})), save_as=save_as(s))
            for r in START_ORDER if r in recipes for s in seeds]


def _check_recipes(recipes: list[str], model: str, ds: Dataset, options: Mapping[str, Mapping[str, Any]],
                   teacher: dict[str, Any] | None) -> None:
    """Build each recipe once on the CPU before any training: an unknown model or option, or a model a method
    cannot cut, stops the comparison at once instead of in a worker minutes later."""
    net_teacher = load_teacher(teacher, ds) if teacher else None
    for recipe in recipes:
        net = create_model(model, ds.input_size[0], ds.num_classes, ds.input_size)
        build_trainee(recipe, net, options.get(recipe, {}), net_teacher if recipe == "kd" else None)


def _seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    return seeds


def run_compare(
    data: str | None = None, model: str | None = None, img_size: int | None = None, epochs: int | None = None,
    seeds: Sequence[int] = (0, 1, 2), out: str | None = "kdwrap-compare", methods: Sequence[str] | None = None,
    options: Sequence[str] | Mapping[str, Mapping[str, Any]] = (), teacher: str | None = None,
    teacher_model: str | None = None, batch_size: int | None = None, lr: float | None = None,
    weight_decay: float = 5e-4, limit_train: int | None = None, augment: bool | None = None, device: str = "auto",
    amp: bool | None = None, jobs: int | None = None, threads: int = 1, progress: bool = True,
    isolate: bool = True, log: Callable[[str], None] = print,
) -> ComparisonResult:
    """Compare ``methods`` (recipe names, :data:`~kdwrap.demo.recipes.RECIPES`; default :data:`COMPARE_METHODS`)
    on ``data`` (:func:`~kdwrap.demo.sources.resolve_source`) with ``model``
    (:func:`~kdwrap.demo.networks.create_model`) over ``seeds``, and report each deployed model.

    ``options``: ``["one.branches=2", ...]`` or ``{"one": {"branches": 2}}``. ``teacher``: a state_dict of
    ``teacher_model`` (default ``model``) for KD, which joins the methods. ``None`` settings take the data's
    :data:`SOURCE_DEFAULTS`; ``limit_train=0``: every training image. ``amp`` (default: on CUDA): bfloat16
    autocast and channels-last tensors. ``jobs``: trainings at once (default: one per CPU core, 1 on a GPU).
    ``isolate``: on a CPU, each training in a fresh process, so that its peak memory is its own (``False``: one
    worker trains in-process, faster to start, and the memory column stays empty).
    ``out``: results, report, curves and state_dicts, and the record of finished trainings that a second call
    resumes from (``None``: nothing saved, nothing resumed).
    """
    chosen = list(methods) if methods else list(COMPARE_METHODS)
    if teacher and "kd" not in [m.lower() for m in chosen]:
        chosen.append("kd")
    recipes = choose_recipes(chosen)
    opts = parse_options(options, recipes) if not isinstance(options, Mapping) else {k: dict(v) for k, v in
                                                                                        options.items()}
    seeds = _seeds(seeds)
    source = resolve_source(data, img_size)
    ds = load_source(source)
    given = dict(model=model, epochs=epochs, batch_size=batch_size, lr=lr, limit_train=limit_train, augment=augment)
    settled = {k: SOURCE_DEFAULTS[source["kind"]][k] if v is None else v for k, v in given.items()}
    model, epochs, batch_size, lr, augment = (settled[k] for k in ("model", "epochs", "batch_size", "lr", "augment"))
    limit = settled["limit_train"] or None  # 0: every training image
    if model is None:
        raise ValueError("--model is needed for a folder of images: a timm or torchvision model name (resnet18, "
                         "convnext_atto, ...) or package.module:callable for your own")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch size must be >= 1, got {epochs} and {batch_size}")
    teacher_spec = {"path": str(Path(teacher).resolve()), "model": teacher_model or model} if teacher else None
    if teacher and not Path(teacher).is_file():
        raise FileNotFoundError(f"--teacher {teacher}: no such file; pass a state_dict saved with "
                                "torch.save(teacher.state_dict(), PATH)")
    _check_recipes(recipes, model, ds, opts, teacher_spec)
    dev = pick_device(device)
    amp = dev.type == "cuda" if amp is None else amp
    n_train = min(limit or len(ds.y_train), len(ds.y_train))
    shared = dict(source=source, model=model, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                  augment=augment, limit_train=limit, amp=amp, channels_last=amp, device_type=dev.type)
    store = RunStore(out, shared) if out else None
    if store is not None:
        store.open()
    out_dir = Path(out).resolve() if out else None
    job_list = make_jobs(
        recipes, seeds, options=opts, device=str(dev), threads=threads, **shared,
        save_as=lambda s: str(out_dir / "state_dicts" / "{stem}_seed{seed}.pt") if out_dir else None)
    for job in job_list:  # the teacher is KD's alone: a later teacher leaves the other trainings resumable
        job["teacher"] = teacher_spec if job["recipe"] == "kd" else None
    done = {(j["recipe"], j["seed"]): r for j in job_list if store and (r := store.finished(j)) is not None}
    todo = [j for j in job_list if (j["recipe"], j["seed"]) not in done]
    workers = jobs or (min(max(1, len(todo)), os.cpu_count() or 1) if dev.type == "cpu" else 1)
    isolate = isolate and dev.type == "cpu"  # CUDA's peak is measured per training in one process
    image = "x".join(map(str, ds.input_size))
    log(f"kdwrap compare: {describe_source(source)} ({n_train:,} train / {len(ds.y_test):,} test images, {image}, "
        f"{ds.num_classes} classes), model {model}, {epochs} epochs, batch {batch_size}, lr {lr}; "
        f"{', '.join(recipes)} x seeds {seeds}: {len(todo)} trainings to run"
        f"{f' ({len(done)} finished before, in {out})' if done else ''}, {workers} at a time on {dev}"
        f"{' (bfloat16 autocast, channels_last)' if amp else ''}")
    start = time.perf_counter()
    saved = torch.get_num_threads()  # the in-process path sets the thread count; give the caller theirs back
    try:
        results = run_jobs(todo, workers, len(todo) * epochs, progress,
                           on_result=store.save if store else None,
                           process_per_job=isolate, measure_memory=isolate or dev.type == "cuda")
    finally:
        torch.set_num_threads(saved)
    wall = time.perf_counter() - start
    results += list(done.values())
    rows = compare_rows(results, seeds, recipes)
    table = format_compare_table(rows)
    verdicts = compare_verdicts(rows)
    by = {(r["recipe"], r["seed"]): r for r in results}
    curves = {row.name: [by[(row.recipe, s)]["curves"][row.name] for s in seeds] for row in rows}
    settings = dict(data=describe_source(source), model=model, image=image, classes=ds.num_classes,
                    train=n_train, test=len(ds.y_test), epochs=epochs, batch_size=batch_size, lr=lr,
                    weight_decay=weight_decay, augment=augment, seeds=seeds, methods=recipes, options=opts,
                    teacher=teacher_spec, device=str(dev), amp=amp, jobs=workers, threads=threads)
    log("")
    log(table)
    log("")
    for line in verdicts:
        log("  " + line)
    files: list[Path] = []
    if out_dir is not None:
        files = write_outputs(out_dir, rows, settings, verdicts, table, curves, wall)
        log("")
        log(f"Report: {Path(out) / 'report.md'}; results, curves and each deployed state_dict under {out}")
    return ComparisonResult(rows, table, verdicts, settings, curves, files)
