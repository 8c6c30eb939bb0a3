"""``python -m kdwrap``: the demo (in-process, tiny settings) and the command line."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdwrap
from kdwrap.__main__ import main

pytest.importorskip("sklearn", reason="scikit-learn is an optional extra: pip install 'kdwrap[demo]'")

ROW_NAMES = ("plain", "ONE", "ONE-E", "OSAKD")
TINY = ["--dataset", "digits", "--epochs", "1", "--limit-train", "256", "--batch-size", "64", "--no-progress"]


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_demo_table_over_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *TINY, "--seeds", "0", "1", "--jobs", "1", "--save-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert tuple(rows) == ROW_NAMES, out
    params = {}
    for name, (mean_std, per_seed, diff, verdict, train_acc, n_params, train_time, size) in rows.items():
        seeds = [float(v) for v in per_seed.split(" / ")]
        assert len(seeds) == 2 and all(0.0 <= v <= 100.0 for v in seeds)
        assert float(mean_std.split(" ± ")[0]) == pytest.approx(sum(seeds) / 2, abs=0.011)  # of rounded values
        if name == "plain":
            assert diff == "(baseline)" and verdict == ""
        else:
            assert re.fullmatch(r"[+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", diff), diff
            assert verdict in ("within noise", "gain beyond noise", "loss beyond noise")
        assert 0.0 <= float(train_acc.rstrip(" %")) <= 100.0
        assert re.fullmatch(r"[\d.]+ s( \(same runs as ONE\))?", train_time), train_time
        params[name] = int(n_params.replace(",", ""))
        assert int(size.split(" B")[0].replace(",", "")) > 4 * params[name]  # float32 weights + pickling
    # the deployed models keep the original architecture; ONE-E holds the trunk, 3 branches and the gate
    assert params["plain"] == params["ONE"] == params["OSAKD"]
    assert params["ONE-E"] > 2 * params["plain"]
    assert {p.name for p in tmp_path.glob("*.pt")} == {"plain.pt", "one.pt", "one_e.pt", "osakd.pt"}
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["seeds"] == [0, 1] and len(results["curves"]["OSAKD"]) == 2
    assert len(results["verdicts"]) == 3 and f"Results: {tmp_path / 'results.json'}" in out
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "curves.png").stat().st_size > 0 and f"Curves: {tmp_path / 'curves.png'}" in out


def test_demo_trains_only_the_chosen_methods_and_always_plain(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *TINY, "--seeds", "0", "--jobs", "1", "--save-dir", str(tmp_path),
                 "--methods", "OSAKD", "--alpha", "0.5"]) == 0
    out = capsys.readouterr().out
    assert tuple(_table_rows(out)) == ("plain", "OSAKD"), out
    assert "OSAKD (k=8, alpha=0.5)" in out and "2 trainings" in out
    assert {p.name for p in tmp_path.glob("*.pt")} == {"plain.pt", "osakd.pt"}
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["methods"] == ["plain", "OSAKD"]


def test_demo_rejects_an_unknown_method() -> None:
    from kdwrap.demo.run import run_demo

    with pytest.raises(ValueError, match=r"unknown demo method\(s\) \['dml'\]; valid: plain, ONE, OSAKD"):
        run_demo(dataset="digits", methods=["dml"], save_dir=None)


def test_demo_parallel_processes_give_the_in_process_results() -> None:
    from kdwrap.demo.run import run_demo

    kw = dict(dataset="digits", epochs=1, limit_train=128, batch_size=32, seeds=[3, 4], threads=1, progress=False,
              save_dir=None, log=lambda s: None)
    serial, parallel = run_demo(jobs=1, **kw), run_demo(jobs=2, **kw)
    assert [r.accuracies for r in serial.rows] == [r.accuracies for r in parallel.rows]
    assert serial.settings["train"] == 128 and serial.settings["model"] == "small_cnn"


def test_one_seed_never_claims_a_difference() -> None:
    from kdwrap.demo.run import run_demo

    res = run_demo(dataset="digits", epochs=1, limit_train=128, batch_size=32, seeds=[0], jobs=1, progress=False,
                   save_dir=None, log=lambda s: None)
    assert all(line.endswith("no verdict (run more seeds)") for line in res.verdicts), res.verdicts
    assert "no interval" in res.table


def test_unreadable_pack_falls_back_to_digits_with_a_warning(tmp_path: Path) -> None:
    from kdwrap.demo.run import run_demo

    lines: list[str] = []
    with pytest.warns(UserWarning, match="could not be read.*missing.npz"):
        res = run_demo(data=str(tmp_path / "missing.npz"), epochs=1, limit_train=64, seeds=[0], jobs=1,
                       progress=False, save_dir=None, log=lines.append)
    assert res.settings["dataset"] == "digits"
    assert any(line.startswith("WARNING: ") and "falling back" in line for line in lines)


def test_resolve_dataset(tmp_path: Path) -> None:
    from kdwrap.demo.run import resolve_dataset

    assert resolve_dataset("digits", None) == "digits"
    assert resolve_dataset("auto", str(tmp_path / "pack.npz")) == "cifar10-pack"
    assert resolve_dataset("auto", str(tmp_path)) == "fashion-mnist"
    assert resolve_dataset("auto", None) == "cifar10-pack"  # the pack the repository ships


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "summary" in out
    assert main([]) == 0  # no command: help, success


def test_unknown_model_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *TINY, "--model", "no_such_net", "--save-dir", ""]) == 2
    assert "unknown model 'no_such_net'" in capsys.readouterr().err


def test_summary_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "cifar_resnet32"]) == 0
    out = capsys.readouterr().out
    assert "layer3" in out and "ONE" in out
    assert main(["summary", "small_cnn", "--method", "osakd", "--input-size", "8"]) == 0
    assert main(["summary", "nope_net"]) == 2


@pytest.mark.parametrize("method", kdwrap.METHODS)
def test_summary_command_takes_every_method(method: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "lenet5", "--method", method]) == 0
    assert f"kdwrap {method}" in capsys.readouterr().out.lower()


def test_summary_help_shows_defaults_and_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["summary", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "{" + ",".join(kdwrap.METHODS) + "}" in out
    assert "(default: one)" in out and "(default: ONE 3, OKDDip 4)" in out and "(default: 2)" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("ONE", "OSAKD", "DML", "OKDDip", "BYOT", "KD"))


def test_summary_refuses_another_methods_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "lenet5", "--method", "osakd", "--branches", "3"]) == 2
    assert "--method osakd reads no --branches (a one/okddip/pcl option)" in capsys.readouterr().err


def test_summary_shows_no_cuda_plan_without_cuda(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["summary", "cifar_resnet20"]) == 0
    execution = next(line for line in capsys.readouterr().out.splitlines() if "execution:" in line)
    assert "sequential on this machine (no CUDA device" in execution and "GFLOP" not in execution


def test_python_dash_m_help() -> None:
    res = subprocess.run([sys.executable, "-m", "kdwrap", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "demo" in res.stdout
