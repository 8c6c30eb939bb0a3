"""``python -m kdwrap``: the demo (in-process, tiny settings) and the command line."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kdwrap.__main__ import main

pytest.importorskip("sklearn")

ROW_NAMES = ("plain", "ONE (branch 0)", "ONE-E (3-branch ensemble)", "OSAKD (k=8)")


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_demo_digits_one_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--dataset", "digits", "--epochs", "1", "--limit-train", "256", "--batch-size", "64",
            "--no-progress", "--save-dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert tuple(rows) == ROW_NAMES, out
    params = {}
    for name, (acc, n_params, train_time, size) in rows.items():
        assert 0.0 <= float(acc.rstrip(" %")) <= 100.0
        assert re.fullmatch(r"[\d.]+ s( \(same run\))?", train_time), train_time
        params[name] = int(n_params.replace(",", ""))
        nbytes = int(size.split(" B")[0].replace(",", ""))
        assert nbytes > 4 * params[name]  # float32 weights, plus pickling overhead
    # the deployed models keep the original architecture; ONE-E holds the trunk, 3 branches and the gate
    assert params["plain"] == params["ONE (branch 0)"] == params["OSAKD (k=8)"]
    assert params["ONE-E (3-branch ensemble)"] > 2 * params["plain"]
    files = {p.name: p.stat().st_size for p in tmp_path.glob("*.pt")}
    assert set(files) == {"plain.pt", "one_branch0.pt", "one_ensemble.pt", "osakd.pt"}
    assert files["plain.pt"] == int(rows["plain"][3].split(" B")[0].replace(",", ""))
    assert files["one_branch0.pt"] == files["plain.pt"]  # same architecture, same keys


def test_demo_is_deterministic() -> None:
    from kdwrap.demo import run_demo

    kw = dict(dataset="digits", epochs=1, limit_train=128, batch_size=32, threads=1, progress=False,
              log=lambda s: None)
    a, b = run_demo(**kw), run_demo(**kw)
    assert [r.accuracy for r in a.rows] == [r.accuracy for r in b.rows]
    assert a.settings["train"] == 128 and a.settings["model"] == "small_cnn"


def test_resolve_dataset(tmp_path: Path) -> None:
    from kdwrap.demo import resolve_dataset

    assert resolve_dataset("digits", None) == "digits"
    assert resolve_dataset("auto", str(tmp_path / "pack.npz")) == "cifar10-pack"
    assert resolve_dataset("auto", str(tmp_path)) == "fashion-mnist"
    assert resolve_dataset("auto", None) in ("digits", "fashion-mnist")


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "summary" in out
    assert main([]) == 0  # no command: help, success


def test_unknown_model_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dataset", "digits", "--model", "no_such_net", "--epochs", "1", "--no-progress"]) == 2
    assert "unknown model 'no_such_net'" in capsys.readouterr().err


def test_summary_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "cifar_resnet32"]) == 0
    out = capsys.readouterr().out
    assert "layer3" in out and "ONE" in out
    assert main(["summary", "small_cnn", "--method", "osakd", "--input-size", "8"]) == 0
    assert main(["summary", "nope_net"]) == 2


def test_python_dash_m_help() -> None:
    res = subprocess.run([sys.executable, "-m", "kdwrap", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "demo" in res.stdout
