"""benchmarks/zoo.py --compare-splits: two recordings of where kdwrap cuts each model, compared model by model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import zoo  # noqa: E402


def _recording(tmp_path: Path, name: str, rows: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


def _row(split: str, seconds: float) -> dict:
    return {"model": "m", "seconds": seconds, "one": {"split": split, "rule": "the last stage"}}


def test_equal_recordings_pass_whatever_the_time_taken(tmp_path, capsys):
    before = _recording(tmp_path, "before.json", {"a": _row("layer4", 3.0), "b": _row("stages.3", 1.0)})
    after = _recording(tmp_path, "after.json", {"a": _row("layer4", 9.5), "b": _row("stages.3", 0.2)})
    assert zoo.compare_splits(before, after) == 0
    assert "2 models recorded in both: 2 equal, 0 different" in capsys.readouterr().out


def test_a_changed_split_fails_and_is_named(tmp_path, capsys):
    before = _recording(tmp_path, "before.json", {"a": _row("layer4", 3.0), "b": _row("stages.3", 1.0)})
    after = _recording(tmp_path, "after.json", {"a": _row("layer3", 3.0), "c": _row("blocks.9", 1.0)})
    assert zoo.compare_splits(before, after) == 1
    out = capsys.readouterr().out
    assert "a: differs in one" in out and "1 models recorded in both: 0 equal, 1 different" in out
    assert "2 recorded in one only (b, c)" in out
