"""A three-image CIFAR-10-style JPEG pack, for the loaders and the examples that read one."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def _jpeg(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_fake_cifar_pack(path: Path) -> None:
    train = [_jpeg((255, 0, 0)), _jpeg((0, 255, 0)), _jpeg((0, 0, 255))]
    test = [_jpeg((200, 200, 200)), _jpeg((10, 10, 10))]

    def concat(files: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        offsets = np.cumsum([0] + [len(f) for f in files]).astype(np.int64)
        return np.frombuffer(b"".join(files), np.uint8), offsets

    train_jpeg, train_offsets = concat(train)
    test_jpeg, test_offsets = concat(test)
    np.savez(
        path, classes=np.array(["red", "green", "blue"]), train_jpeg=train_jpeg, train_offsets=train_offsets,
        y_train=np.array([0, 1, 2], np.int64), test_jpeg=test_jpeg, test_offsets=test_offsets,
        y_test=np.array([1, 0], np.int64),
    )
