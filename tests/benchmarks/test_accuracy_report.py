"""benchmarks/accuracy.py: the per-method report drawn from the runs' history.json (no training here)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import accuracy  # noqa: E402

# test accuracy per epoch, per (variant, seed); ONE also has its ensemble's curve
CURVES = {
    ("plain", 0): [50.0, 60.0, 58.0], ("plain", 1): [51.0, 61.0, 59.0], ("plain", 2): [49.0, 60.5, 59.5],
    ("one-m3", 0): [52.0, 62.0, 61.0], ("one-m3", 1): [53.0, 62.5, 62.0], ("one-m3", 2): [50.0, 61.5, 61.5],
}


def _runs(tmp_path: Path, curves: dict = CURVES) -> list[dict]:
    runs = []
    for (variant, seed), curve in curves.items():
        out = tmp_path / f"{variant}-seed{seed}"
        out.mkdir()
        epochs = [{"epoch": i + 1, "test_acc": a, "train_acc": 90.0 + i, "seconds": 2.0} for i, a in enumerate(curve)]
        if variant.startswith("one"):
            for e in epochs:
                e["test_acc_ensemble"] = e["test_acc"] + 1.0
        (out / "history.json").write_text(json.dumps({"epochs": epochs}))
        runs.append({"variant": variant, "seed": seed, "out": out, "name": out.name})
    return runs


def test_rows_give_seed_values_and_paired_differences(tmp_path: Path) -> None:
    rows = {r["reported"]: r for r in accuracy.summarise(_runs(tmp_path), ["plain", "one-m3"])}
    assert list(rows) == ["plain", "ONE m=3 (branch 0)", "ONE-E m=3"]
    one = rows["ONE m=3 (branch 0)"]
    assert one["best"] == [62.0, 62.5, 61.5] and one["last"] == [61.0, 62.0, 61.5]
    assert one["best_mean"] == pytest.approx(62.0) and one["best_std"] == pytest.approx(0.5)
    # paired differences of the best epoch to plain's (60.0, 61.0, 60.5): +2.0, +1.5, +1.0 -> mean 1.5, sd 0.5,
    # t(0.975, 2) = 4.303
    d = one["best_diff"]
    assert d["mean"] == pytest.approx(1.5)
    assert d["high"] - d["mean"] == pytest.approx(4.303 * 0.5 / 3 ** 0.5, rel=1e-4)
    assert d["verdict"] == "gain beyond noise" and d["seeds"] == [0, 1, 2]
    # the ensemble row reads the ensemble curve but is compared with plain's deployed accuracy
    assert rows["ONE-E m=3"]["last_diff"]["mean"] == pytest.approx(1 + (3.0 + 3.0 + 2.0) / 3)
    assert "best_diff" not in rows["plain"] and rows["plain"]["train_acc_last"] == [92.0, 92.0, 92.0]


def test_table_says_within_noise_when_the_interval_holds_zero(tmp_path: Path) -> None:
    curves = {("plain", 0): [60.0], ("plain", 1): [61.0], ("osakd-k8", 0): [61.0], ("osakd-k8", 1): [60.5]}
    rows = accuracy.summarise(_runs(tmp_path, curves), ["plain", "osakd-k8"])
    table = accuracy.format_table(rows, "last")
    line = next(l for l in table.splitlines() if l.startswith("| OSAKD 8-NN"))
    assert "+0.25 [" in line and "within noise" in line and "beyond" not in line
    assert "(baseline)" in next(l for l in table.splitlines() if l.startswith("| plain"))


def test_rows_compare_with_the_chosen_baseline(tmp_path: Path) -> None:
    curves = {("plain", 0): [60.0], ("plain", 1): [61.0], ("plain-lr0.3x", 0): [63.0], ("plain-lr0.3x", 1): [64.0],
              ("osakd-k8-alpha0.3", 0): [62.0], ("osakd-k8-alpha0.3", 1): [62.5]}
    variants = ["plain-lr0.3x", "plain", "osakd-k8-alpha0.3"]
    rows = {r["reported"]: r for r in accuracy.summarise(_runs(tmp_path, curves), variants, baseline="plain-lr0.3x")}
    assert "last_diff" not in rows["plain, 0.3x learning rate"]
    assert rows["OSAKD 8-NN alpha 0.3"]["last_diff"]["mean"] == pytest.approx(-1.25)
    assert rows["plain"]["last_diff"]["mean"] == pytest.approx(-3.0)
    table = accuracy.format_table(list(rows.values()), "last")
    assert "vs plain, 0.3x learning rate [95 % CI]" in table.splitlines()[0]


def test_unfinished_and_unpaired_runs(tmp_path: Path) -> None:
    runs = _runs(tmp_path, {("plain", 0): [60.0], ("one-m2", 0): [61.0], ("one-m2", 1): [62.0]})
    runs.append({"variant": "plain", "seed": 1, "out": tmp_path / "absent", "name": "absent"})
    rows = {r["reported"]: r for r in accuracy.summarise(runs, ["plain", "one-m2"])}
    d = rows["ONE m=2 (branch 0)"]["last_diff"]
    assert d["seeds"] == [0] and d["low"] is None and d["verdict"] == "no verdict (1 seed)"  # one pair: no interval


def test_every_protocol_names_known_variants_and_plain_first() -> None:
    for name, proto in accuracy.PROTOCOLS.items():
        assert proto["variants"][0] == "plain", name
        assert set(proto["variants"]) <= set(accuracy.VARIANTS), name
    assert set(accuracy.VARIANTS) == set(accuracy.LABELS)


def test_seeds_of_an_earlier_run_join_the_table_as_if_run_together(tmp_path: Path) -> None:
    for d in ("all", "first", "later", "p"):
        (tmp_path / d).mkdir()
    together = accuracy.summarise(_runs(tmp_path / "all"), ["plain", "one-m3"])
    first = {k: v for k, v in CURVES.items() if k[1] < 2}
    later = {k: v for k, v in CURVES.items() if k[1] == 2}
    earlier = json.loads(json.dumps(accuracy.summarise(_runs(tmp_path / "first", first), ["plain", "one-m3"])))
    merged = accuracy.summarise(_runs(tmp_path / "later", later), ["plain", "one-m3"], (earlier,))
    assert [r["reported"] for r in merged] == [r["reported"] for r in together]
    assert merged
    for a, b in zip(merged, together, strict=True):
        assert a["seeds"] == [0, 1, 2] and a["best"] == b["best"] and a["curves"] == b["curves"]
        assert a["last_mean"] == pytest.approx(b["last_mean"]) and a.get("last_diff") == b.get("last_diff")
    # a row only the earlier run has stays, compared with plain on the seeds both have
    only_old = [dict(earlier[1], reported="ONE m=2 (branch 0)", variant="one-m2")]
    rows = {r["reported"]: r for r in accuracy.summarise(_runs(tmp_path / "p", later), ["plain"], (only_old,))}
    assert rows["ONE m=2 (branch 0)"]["seeds"] == [0, 1] and "last_diff" not in rows["ONE m=2 (branch 0)"]


def test_kd_brings_its_teacher_run_once_and_first(tmp_path: Path) -> None:
    variants = accuracy.with_needs(["plain", "dml-2", "kd"])
    assert variants == ["plain", "dml-2", "teacher", "kd"]
    runs = accuracy.plan_runs(variants, [1, 2], tmp_path)
    assert [r["name"] for r in runs][:2] == ["teacher-seed0", "plain-seed1"]  # one teacher, whatever the seeds
    assert [r["name"] for r in runs].count("teacher-seed0") == 1
    assert {r["name"]: r["needs"] for r in runs}["kd-seed2"] == ["teacher-seed0"]
    args = argparse.Namespace(data=None, train_args="")
    setup = accuracy.PROTOCOLS["osakd-cifar10"]
    fill = accuracy.placeholders("osakd-cifar10", setup, tmp_path, seed=2)
    kd = accuracy.run_command(args, setup, "kd", 2, tmp_path / "kd-seed2", "cpu", 1, fill)
    assert kd[kd.index("--teacher") + 1] == str(tmp_path / "teacher-seed0")
    teacher = accuracy.run_command(args, setup, "teacher", 0, tmp_path / "teacher-seed0", "cpu", 1, fill)
    assert teacher[-2:] == ["--model", "cifar_resnet20"]  # after the protocol's --model: the last one wins
    dml = accuracy.run_command(args, setup, "dml-2", 2, tmp_path / "dml-2-seed2", "cpu", 1, fill)
    assert dml[-4:] == ["--method", "dml", "--peers", "2"]

    curves = {("plain", 1): [60.0], ("plain", 0): [59.0], ("teacher", 0): [70.0], ("kd", 1): [62.0]}
    (tmp_path / "rows").mkdir()
    rows = accuracy.summarise(_runs(tmp_path / "rows", curves), variants, fill=fill)
    assert [r["reported"] for r in rows] == ["plain", "teacher (cifar_resnet20, plain)", "KD from cifar_resnet20"]
    assert rows[1]["seeds"] == [0] and rows[1]["last_diff"]["mean"] == 11.0


def test_lr_selection_picks_the_best_finished_rate_and_validates_on_held_out_images(tmp_path: Path) -> None:
    variants = accuracy.lr_variants([0.01, 0.003, 0.001])
    assert variants == ["plain-lr0.01", "plain-lr0.003", "plain-lr0.001"]
    curves = {("plain-lr0.01", 0): [60.0, 61.0, 59.0], ("plain-lr0.003", 0): [55.0, 62.0, 63.0],
              ("plain-lr0.001", 0): [50.0, 64.0]}  # the best value, but its run stopped after 2 of 3 epochs
    rows = accuracy.summarise(_runs(tmp_path, curves), variants, baseline="plain-lr0.01")
    assert accuracy.choose_lr(rows, epochs=3) == 0.003
    assert accuracy.choose_lr(rows, epochs=4) is None
    args = argparse.Namespace(data=None, train_args="")
    setup = dict(accuracy.PROTOCOLS["osakd-cifar10-paper"], lr=0.01, holdout=5000)
    cmd = accuracy.run_command(args, setup, "plain-lr0.001", 0, tmp_path / "r", "cpu", 1, {})
    assert cmd[cmd.index("--holdout") + 1] == "5000"
    assert cmd[-2:] == ["--lr", "0.001"]  # after the protocol's --lr: the last one wins


def test_a_bank_of_one_epoch_holds_every_trained_sample_once() -> None:
    setup = accuracy.PROTOCOLS["osakd-cifar10"]
    assert accuracy.epoch_samples(setup) == 50_000 // 64 * 64
    assert accuracy.epoch_samples(dict(setup, holdout=5000, limit_train=1000)) == 1000 // 64 * 64
    fill = accuracy.placeholders("osakd-cifar10", setup, Path("runs"))
    cmd = [a.format(**fill) for a in accuracy.VARIANTS["osakd-k8-bank-epoch"]]
    assert cmd[cmd.index("--bank-size") + 1] == str(50_000 // 64 * 64)
    assert [a.format(**fill) for a in accuracy.VARIANTS["plain-lr0.1x"]][-1] == "0.001"


def test_finished_only_leaves_partial_runs_out_of_the_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    curves = {("plain", 0): [50.0, 60.0], ("plain", 1): [51.0, 61.0], ("one-m3", 0): [52.0, 62.0],
              ("one-m3", 1): [70.0]}  # seed 1 of ONE stopped after 1 of 2 epochs
    (tmp_path / "runs").mkdir()
    runs = [dict(r, cmd=["python", "train_cifar.py"]) for r in _runs(tmp_path / "runs", curves)]
    setup = dict(accuracy.PROTOCOLS["osakd-cifar10"], epochs=2)
    results = tmp_path / "results"
    args = argparse.Namespace(merge=[], variants=["plain", "one-m3"], baseline="plain", select_lr=None,
                              finished_only=True, protocol="osakd-cifar10", seeds=[0, 1], smoke=False, name="t",
                              results=str(results), deadline=None, report_only=True)
    accuracy.report(args, setup, runs, {}, tmp_path / "runs", "cpu", 1, 0.0)
    out = capsys.readouterr().out
    assert "NOT FINISHED left out of the tables: one-m3-seed1" in out
    data = json.loads(next(results.glob("*.json")).read_text())
    one = next(r for r in data["results"] if r["variant"] == "one-m3")
    assert one["seeds"] == [0] and 70.0 not in one["best"]
    assert data["meta"]["wall_seconds"] is None  # --report-only trained nothing: no time, rather than 0.0


def test_every_row_is_compared_with_the_stronger_free_control(tmp_path: Path) -> None:
    # plain 60/61; label smoothing 61/62 (the stronger at the last epoch); the average 60.5/61.5; ONE 63/63.5
    curves = {("plain-lr0.3x", 0): [60.0], ("plain-lr0.3x", 1): [61.0], ("plain-ls-lr0.3x", 0): [61.0],
              ("plain-ls-lr0.3x", 1): [62.0], ("plain-ema-lr0.3x", 0): [60.5], ("plain-ema-lr0.3x", 1): [61.5],
              ("one-m3-lr0.3x", 0): [63.0], ("one-m3-lr0.3x", 1): [63.5]}
    variants = ["plain-lr0.3x", "one-m3-lr0.3x", "plain-ls-lr0.3x", "plain-ema-lr0.3x"]
    rows = {r["reported"]: r for r in accuracy.summarise(
        _runs(tmp_path, curves), variants, baseline="plain-lr0.3x", controls=("plain-ls-lr0.3x", "plain-ema-lr0.3x"))}
    one = rows["ONE m=3, 0.3x learning rate (branch 0)"]
    assert one["last_diff"]["mean"] == pytest.approx(2.75)
    control = one["last_diff_control"]
    assert control["control"] == "plain, label smoothing 0.1, 0.3x learning rate"
    assert control["mean"] == pytest.approx(1.75) and control["seeds"] == [0, 1]
    # the weaker control is compared with the stronger; the stronger has no comparison with itself
    assert rows["plain, weight average (deployed), 0.3x learning rate"]["last_diff_control"]["mean"] == pytest.approx(-0.5)
    assert "last_diff_control" not in rows["plain, label smoothing 0.1, 0.3x learning rate"]
    table = accuracy.format_table(list(rows.values()), "last")
    assert "vs the stronger control [95 % CI]" in table.splitlines()[0]
    assert "(the stronger control)" in next(l for l in table.splitlines() if l.startswith("| plain, label smoothing"))


def test_pcl_reports_its_live_peer_beside_the_deployed_temporal_mean(tmp_path: Path) -> None:
    runs = _runs(tmp_path, {("plain", 0): [60.0, 61.0], ("pcl-3", 0): [62.0, 63.0]})
    history = json.loads((runs[1]["out"] / "history.json").read_text())
    for e in history["epochs"]:
        e["test_acc_live_peer"] = e["test_acc"] - 1.5
    (runs[1]["out"] / "history.json").write_text(json.dumps(history))
    rows = {r["reported"]: r for r in accuracy.summarise(runs, ["plain", "pcl-3"])}
    assert rows["PCL 3 peers (temporal mean of peer 0)"]["last"] == [63.0]
    assert rows["PCL 3 peers (live peer 0, not deployed)"]["last"] == [61.5]
    # runs recorded before the live peer was logged give the deployed row alone
    (tmp_path / "old").mkdir()
    old = _runs(tmp_path / "old", {("plain", 0): [60.0], ("pcl-3", 0): [62.0]})
    assert [r["reported"] for r in accuracy.summarise(old, ["plain", "pcl-3"])] == [
        "plain", "PCL 3 peers (temporal mean of peer 0)"]
