"""A folder of the user's own images, in torchvision's ImageFolder layout, as an in-memory :class:`Dataset`.

::

    PATH/train/<class>/<image>      the training images, one subfolder per class
    PATH/val/<class>/<image>        the images the deployed models are tested on, the same class names

Every image is decoded once to RGB ``uint8`` (grey and palette images are converted) and held in memory, as the
shipped CIFAR-10 pack is: this suits the few thousand to few hundred thousand small images a comparison over seeds
can afford. Images of one size are kept as they are; images of mixed sizes need ``img_size`` (every image resized
to ``img_size`` x ``img_size``). The decoded arrays are cached like the pack's, keyed by the files' names, sizes
and modification times and by ``img_size``, so the trainings of a comparison (each its own process) decode nothing.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .data import Dataset, save_cache, cache_dir

__all__ = ["IMAGE_EXTENSIONS", "SPLITS", "is_image_folder", "load_image_folder"]

# What torchvision's ImageFolder reads (torchvision.datasets.folder.IMG_EXTENSIONS), compared in lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# The two subfolders: the first is trained on, the second tests the deployed models.
SPLITS = ("train", "val")


def is_image_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder with ``train/`` and ``val/`` subfolders."""
    root = Path(path)
    return all((root / split).is_dir() for split in SPLITS)


def _listing(root: Path, split: str) -> dict[str, list[Path]]:
    """``{class name: sorted image files}`` of one split; class folders in sorted order, as ImageFolder's."""
    classes = sorted(d.name for d in (root / split).iterdir() if d.is_dir() and not d.name.startswith("."))
    return {c: sorted(f for f in (root / split / c).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            for c in classes}


def _check_layout(root: Path) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder; pass a folder with train/ and val/ subfolders "
                                "(one subfolder per class in each)")
    missing = [split + "/" for split in SPLITS if not (root / split).is_dir()]
    if missing:
        raise ValueError(
            f"--data {root} has no {' and no '.join(missing)} subfolder: kdwrap compare reads torchvision's "
            "ImageFolder layout split in two, PATH/train/<class>/<image> and PATH/val/<class>/<image>; move a "
            "share of each class's images (a fifth, say) into val/ under the same class name")
    train, val = _listing(root, "train"), _listing(root, "val")
    empty = [f"{split}/{c}" for split, listing in (("train", train), ("val", val)) for c, files in listing.items()
             if not files]
    if empty:
        raise ValueError(f"--data {root}: no images in {', '.join(empty)} (read: {', '.join(IMAGE_EXTENSIONS)}); "
                         "add images or remove the empty class folders")
    if len(train) < 2:
        found = f"one class ({next(iter(train))!r})" if train else "no class subfolders"
        raise ValueError(f"--data {root}: train/ holds {found}; a classifier needs at least two classes, each "
                         "its own subfolder of train/ and val/ (train/cat/..., train/dog/...)")
    foreign = sorted(set(val) - set(train))
    if foreign:
        raise ValueError(f"--data {root}: val/ has classes that train/ lacks: {', '.join(foreign)}; give every "
                         "val/ class training images under the same name in train/, or remove it from val/")
    return train, val


def _cache_key(root: Path, files: list[Path], img_size: int | None) -> str:
    h = hashlib.sha1(f"{root.resolve()}|{img_size}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _decode(files: list[Path], img_size: int | None, root: Path) -> np.ndarray:
    """``N x 3 x H x W`` uint8; every image resized to ``img_size`` square when given, else all of one size."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading an image folder needs Pillow: pip install pillow (or kdwrap[demo])") from e
    images: list[np.ndarray] = []
    first: tuple[tuple[int, int], Path] | None = None
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            if img_size is not None:
                im = im.resize((img_size, img_size), Image.Resampling.BILINEAR)
            elif first is None:
                first = (im.size, f)
            elif im.size != first[0]:
                raise ValueError(
                    f"--data {root}: images of mixed sizes ({first[1].relative_to(root)} is {first[0][0]}x"
                    f"{first[0][1]}, {f.relative_to(root)} is {im.size[0]}x{im.size[1]}); pass --img-size N to "
                    "resize every image to N x N pixels")
            images.append(np.asarray(im))
    return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))


def load_image_folder(path: str | os.PathLike[str], img_size: int | None = None, cache: bool = True) -> Dataset:
    """The images of ``path/train`` and ``path/val`` (class = subfolder name, classes in sorted order) as a
    :class:`Dataset`: ``x`` uint8 ``N x 3 x H x W``, labels int64, ``val`` as the test split.

    Raises ``ValueError`` naming the problem and its fix for: no ``train/`` or ``val/``, fewer than two classes, a
    ``val/`` class that ``train/`` lacks, a class folder with no image, images of mixed sizes without ``img_size``.
    """
    root = Path(path)
    if img_size is not None and img_size < 1:
        raise ValueError(f"--img-size must be >= 1, got {img_size}")
    train, val = _check_layout(root)
    classes = tuple(train)
    label = {c: i for i, c in enumerate(classes)}
    files = {split: [(f, label[c]) for c, fs in listing.items() for f in fs]
             for split, listing in (("train", train), ("val", val))}
    everything = [f for split in SPLITS for f, _ in files[split]]
    cached = cache_dir() / f"image-folder-{_cache_key(root, everything, img_size)}.npz"
    if cache and cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                return Dataset(*(torch.from_numpy(z[k]) for k in ("x_train", "y_train", "x_test", "y_test")),
                               classes)
        except Exception:  # a truncated or foreign file: decode again and overwrite it
            pass
    x = _decode(everything, img_size, root)  # one pass over both splits: one size check for all images
    n_train = len(files["train"])
    arrays = {"x_train": x[:n_train], "y_train": np.asarray([y for _, y in files["train"]], np.int64),
              "x_test": x[n_train:], "y_test": np.asarray([y for _, y in files["val"]], np.int64)}
    if cache:
        save_cache(cached, arrays)
    return Dataset(*(torch.from_numpy(arrays[k]) for k in ("x_train", "y_train", "x_test", "y_test")), classes)
