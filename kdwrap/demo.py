"""``kdwrap demo``: train one small classifier three ways (plain, ONE, OSAKD) on an offline dataset, export each
trained model with :func:`kdwrap.export`, and compare the exported (deployed) models on the test set."""
from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import api
from .data import (
    CIFAR10_PACK_DEFAULT,
    FASHION_MNIST_ROOT,
    Dataset,
    batches,
    channel_stats,
    load_dataset,
    normalize,
    random_crop_flip,
)

__all__ = [
    "DEMO_DEFAULTS", "DemoRow", "DemoResult", "resolve_dataset", "create_model", "format_table",
    "run_demo",
]

# Per dataset: what fits in a few minutes on a 2-core CPU (the whole demo, three trainings), and a sensible model.
DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(model="small_cnn", epochs=20, batch_size=64, lr=0.05, limit_train=None, augment=False),
    "fashion-mnist": dict(model="small_cnn", epochs=6, batch_size=64, lr=0.05, limit_train=10000, augment=False),
    # Meant for a GPU; on a CPU pass a small --limit-train.
    "cifar10-pack": dict(model="cifar_resnet20", epochs=15, batch_size=128, lr=0.1, limit_train=None, augment=True),
}


@dataclass
class DemoRow:
    """One line of the demo's table."""

    method: str
    accuracy: float  # test accuracy of the exported model, in %
    params: int  # parameters of the exported model
    train_time: float  # seconds
    export_bytes: int  # bytes of the exported model's saved state_dict
    note: str = ""


@dataclass
class DemoResult:
    """What :func:`run_demo` returns: the rows, the formatted table, and the settings used."""

    rows: list[DemoRow]
    table: str
    settings: dict[str, Any] = field(default_factory=dict)


def resolve_dataset(name: str, data: str | None) -> str:
    """Resolve ``auto``: the CIFAR-10 pack for an ``.npz`` ``data``, Fashion-MNIST when its files are found (in
    ``data`` or Debian's folder), else scikit-learn's digits."""
    if name != "auto":
        return name
    if data is not None:
        return "cifar10-pack" if str(data).endswith(".npz") else "fashion-mnist"
    fm = Path(FASHION_MNIST_ROOT)
    if all((fm / f).is_file() or (fm / f.removesuffix(".gz")).is_file() for f in (
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
    )):
        return "fashion-mnist"
    return "digits"


def create_model(
    name: str, in_chans: int, num_classes: int, input_size: tuple[int, int, int] | None = None
) -> nn.Module:
    """A timm model by name (kdwrap's ``small_cnn`` and ``cifar_resnet*`` included), untrained."""
    import timm

    from . import models as _models  # noqa: F401  (registers kdwrap's models with timm)

    if not timm.is_model(name):
        raise ValueError(
            f"unknown model {name!r}: expected a timm model name (see timm.list_models()) or one of kdwrap's "
            f"{', '.join(_models.TIMM_MODELS)}"
        )
    net = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes)
    cfg = getattr(net, "pretrained_cfg", None)
    if input_size is not None and isinstance(cfg, dict):
        # kdwrap reads input_size to trace the model; make it the demo's image size, not the model's usual one.
        net.pretrained_cfg = {**cfg, "input_size": tuple(input_size)}
    return net


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _threads_note(dev: torch.device) -> str:
    if dev.type != "cpu":
        return ""
    n = torch.get_num_threads()
    return f" ({n} thread{'s' if n != 1 else ''})"


def _state_bytes(model: nn.Module, path: Path | None = None) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getbuffer().nbytes


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prep: Callable[[torch.Tensor], torch.Tensor],
              batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for xb, yb in batches(x, y, batch_size):
        out = model(prep(xb))
        correct += int((out.argmax(1) == yb).sum())
    return 100.0 * correct / max(1, len(y))


def _train(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ds: Dataset,
    prep: Callable[[torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    augment: bool,
    seed: int,
    device: torch.device,
    desc: str,
    progress: bool,
) -> float:
    """SGD (momentum 0.9, Nesterov), cosine learning rate per step; returns the training time in seconds."""
    from tqdm.auto import tqdm

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(ds.y_train) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    # Same data order and augmentation for every method: each method gets fresh generators with the same seed.
    order_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        bar = tqdm(total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{epochs}", leave=False,
                   disable=None if progress else True,  # None: off when stderr is not a terminal
                   unit="step", dynamic_ncols=True)
        for xb, yb in batches(ds.x_train, ds.y_train, batch_size, shuffle=True, generator=order_gen):
            xb = prep(xb)
            if augment:
                xb = random_crop_flip(xb, padding=4, generator=aug_gen)
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            if bar.n % 10 == 0 or bar.n == steps_per_epoch:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:,.2f} MiB"


def format_table(rows: list[DemoRow]) -> str:
    """Render the rows as a Markdown table."""
    header = ["method", "test acc (deployed)", "params", "train time", "exported state_dict"]
    body = [
        [r.method, f"{r.accuracy:.2f} %", f"{r.params:,}", f"{r.train_time:.1f} s" + (f" {r.note}" if r.note else ""),
         f"{r.export_bytes:,} B ({_fmt_bytes(r.export_bytes)})"]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(b) for b in body])


