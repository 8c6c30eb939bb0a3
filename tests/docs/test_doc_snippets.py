"""Every Python block of README.md and docs/ runs, so a snippet that breaks on copy-paste fails CI.

The blocks of a page run in order in one namespace, as a reader follows the page. The names the docs use as
placeholders for the reader's own objects come from :func:`placeholders`. A block whose first line is
``# torchrun ...`` is a complete distributed program: it runs under ``torchrun --nproc-per-node 2`` on the CPU.
docs/api.md is left out: its blocks are signatures generated from the code (tests/docs/test_docs.py checks them).
"""
from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "api.md")]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_TORCHRUN = re.compile(r"#\s*torchrun\s+--nproc-per-node[ =](\d+)")


def placeholders() -> dict[str, Any]:
    """What the docs' placeholder names stand for: ``net`` (the reader's model: a small timm ResNet for 10
    classes), ``make_net()`` (a function that builds a fresh one), ``loader`` (two batches of random 32x32 images),
    ``x, y`` (one such batch)."""
    def make_net() -> torch.nn.Module:
        return timm.create_model("resnet18", pretrained=False, num_classes=10)

    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    x, y = loader[0]
    return {"net": make_net(), "make_net": make_net, "loader": loader, "x": x, "y": y}


def blocks(page: Path) -> list[str]:
    return _BLOCK.findall(page.read_text())


def test_every_page_with_code_is_collected():
    pages = {p.name for p in PAGES if blocks(p)}
    assert {"README.md", "index.md", "one.md", "osakd.md", "training.md"} <= pages


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # snippets save checkpoints to the working directory
    # Inductor takes minutes to compile on a small CPU; the eager backend still traces the wrapper with dynamo.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    namespace = {"__name__": "__doc_snippet__", **placeholders()}
    # A snippet may set torch's global thread count, as a user's script does; later tests must not inherit it
    # (losses that must be bit-exact across processes depend on it).
    threads = torch.get_num_threads()
    try:
        for i, code in enumerate(blocks(page), 1):
            where = f"{page.relative_to(ROOT)}, Python block {i}"
            torchrun = _TORCHRUN.match(code)
            if torchrun:
                script = tmp_path / f"block{i}.py"
                script.write_text(code)
                out = subprocess.run(
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                     torchrun.group(1), str(script)],
                    capture_output=True, text=True, timeout=600, cwd=tmp_path,
                )
                assert out.returncode == 0, f"{where} failed under torchrun:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
                continue
            try:
                exec(compile(code, where, "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"{where} raised {type(err).__name__}: {err}\n---\n{code}") from err
    finally:
        torch.set_num_threads(threads)
