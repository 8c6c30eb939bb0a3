"""kdwrap's torch floor is tested: the torch and torchvision that CI's second venv installs (.ci/run) are the oldest
pyproject.toml allows."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _floor(package: str) -> str:
    deps = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf'"{package}>=([0-9.]+)"', deps)
    assert match, f"pyproject.toml has no {package}>= floor"
    return match.group(1)


def _ci_pin(name: str) -> str:
    match = re.search(rf"^{name}=([0-9.]+)$", (ROOT / ".ci" / "run").read_text(), re.M)
    assert match, f".ci/run sets no {name}"
    return match.group(1)


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def test_ci_tests_the_oldest_torch_and_torchvision_that_pyproject_allows():
    assert _minor(_ci_pin("OLDEST_TORCH")) == _minor(_floor("torch"))
    assert _minor(_ci_pin("OLDEST_TORCHVISION")) == _minor(_floor("torchvision"))
