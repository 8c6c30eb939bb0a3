"""Where a comparison's images come from: ``--data`` resolved to a source, and a source loaded as a :class:`Dataset`.

========================================  ====================================================================
``--data``                                source
========================================  ====================================================================
not given                                 the CIFAR-10 JPEG pack shipped with kdwrap (``data/cifar10-jpeg.npz``)
a file ending in ``.npz``                 a CIFAR-10 JPEG pack
a folder with ``train/`` and ``val/``     the user's images in ImageFolder layout (:mod:`.image_folder`)
a folder with Fashion-MNIST's idx files   Fashion-MNIST
========================================  ====================================================================

A source is a small dict (``kind``, ``path``, ``img_size``) so that each training process loads the data itself.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from .data import Dataset, load_dataset
from .image_folder import SPLITS, is_image_folder, load_image_folder

__all__ = ["resolve_source", "load_source", "describe_source"]

_FASHION_MNIST_FILE = "train-images-idx3-ubyte"


def _folder_kind(path: Path) -> str:
    if is_image_folder(path):
        return "image-folder"
    if any((path / name).is_file() for name in (_FASHION_MNIST_FILE, _FASHION_MNIST_FILE + ".gz")):
        return "fashion-mnist"
    found = sorted(p.name + "/" for p in path.iterdir() if p.is_dir())[:6]
    raise ValueError(
        f"--data {path} has no {' and no '.join(s + '/' for s in SPLITS if not (path / s).is_dir())} subfolder"
        f"{' (it holds ' + ', '.join(found) + ')' if found else ''}: kdwrap compare reads torchvision's ImageFolder "
        "layout split in two, PATH/train/<class>/<image> and PATH/val/<class>/<image>; move a share of each "
        "class's images (a fifth, say) into val/ under the same class name")


def resolve_source(data: str | os.PathLike[str] | None, img_size: int | None = None) -> dict[str, Any]:
    """``--data`` (and ``--img-size``) as a source dict; errors name the problem and the fix."""
    if data is None:
        kind, path = "cifar10-pack", None
    elif str(data).endswith(".npz"):
        kind, path = "cifar10-pack", str(data)
    elif Path(data).is_dir():
        kind, path = _folder_kind(Path(data)), str(data)
    else:
        raise FileNotFoundError(f"--data {data}: no such folder or .npz file; pass a folder with train/ and val/ "
                                "subfolders (one subfolder per class in each) or a CIFAR-10 pack (.npz)")
    if img_size is not None and kind != "image-folder":
        raise ValueError(f"--img-size resizes the images of an image folder; {kind} images have one size already "
                         "(drop --img-size)")
    return {"kind": kind, "path": path, "img_size": img_size}


# How each kind of source is read.
_LOADERS: dict[str, Callable[[dict[str, Any]], Dataset]] = {
    "image-folder": lambda s: load_image_folder(s["path"], s["img_size"]),
    "cifar10-pack": lambda s: load_dataset("cifar10-pack", s["path"]),
    "fashion-mnist": lambda s: load_dataset("fashion-mnist", s["path"]),
    "digits": lambda s: load_dataset("digits"),
}


def load_source(source: dict[str, Any]) -> Dataset:
    """The dataset of a source dict (:func:`resolve_source`)."""
    return _LOADERS[source["kind"]](source)


def describe_source(source: dict[str, Any]) -> str:
    """``"image-folder PATH"``, ``"cifar10-pack"``, ...: for the log and the report."""
    path = source.get("path")
    return source["kind"] + (f" {path}" if path and source["kind"] == "image-folder" else "")
