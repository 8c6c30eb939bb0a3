"""kdwrap.demo.data: offline loaders (digits, Fashion-MNIST idx files, CIFAR-10 JPEG pack) and tensor helpers."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kdwrap.demo import data
from fake_data import write_fake_cifar_pack


# --- digits ---------------------------------------------------------------------------------------------------------

def test_digits_shapes_and_range() -> None:
    pytest.importorskip("sklearn", reason="scikit-learn is an optional extra: pip install 'kdwrap[demo]'")
    x_tr, y_tr, x_te, y_te, classes = data.load_digits()
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert y_tr.shape == (1437,) and y_te.shape == (360,)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert 0.0 <= float(x_tr.min()) and float(x_tr.max()) == 1.0
    assert classes == tuple(str(i) for i in range(10))
    counts = torch.bincount(y_te, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # stratified: 20 % of each class


def test_digits_split_is_deterministic() -> None:
    pytest.importorskip("sklearn", reason="scikit-learn is an optional extra: pip install 'kdwrap[demo]'")
    a, b = data.load_digits(), data.load_digits()
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    c = data.load_digits(seed=1)
    assert not torch.equal(a.y_train, c.y_train)
    # train and test are disjoint and cover the whole dataset
    assert len(a.y_train) + len(a.y_test) == 1797


def test_subset_train_is_stratified_and_seeded() -> None:
    pytest.importorskip("sklearn", reason="scikit-learn is an optional extra: pip install 'kdwrap[demo]'")
    ds = data.load_digits()
    s1, s2 = ds.subset_train(100, seed=3), ds.subset_train(100, seed=3)
    assert len(s1.y_train) == 100 and torch.equal(s1.x_train, s2.x_train)
    assert torch.bincount(s1.y_train, minlength=10).min() >= 9
    assert s1.x_test is ds.x_test
    assert ds.subset_train(None) is ds and ds.subset_train(10**6) is ds


# --- Fashion-MNIST idx files ----------------------------------------------------------------------------------------

def _write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _fake_fashion(root: Path, n_train: int = 6, n_test: int = 4, compress: bool = True) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    y_tr = np.arange(n_train, dtype=np.uint8) % 10
    x_te = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    y_te = (np.arange(n_test, dtype=np.uint8) + 3) % 10
    _write_idx(root / "train-images-idx3-ubyte", x_tr, compress)
    _write_idx(root / "train-labels-idx1-ubyte", y_tr, compress)
    _write_idx(root / "t10k-images-idx3-ubyte", x_te, compress)
    _write_idx(root / "t10k-labels-idx1-ubyte", y_te, compress)
    return x_tr, y_tr, x_te, y_te


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_loader_on_synthetic_idx(tmp_path: Path, compress: bool) -> None:
    x_tr, y_tr, x_te, y_te = _fake_fashion(tmp_path, compress=compress)
    ds = data.load_fashion_mnist(tmp_path)
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert torch.allclose(ds.x_train[:, 0], torch.from_numpy(x_tr).float() / 255)
    assert ds.y_train.tolist() == y_tr.tolist() and ds.y_test.tolist() == y_te.tolist()
    assert len(ds.classes) == 10 and ds.classes[9] == "Ankle boot"
    assert data.load_dataset("fashion-mnist", tmp_path).y_test.tolist() == y_te.tolist()


def test_fashion_mnist_folder_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, _, y_te = _fake_fashion(tmp_path)
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path))
    assert data.load_fashion_mnist().y_test.tolist() == y_te.tolist()
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="absent"):
        data.load_fashion_mnist()


def test_fashion_mnist_missing_files_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path)


def test_fashion_mnist_corrupt_file(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (99).to_bytes(4, "big") + b"\x00\x01")  # header says 99 labels, 2 follow
    with pytest.raises(ValueError, match="header says"):
        data.load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not Path(data.FASHION_MNIST_ROOT, "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist() -> None:
    ds = data.load_fashion_mnist()
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10


# --- CIFAR-10 JPEG pack ---------------------------------------------------------------------------------------------

def test_cifar_pack_loader_and_cache(tmp_path: Path) -> None:
    pytest.importorskip("PIL", reason="pillow is an optional extra: pip install 'kdwrap[demo]'")
    pack = tmp_path / "tiny.npz"
    write_fake_cifar_pack(pack)
    cache = tmp_path / "cache"
    ds = data.load_cifar10_pack(pack, cache_root=cache)
    assert ds.x_train.shape == (3, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (2, 3, 32, 32)
    assert ds.y_train.tolist() == [0, 1, 2] and ds.y_test.tolist() == [1, 0]
    assert ds.classes == ("red", "green", "blue")
    # colours survive JPEG (channel order RGB, layout N x C x H x W)
    means = ds.x_train.float().mean(dim=(2, 3))
    assert means.argmax(1).tolist() == [0, 1, 2]
    assert abs(float(ds.x_test[0].float().mean()) - 200) < 3

    cached = list(cache.glob("tiny-*.npz"))
    assert len(cached) == 1
    again = data.load_cifar10_pack(pack, cache_root=cache)
    assert torch.equal(again.x_train, ds.x_train) and again.classes == ds.classes
    # the cache is what gets read: poison it and see it come back
    with np.load(cached[0]) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["y_test"] = np.array([2, 2], np.int64)
    np.savez(cached[0], **arrays)
    assert data.load_cifar10_pack(pack, cache_root=cache).y_test.tolist() == [2, 2]
    # a changed pack (new mtime) is decoded again
    st = pack.stat()
    os.utime(pack, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert data.load_cifar10_pack(pack, cache_root=cache).y_test.tolist() == [1, 0]
    # no cache: decodes, writes nothing
    fresh = tmp_path / "nocache"
    assert data.load_cifar10_pack(pack, cache=False, cache_root=fresh).y_test.tolist() == [1, 0]
    assert not fresh.exists()


def test_cifar_pack_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    pytest.importorskip("PIL", reason="pillow is an optional extra: pip install 'kdwrap[demo]'")
    pack = tmp_path / "tiny.npz"
    write_fake_cifar_pack(pack)
    cache = tmp_path / "cache"
    data.load_cifar10_pack(pack, cache_root=cache)
    (cached,) = cache.glob("tiny-*.npz")
    cached.write_bytes(b"not an npz")
    assert data.load_cifar10_pack(pack, cache_root=cache).y_train.tolist() == [0, 1, 2]


def test_cifar_pack_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="CIFAR-10 pack not found"):
        data.load_cifar10_pack(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, something=np.zeros(3))
    with pytest.raises(ValueError, match="not a CIFAR-10 JPEG pack"):
        data.load_cifar10_pack(bad, cache=False)


def test_pack_path_is_the_shipped_copy_or_the_environment_variable(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.delenv(data.CIFAR10_PACK_ENV, raising=False)
    shipped = data.cifar10_pack_path()
    assert shipped == Path(__file__).resolve().parents[2] / "data" / "cifar10-jpeg.npz"  # the repository's data/
    assert shipped.is_file(), "the repository ships the CIFAR-10 pack in data/"
    write_fake_cifar_pack(tmp_path / "mine.npz")
    monkeypatch.setenv(data.CIFAR10_PACK_ENV, str(tmp_path / "mine.npz"))
    assert data.cifar10_pack_path() == tmp_path / "mine.npz"
    assert data.load_cifar10_pack(cache=False).y_test.tolist() == [1, 0]  # the default path follows the variable
    monkeypatch.setenv(data.CIFAR10_PACK_ENV, str(tmp_path / "none.npz"))
    with pytest.raises(FileNotFoundError, match=data.CIFAR10_PACK_ENV):
        data.load_cifar10_pack()


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KDWRAP_CACHE", str(tmp_path / "k"))
    assert data.cache_dir() == tmp_path / "k"
    monkeypatch.delenv("KDWRAP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert data.cache_dir() == tmp_path / "x" / "kdwrap"


# --- dispatch -------------------------------------------------------------------------------------------------------

def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        data.load_dataset("mnist")
    for name in ("digits", "fashion-mnist", "cifar10-pack"):
        assert name in str(err.value)


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    pytest.importorskip("sklearn", reason="scikit-learn is an optional extra: pip install 'kdwrap[demo]'")
    assert data.load_dataset("digits").x_train.shape == (1437, 1, 8, 8)
    with pytest.raises(ValueError, match="takes no path"):
        data.load_dataset("digits", tmp_path)
    pack = tmp_path / "p.npz"
    write_fake_cifar_pack(pack)
    assert data.load_dataset("cifar10", pack, cache=False).classes == ("red", "green", "blue")


# --- tensor helpers -------------------------------------------------------------------------------------------------

def test_channel_stats_and_normalize() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 3, 8, 8), generator=g, dtype=torch.uint8)
    mean, std = data.channel_stats(x, chunk=7)
    xf = x.float() / 255
    assert torch.allclose(mean, xf.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(std, xf.std(dim=(0, 2, 3), unbiased=False), atol=1e-5)
    z = data.normalize(x, mean, std)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)


def test_random_crop_flip() -> None:
    x = torch.arange(4 * 2 * 6 * 6, dtype=torch.float32).view(4, 2, 6, 6)
    out = data.random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    again = data.random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    # no padding and no flip is the identity; flip only mirrors
    assert torch.equal(data.random_crop_flip(x, padding=0, flip=False), x)
    flipped = data.random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(1))
    for i in range(4):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    # every crop is a shifted window of the zero-padded image
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(4):
        windows = [padded[i, :, r:r + 6, c:c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)


def test_batches() -> None:
    x, y = torch.arange(10).float(), torch.arange(10)
    got = [yb.tolist() for _, yb in data.batches(x, y, 4)]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(list(data.batches(x, y, 4, drop_last=True))) == 2
    gen = torch.Generator().manual_seed(0)
    shuffled = torch.cat([yb for _, yb in data.batches(x, y, 3, shuffle=True, generator=gen)])
    assert sorted(shuffled.tolist()) == list(range(10))


def test_pillow_and_torchvision_decoders_agree(tmp_path: Path) -> None:
    pytest.importorskip("PIL", reason="pillow is an optional extra: pip install 'kdwrap[demo]'")
    pack = tmp_path / "tiny.npz"
    write_fake_cifar_pack(pack)
    with np.load(pack) as z:
        blob, offsets = z["train_jpeg"], z["train_offsets"]
    assert np.array_equal(data._decode_jpegs(blob, offsets), data._decode_jpegs_pil(blob, offsets))


def test_holdout_moves_a_stratified_split_of_the_training_set_into_the_test_slot() -> None:
    pytest.importorskip("sklearn", reason="scikit-learn is an optional extra: pip install 'kdwrap[demo]'")
    ds = data.load_digits()
    v1, v2 = ds.holdout(200), ds.holdout(200)
    assert len(v1.y_test) == 200 and torch.equal(v1.x_test, v2.x_test)
    assert len(v1.y_train) + len(v1.y_test) == len(ds.y_train)
    assert torch.bincount(v1.y_test, minlength=10).min() >= 18
    # no image is in both halves, and the test set is never read
    train_rows = {tuple(r.tolist()) for r in v1.x_train.flatten(1)}
    assert not any(tuple(r.tolist()) in train_rows for r in v1.x_test.flatten(1))
    assert ds.holdout(None) is ds and ds.holdout(0) is ds
    with pytest.raises(ValueError, match="holdout"):
        ds.holdout(len(ds.y_train))
