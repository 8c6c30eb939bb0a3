"""benchmarks/speed_targets.py: the verdicts on the speed targets drawn from speed.py's JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import speed_targets  # noqa: E402


def _row(model: str, variant: str, ms: float, iqr: float = 0.5, peak: float | None = 2.0,
         plan: str | None = None, compiled: bool = False) -> dict:
    return {"model": model, "variant": variant, "step_ms": ms, "step_ms_iqr": iqr, "peak_gib": peak,
            "compiled": compiled, "execution": None if plan is None else {"setting": "auto", "plan": plan}}


def _write(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"meta": {}, "results": rows}))
    return path


def _verdicts(tmp_path: Path, rows: list[dict]) -> dict[tuple[str, int, str], str]:
    out = speed_targets.check(speed_targets.load_rows([_write(tmp_path, "speed_x.json", rows)]))
    return {(v["model"], v["branches"], v["target"]): v["verdict"] for v in out}


def test_met_and_missed_targets(tmp_path: Path) -> None:
    rows = [
        _row("cifar_resnet32", "plain", 10.0),
        _row("cifar_resnet32", "ONE m=3 auto", 12.4, plan="fused", peak=2.1),       # 1.24x: met
        _row("cifar_resnet32", "ONE m=3 sequential", 18.0, peak=2.0),
        _row("cifar_resnet32", "ONE m=3 fused", 12.3, peak=2.3),                    # +15 % memory: missed
        _row("resnet50", "plain", 100.0),
        _row("resnet50", "ONE m=3 auto", 125.0, iqr=1.0, plan="fused"),             # 1.25x > 1.20x: missed
        _row("resnet50", "ONE m=3 sequential", 120.0, iqr=2.0),                     # auto 5 ms slower > 2 ms spread
    ]
    v = _verdicts(tmp_path, rows)
    assert v[("cifar_resnet32", 3, "auto <= 1.25x plain")] == "met"
    assert v[("cifar_resnet32", 3, "auto <= sequential + spread")] == "met"
    assert v[("cifar_resnet32", 3, "auto peak <= sequential + 10%")] == "met"
    assert v[("cifar_resnet32", 3, "fused peak <= sequential + 10%")] == "missed"
    assert v[("resnet50", 3, "auto <= 1.20x plain")] == "missed"
    assert v[("resnet50", 3, "auto <= sequential + spread")] == "missed"


def test_absent_rows_are_never_met_and_the_exit_code_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    no_auto = [_row("cifar_resnet32", "plain", 10.0), _row("cifar_resnet32", "ONE m=3 sequential", 18.0, peak=None)]
    v = _verdicts(tmp_path, no_auto)
    assert v[("cifar_resnet32", 3, "auto <= 1.25x plain")] == "not run"
    assert v[("cifar_resnet32", 3, "auto <= sequential + spread")] == "not run"
    no_plain = [_row("resnet50", "ONE m=3 auto", 12.0, plan="sequential"), _row("resnet50", "ONE m=3 sequential", 12.0)]
    assert _verdicts(tmp_path, no_plain)[("resnet50", 3, "auto <= 1.20x plain")] == "missing"
    assert speed_targets.main([str(_write(tmp_path, "speed_a.json", no_plain))]) == 1
    good = [_row("cifar_resnet32", "plain", 10.0), _row("cifar_resnet32", "ONE m=3 auto", 11.0, plan="fused"),
            _row("cifar_resnet32", "ONE m=3 sequential", 11.2)]
    folder = tmp_path / "run"
    folder.mkdir()
    _write(folder, "speed_eager.json", good)
    assert speed_targets.main([str(folder)]) == 0
    assert "auto ran fused" in capsys.readouterr().out


def test_bad_paths_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no such file"):
        speed_targets.main([str(tmp_path / "absent.json")])
    with pytest.raises(SystemExit, match="no speed_"):
        speed_targets.main([str(tmp_path)])
    other = tmp_path / "other.json"
    other.write_text("{}")
    with pytest.raises(SystemExit, match="not a benchmarks/speed.py result"):
        speed_targets.main([str(other)])


def test_rows_a_deadline_left_out_are_not_measured_and_fail_nothing(tmp_path: Path) -> None:
    path = tmp_path / "speed_cut.json"
    cut = {"batch": 128, "reason": "not measured: deadline"}
    path.write_text(json.dumps({"meta": {}, "results": [
        _row("cifar_resnet32", "plain", 10.0), _row("cifar_resnet32", "ONE m=3 sequential", 18.0)],
        "not_measured": [{**cut, "model": "cifar_resnet32", "px": 32, "variant": "ONE m=3 auto"},
                         {**cut, "model": "resnet50", "px": 224, "variant": "plain"},
                         {**cut, "model": "resnet50", "px": 224, "variant": "ONE m=3 auto"}]}))
    verdicts = {(v["model"], v["target"]): v["verdict"] for v in speed_targets.check(speed_targets.load_rows([path]))}
    assert verdicts == {("cifar_resnet32", "auto <= 1.25x plain"): "not measured",
                        ("cifar_resnet32", "auto <= sequential + spread"): "not measured",
                        ("resnet50", "auto <= 1.20x plain"): "not measured"}
    assert speed_targets.main([str(path)]) == 0  # a run cut short misses no target
