"""One training of a comparison: a (recipe, seed) job trained, its deployed models exported, evaluated and saved.

Every job of a seed starts from the same initial weights (``torch.manual_seed(seed)`` before the network is built)
and sees the same data order and augmentation (generators seeded from ``seed``), whatever the recipe: differences
between recipes of one seed are the recipes'. SGD with Nesterov momentum 0.9 and a cosine learning rate per step.
On a GPU a job may run in bfloat16 autocast (no loss scaling needed) with channels-last tensors.
"""
from __future__ import annotations

import contextlib
import io
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .data import Dataset, random_crop_flip
from .networks import create_model
from .recipes import Trainee, build_trainee
from .sources import load_source
from .tensors import batches, channel_stats, normalize

__all__ = ["train_job", "load_teacher"]


def _autocast(device: torch.device, amp: bool) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def _state_bytes(model: nn.Module, path: Path | None = None) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getbuffer().nbytes


@torch.no_grad()
def _accuracy(forward: Callable[[torch.Tensor], torch.Tensor], modules: Iterable[nn.Module], x: torch.Tensor,
              y: torch.Tensor, prep: Callable[[torch.Tensor], torch.Tensor], amp: bool = False,
              batch_size: int = 1000) -> float:
    for m in modules:
        m.eval()
    correct = 0
    for xb, yb in batches(x, y, batch_size):
        with _autocast(xb.device, amp):
            correct += int((forward(prep(xb)).argmax(1) == yb).sum())
    return 100.0 * correct / max(1, len(y))


def _train(trainee: Trainee, ds: Dataset, prep: Callable[[torch.Tensor], torch.Tensor], *, epochs: int,
           batch_size: int, lr: float, weight_decay: float, augment: bool, seed: int, device: torch.device,
           amp: bool, on_epoch: Callable[[int, float, dict[str, float]], None]) -> float:
    """Train ``trainee``; ``on_epoch(epoch, train_acc, {row: test_acc})`` after each epoch. Returns the training
    time in seconds (evaluation excluded)."""
    model, loss_fn = trainee.model, trainee.loss_fn
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(ds.y_train) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    # Same data order and augmentation for every recipe: each gets fresh generators with the same seed.
    order_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    seconds = 0.0
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        correct = torch.zeros((), dtype=torch.long, device=device)
        for xb, yb in batches(ds.x_train, ds.y_train, batch_size, shuffle=True, generator=order_gen):
            xb = prep(xb)
            if augment:
                xb = random_crop_flip(xb, padding=4, generator=aug_gen)
            with _autocast(device, amp):
                logits = model(xb)
                loss = loss_fn(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if trainee.after_step is not None:
                trainee.after_step()
            correct += (logits.detach().argmax(1) == yb).sum()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        tests = {row: _accuracy(fn, trainee.eval_modules, ds.x_test, ds.y_test, prep, amp)
                 for row, fn in trainee.evaluators.items()}
        on_epoch(epoch + 1, 100.0 * correct.item() / len(ds.y_train), tests)
    return seconds


def load_teacher(teacher: dict[str, Any], ds: Dataset) -> nn.Module:
    """KD's frozen teacher: ``teacher["model"]`` built for ``ds`` and loaded from the state_dict ``teacher["path"]``."""
    net = create_model(teacher["model"], ds.input_size[0], ds.num_classes, ds.input_size)
    state = torch.load(teacher["path"], map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[:2])[:300]  # torch's list of keys is long
        raise ValueError(f"--teacher {teacher['path']} does not fit --teacher-model {teacher['model']} with "
                         f"{ds.num_classes} classes ({detail}); name the teacher's architecture with "
                         "--teacher-model") from e
    return net.eval()


def _peak_memory(device: torch.device) -> int:
    """Bytes: CUDA memory allocated at the peak of training, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, in KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def train_job(job: dict[str, Any], progress: Any = None) -> dict[str, Any]:
    """One (recipe, seed) training: load the data, train, export, evaluate, save. Runs in a worker process or
    in-process; ``progress.put(1)`` after each epoch."""
    dev = torch.device(job["device"])
    if dev.type == "cpu" and job["threads"] > 0:
        torch.set_num_threads(job["threads"])
    if dev.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        torch.cuda.reset_peak_memory_stats(dev)
    ds = load_source(job["source"]).subset_train(job["limit_train"], seed=0)  # one subset: seeds vary training only
    mean, std = (t.to(dev) for t in channel_stats(ds.x_train))
    ds = Dataset(ds.x_train.to(dev), ds.y_train.to(dev), ds.x_test.to(dev), ds.y_test.to(dev), ds.classes)
    channels_last = job.get("channels_last", False)

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = normalize(x, mean, std)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    teacher = load_teacher(job["teacher"], ds).to(dev) if job["recipe"] == "kd" else None
    torch.manual_seed(job["seed"])  # every recipe starts from the same weights for a seed
    net = create_model(job["model"], ds.input_size[0], ds.num_classes, ds.input_size).to(dev)
    trainee = build_trainee(job["recipe"], net, job["options"], teacher)
    trainee.model.to(dev)
    if channels_last:
        trainee.model.to(memory_format=torch.channels_last)
    params_trained = sum(p.numel() for p in trainee.model.parameters() if p.requires_grad)
    if not job.get("curve_every_row", True):
        # the demo's curves are its methods' alone: an epoch's test of ONE-E would cost more than ONE's own
        trainee.evaluators = dict([next(iter(trainee.evaluators.items()))])
    curves: dict[str, list[float]] = {row: [] for row in trainee.evaluators}
    train_accs: list[float] = []

    def on_epoch(epoch: int, train_acc: float, tests: dict[str, float]) -> None:
        for row, acc in tests.items():
            curves[row].append(acc)
        train_accs.append(train_acc)
        if progress is not None:
            progress.put(1)

    amp = job.get("amp", False)
    seconds = _train(trainee, ds, prep, on_epoch=on_epoch, seed=job["seed"], device=dev, amp=amp,
                     **{k: job[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "augment")})
    steps = job["epochs"] * math.ceil(len(ds.y_train) / job["batch_size"])
    out = {"recipe": job["recipe"], "method": next(iter(curves)), "seed": job["seed"], "seconds": seconds,
           "step_seconds": seconds / steps,
           "peak_memory": _peak_memory(dev) if job.get("measure_memory", True) else None,
           "params_trained": params_trained,
           "curve": next(iter(curves.values())), "curves": curves, "train_acc": train_accs[-1], "models": {}}
    for name, m in trainee.exports().items():
        m = m.to(dev)
        stem = name.lower().replace("-", "_")
        file = Path(job["save_as"].format(name=name, stem=stem, seed=job["seed"])) if job.get("save_as") else None
        out["models"][name] = {"accuracy": _accuracy(m, [m], ds.x_test, ds.y_test, prep, amp),
                               "params": sum(p.numel() for p in m.parameters()), "bytes": _state_bytes(m, file),
                               "file": str(file) if file else None}
    return out
