"""Offline image-classification datasets and small tensor helpers for kdwrap's demo, examples and benchmarks.

Every loader returns a :class:`Dataset` (a named tuple ``x_train, y_train, x_test, y_test, classes``) of in-memory
tensors; nothing is downloaded. Images are ``N x C x H x W``; labels are int64.

* ``digits`` - scikit-learn's bundled 8x8 digits (1,797 images), float in [0, 1].
* ``fashion-mnist`` - the official idx files of Debian's ``dataset-fashion-mnist`` package, float in [0, 1].
* ``cifar10-pack`` - the CIFAR-10 JPEG pack (``cifar10-jpeg.npz``), uint8 (decoded once, then cached).

A folder of the user's own images is read by :mod:`kdwrap.demo.image_folder`; the tensor helpers (``to_float``,
``channel_stats``, ``normalize``, ``batches``) live in :mod:`kdwrap.demo.tensors` and are named here too.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from ..augment import random_crop_flip  # the crop-and-flip PCL's peers' views use too
# The tensor helpers live in their own module; named here too, where the examples and benchmarks import them.
from .tensors import batches, channel_stats, normalize, to_float

__all__ = [
    "Dataset",
    "DATASETS",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_ENV",
    "CIFAR10_PACK_ENV",
    "cifar10_pack_path",
    "load_digits",
    "load_fashion_mnist",
    "load_cifar10_pack",
    "load_dataset",
    "cache_dir",
    "to_float",
    "channel_stats",
    "normalize",
    "random_crop_flip",
    "batches",
]

# Where Debian's dataset-fashion-mnist package installs the files; the environment variable points elsewhere.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "KDWRAP_FASHION_MNIST"
# The pack ships with the repository (data/cifar10-jpeg.npz beside the kdwrap package of a clone or editable
# install); the environment variable points elsewhere, e.g. for a wheel install.
CIFAR10_PACK_ENV = "KDWRAP_CIFAR10_PACK"
_SHIPPED_PACK = Path(__file__).resolve().parents[2] / "data" / "cifar10-jpeg.npz"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class Dataset(NamedTuple):
    """An in-memory train/test split. Unpacks as ``x_train, y_train, x_test, y_test, classes``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def subset_train(self, n: int | None, seed: int = 0) -> "Dataset":
        """The same dataset with a seeded, class-stratified random subset of ``n`` training images."""
        if n is None or n >= len(self.y_train):
            return self
        if n < 1:
            raise ValueError(f"subset size must be >= 1, got {n}")
        idx = _stratified_subset(self.y_train, n, seed)
        return self._replace(x_train=self.x_train[idx], y_train=self.y_train[idx])

    def holdout(self, n: int | None, seed: int = 0) -> "Dataset":
        """The training set split in two: a seeded, class-stratified ``n`` of its images become the test set
        (a validation split, for choosing settings without looking at the test set), the rest stay for training."""
        if not n:
            return self
        if not 0 < n < len(self.y_train):
            raise ValueError(f"holdout must be between 1 and {len(self.y_train) - 1} images, got {n}")
        held = _stratified_subset(self.y_train, n, seed)
        keep = torch.ones(len(self.y_train), dtype=torch.bool)
        keep[held] = False
        return self._replace(x_train=self.x_train[keep], y_train=self.y_train[keep],
                             x_test=self.x_train[held], y_test=self.y_train[held])


def _stratified_subset(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    # Stratified so that tiny subsets (tests, --limit-train) still contain every class in its original proportion.
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    ys = y[perm]
    order = torch.argsort(ys, stable=True)  # group by class, random order within a class
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(y))
    counts = torch.bincount(ys)
    starts = torch.cumsum(counts, 0) - counts
    # Position of each sample within its class, as a fraction: taking the smallest fractions keeps proportions.
    frac = (ranks - starts[ys]).double() / counts[ys].double()
    keep = torch.argsort(frac, stable=True)[:n]
    return perm[keep].sort().values


# --- scikit-learn digits --------------------------------------------------------------------------------------------