def run_demo(
    dataset: str = "auto",
    data: str | None = None,
    model: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float = 5e-4,
    device: str = "auto",
    seed: int = 0,
    limit_train: int | None = None,
    branches: int = 3,
    k: int = 8,
    alpha: float = 0.9,
    bank_size: int = 16384,
    save_dir: str | None = None,
    threads: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Train ``model`` plain, with ONE (``branches``) and with OSAKD (``k``, ``alpha``, ``bank_size``) from the
    same initial weights and data order; export each, evaluate the exported models, and return the table.

    ``None`` settings take the dataset's :data:`DEMO_DEFAULTS`; ``limit_train=0`` uses the whole training set.
    ``threads``: CPU threads (0: torch's default). One thread by default: results are deterministic for a given
    seed, device and thread count (CPU kernels split sums by thread), and on a shared machine oversubscribed
    OpenMP threads spin-wait for each other (2 threads on 2 busy cores ran the small CNN 5x slower than 1).
    """
    # The demo tunes global torch settings for itself; put them back for the caller (tests run it in-process).
    saved = torch.get_num_threads(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        return _run_demo(dataset, data, model, epochs, batch_size, lr, weight_decay, device, seed, limit_train,
                         branches, k, alpha, bank_size, save_dir, threads, progress, log)
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]


def _run_demo(
    dataset: str, data: str | None, model: str | None, epochs: int | None, batch_size: int | None,
    lr: float | None, weight_decay: float, device: str, seed: int, limit_train: int | None, branches: int, k: int,
    alpha: float, bank_size: int, save_dir: str | None, threads: int, progress: bool, log: Callable[[str], None],
) -> DemoResult:
    name = resolve_dataset(dataset, data)
    if name not in DEMO_DEFAULTS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: auto, {', '.join(DEMO_DEFAULTS)}")
    d = DEMO_DEFAULTS[name]
    model = model or d["model"]
    epochs = d["epochs"] if epochs is None else epochs
    batch_size = batch_size or d["batch_size"]
    lr = d["lr"] if lr is None else lr
    limit = d["limit_train"] if limit_train is None else (limit_train or None)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch size must be >= 1, got {epochs} and {batch_size}")
    dev = _pick_device(device)
    if dev.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    if dev.type == "cuda":
        # Deterministic cuDNN kernels, so two runs with one seed give the same table.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    path = data if data is not None else (CIFAR10_PACK_DEFAULT if name == "cifar10-pack" else None)
    ds_full = load_dataset(name, path)
    ds = ds_full.subset_train(limit, seed=seed)
    mean, std = channel_stats(ds.x_train)
    ds = Dataset(ds.x_train.to(dev), ds.y_train.to(dev), ds.x_test.to(dev), ds.y_test.to(dev), ds.classes)

    def prep(x: torch.Tensor) -> torch.Tensor:
        return normalize(x, mean, std)

    in_chans, num_classes = ds.input_size[0], ds.num_classes
    settings = dict(dataset=name, model=model, epochs=epochs, batch_size=batch_size, lr=lr,
                    weight_decay=weight_decay, device=str(dev), seed=seed, train=len(ds.y_train),
                    test=len(ds.y_test), threads=torch.get_num_threads() if dev.type == "cpu" else None,
                    augment=d["augment"], branches=branches, k=k, alpha=alpha, bank_size=bank_size)
    log(f"kdwrap demo: {name} ({len(ds.y_train):,} train / {len(ds.y_test):,} test images, "
        f"{'x'.join(map(str, ds.input_size))}, {num_classes} classes), model {model}, {epochs} epochs, "
        f"batch {batch_size}, SGD nesterov lr {lr} cosine, wd {weight_decay}, device {dev}"
        f"{_threads_note(dev)}, seed {seed}")
    out_dir = Path(save_dir) if save_dir else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    def fresh_net() -> nn.Module:
        torch.manual_seed(seed)  # every method starts from the same weights
        return create_model(model, in_chans, num_classes, ds.input_size).to(dev)

    train_kw = dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, augment=d["augment"],
                    seed=seed, device=dev, progress=progress)
    rows: list[DemoRow] = []

    def add_row(method: str, deployed: nn.Module, seconds: float, file: str, note: str = "") -> None:
        deployed = deployed.to(dev)
        acc = _accuracy(deployed, ds.x_test, ds.y_test, prep)
        nbytes = _state_bytes(deployed, out_dir / file if out_dir else None)
        params = sum(p.numel() for p in deployed.parameters())
        rows.append(DemoRow(method, acc, params, seconds, nbytes, note))
        log(f"  {method:<26} test acc {acc:6.2f} %  ({seconds:.1f} s)")

    # Plain training: the baseline every KD method is compared with.
    net = fresh_net()
    secs = _train(net, F.cross_entropy, ds, prep, desc="plain", **train_kw)
    add_row("plain", net, secs, "plain.pt")

    # ONE and OSAKD run the same loop; only the model and the loss come from kdwrap.
    wrapped, loss_fn = api.one(fresh_net(), branches=branches)
    secs = _train(wrapped, loss_fn, ds, prep, desc="ONE", **train_kw)
    add_row("ONE (branch 0)", api.export(wrapped), secs, "one_branch0.pt")
    add_row(f"ONE-E ({branches}-branch ensemble)", api.export(wrapped, ensemble=True), secs, "one_ensemble.pt",
            note="(same run)")

    wrapped, loss_fn = api.osakd(fresh_net(), k=k, alpha=alpha, bank_size=bank_size)
    secs = _train(wrapped, loss_fn, ds, prep, desc="OSAKD", **train_kw)
    add_row(f"OSAKD (k={k})", api.export(wrapped), secs, "osakd.pt")

    table = format_table(rows)
    log("")
    log(table)
    log("")
    log("Accuracies are of the exported models (kdwrap.export): one branch for ONE, the gated ensemble of all "
        "branches for ONE-E (trained in the same run), the original architecture for plain and OSAKD.")
    if out_dir is not None:
        log(f"Exported state_dicts saved in {out_dir}{os.sep}")
    return DemoResult(rows, table, settings)