def load_digits(test_size: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits: 1,797 grey images, 10 classes, no download.

    A seeded, stratified train/test split (80/20 by default: 1,437 / 360 images); images ``N x 1 x 8 x 8`` float32
    in [0, 1] (the raw values are 0..16).
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits dataset comes with scikit-learn; install it with `pip install scikit-learn` "
            "(or `pip install kdwrap[demo]`)"
        ) from e
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    bunch = _sk_load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return Dataset(
        torch.from_numpy(np.ascontiguousarray(x_tr)), torch.from_numpy(y_tr),
        torch.from_numpy(np.ascontiguousarray(x_te)), torch.from_numpy(y_te),
        tuple(str(c) for c in bunch.target_names),
    )


# --- Fashion-MNIST --------------------------------------------------------------------------------------------------

_FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _find_idx_file(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (the MNIST format: big-endian magic, dimension sizes, then raw data), gzipped or not."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown idx element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = tuple(int(v) for v in np.frombuffer(data, ">i4", count=ndim, offset=4))
    dtype = np.dtype(dtypes[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    offset = 4 + 4 * ndim
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes) but {len(data) - offset} bytes follow")
    return np.frombuffer(data, dtype, offset=offset).reshape(shape)


def load_fashion_mnist(root: str | os.PathLike[str] | None = None) -> Dataset:
    """Fashion-MNIST from the four official idx files in ``root`` (gzipped or not): 60,000 / 10,000 images,
    ``N x 1 x 28 x 28`` float32 in [0, 1], 10 classes.

    The default ``root`` is ``$KDWRAP_FASHION_MNIST``, else where Debian's ``dataset-fashion-mnist`` package
    installs them (:data:`FASHION_MNIST_ROOT`).
    """
    root = Path(root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_ROOT)
    paths = {key: _find_idx_file(root, stem) for key, stem in _FASHION_FILES.items()}
    missing = [_FASHION_FILES[k] + ".gz" for k, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found in {root}: missing {', '.join(missing)}. Install them with "
            "`apt-get update && apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu; files go to "
            f"{FASHION_MNIST_ROOT}), or pass the folder that holds the four official idx(.gz) files (or set "
            f"{FASHION_MNIST_ENV}=FOLDER)"
        )
    arrays = {k: _read_idx(p) for k, p in paths.items()}  # type: ignore[arg-type]
    for split in ("train", "test"):
        x, y = arrays["x_" + split], arrays["y_" + split]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"Fashion-MNIST {split} files in {root} are inconsistent: images {x.shape}, labels {y.shape}"
            )

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Dataset(
        images(arrays["x_train"]), labels(arrays["y_train"]),
        images(arrays["x_test"]), labels(arrays["y_test"]),
        FASHION_MNIST_CLASSES,
    )


# --- CIFAR-10 JPEG pack ---------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """kdwrap's cache folder: ``$KDWRAP_CACHE``, else ``$XDG_CACHE_HOME/kdwrap``, else ``~/.cache/kdwrap``."""
    if os.environ.get("KDWRAP_CACHE"):
        return Path(os.environ["KDWRAP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kdwrap"


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Decode the concatenated JPEG files ``blob[offsets[i]:offsets[i+1]]`` into an ``N x 3 x H x W`` uint8 array."""
    n = len(offsets) - 1
    if n <= 0:
        return np.zeros((0, 3, 32, 32), np.uint8)
    try:
        # torchvision decodes about 3x faster than Pillow; it deprecated its image codecs in 0.29 (for torchcodec)
        # but still ships them, so use them while they exist and fall back to Pillow once they are gone.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg

            buf = torch.from_numpy(np.ascontiguousarray(blob))
            out: list[torch.Tensor] = []
            step = 4096  # batches bound the peak memory of the list of decoded tensors
            for s in range(0, n, step):
                chunk = [buf[int(offsets[i]):int(offsets[i + 1])] for i in range(s, min(n, s + step))]
                out.extend(decode_jpeg(chunk, mode=ImageReadMode.RGB))
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - no torchvision JPEG decoder
        return _decode_jpegs_pil(blob, offsets)
    first = tuple(out[0].shape)
    if any(tuple(t.shape) != first for t in out):
        raise ValueError(f"the pack's images have different sizes ({first} and others); expected one size")
    return torch.stack(out).numpy()


def _decode_jpegs_pil(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    import io

    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("decoding the CIFAR-10 pack needs torchvision's JPEG decoder or Pillow "
                          "(`pip install pillow`)") from e
    imgs = [
        np.asarray(Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
        for i in range(len(offsets) - 1)
    ]
    return np.ascontiguousarray(np.stack(imgs).transpose(0, 3, 1, 2))


def cifar10_pack_path() -> Path:
    """Where the CIFAR-10 pack is read from by default: ``$KDWRAP_CIFAR10_PACK``, else the copy shipped in the
    repository (``data/cifar10-jpeg.npz``)."""
    return Path(os.environ.get(CIFAR10_PACK_ENV) or _SHIPPED_PACK)


def load_cifar10_pack(
    path: str | os.PathLike[str] | None = None,
    cache: bool = True,
    cache_root: str | os.PathLike[str] | None = None,
) -> Dataset:
    """CIFAR-10 from the JPEG pack (``cifar10-jpeg.npz``: ``classes``, ``{train,test}_jpeg``,
    ``{train,test}_offsets``, ``y_{train,test}``): images ``N x 3 x 32 x 32`` **uint8**, labels int64.

    ``path``: default :func:`cifar10_pack_path`. Decoding takes a few seconds, so the decoded arrays are cached in
    ``cache_root`` (default :func:`cache_dir`), keyed by the pack's path, size and modification time;
    ``cache=False`` always decodes. Samples keep the pack's
    order (sorted by class): shuffle before splitting. Use :func:`to_float` and :func:`normalize` before training.
    """
    path = Path(path) if path is not None else cifar10_pack_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 pack not found: {path}. It ships with kdwrap's repository as data/cifar10-jpeg.npz: pass "
            f"its path (--data PATH) or set {CIFAR10_PACK_ENV}=PATH"
        )
    st = path.stat()
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    cached = Path(cache_root or cache_dir()) / f"{path.stem}-{key}-{st.st_size}-{st.st_mtime_ns}.npz"
    arrays: dict[str, np.ndarray] | None = None
    if cache and cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception:  # a truncated or foreign file: decode again and overwrite it
            arrays = None
    if arrays is None:
        with np.load(path, allow_pickle=False) as z:
            needed = ["classes", "train_jpeg", "train_offsets", "y_train", "test_jpeg", "test_offsets", "y_test"]
            absent = [k for k in needed if k not in z.files]
            if absent:
                raise ValueError(f"{path} is not a CIFAR-10 JPEG pack: arrays {', '.join(absent)} are missing")
            arrays = {
                "x_train": _decode_jpegs(z["train_jpeg"], z["train_offsets"]),
                "y_train": z["y_train"].astype(np.int64),
                "x_test": _decode_jpegs(z["test_jpeg"], z["test_offsets"]),
                "y_test": z["y_test"].astype(np.int64),
                "classes": np.asarray([str(c) for c in z["classes"]]),
            }
        for split in ("train", "test"):
            if len(arrays["x_" + split]) != len(arrays["y_" + split]):
                raise ValueError(f"{path}: {split} has {len(arrays['x_' + split])} images but "
                                 f"{len(arrays['y_' + split])} labels")
        if cache:
            save_cache(cached, arrays)
    return Dataset(
        torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"]),
        torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"]),
        tuple(str(c) for c in arrays["classes"]),
    )


def save_cache(target: Path, arrays: dict[str, np.ndarray]) -> None:
    # Written to a temporary file and renamed, so a concurrent reader never sees half a file; a read-only or full
    # cache folder only costs the next call another decode.
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


# --- dispatch -------------------------------------------------------------------------------------------------------

DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "fashion-mnist": load_fashion_mnist,
    "cifar10-pack": load_cifar10_pack,
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar10": "cifar10-pack",
            "cifar10_pack": "cifar10-pack"}


def load_dataset(name: str, path: str | os.PathLike[str] | None = None, **kwargs: Any) -> Dataset:
    """Load a dataset by name (one of :data:`DATASETS`). ``path``: the Fashion-MNIST folder or the CIFAR-10 pack
    file (each has a default); other ``kwargs`` go to the loader."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if path is not None:
        if key == "digits":
            raise ValueError("the digits dataset is bundled with scikit-learn and takes no path")
        kwargs["root" if key == "fashion-mnist" else "path"] = path
    return DATASETS[key](**kwargs)
