"""The GPU benchmarks cut short: speed.py, knn_speed.py and accuracy.py keep every row on disk as it is measured, and
a deadline or a stop still leaves those rows, the rest listed as not measured, and a table; the GPU speed suite and
the one-call ResNet-32 accuracy protocol as CPU dry runs (tiny sizes), so that a GPU call never fails on plumbing.
And the results they record name no folder of the machine they ran on."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import accuracy  # noqa: E402
import common  # noqa: E402
import knn_speed  # noqa: E402
import speed  # noqa: E402


class UntilFirstRow:
    """A deadline that passes once ``path`` (a benchmark's JSON) holds a measured row: the cut comes mid-run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def measured(self) -> bool:
        try:
            return bool(json.loads(self.path.read_text())["results"])
        except FileNotFoundError:
            return False

    def allows(self, seconds: float) -> bool:
        return not self.measured()

    def left(self) -> float:
        return 0.0 if self.measured() else 1e9


def cells(table: str) -> list[list[str]]:
    """The rows of the markdown tables in ``table`` (printed output), each a list of stripped cells."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ")]


SPEED_ARGS = ["--device", "cpu", "--variants", "^(ONE m=2 fused|OSAKD in-batch)$", "--repeats", "5", "--warmup", "1"]


def test_speed_cut_by_its_deadline_keeps_its_rows_and_lists_the_rest(tmp_path, monkeypatch, capsys):
    out = tmp_path / "speed_cut.json"
    monkeypatch.setattr(speed, "Deadline", lambda seconds: UntilFirstRow(out))
    monkeypatch.setattr(speed, "stop_on_sigterm", lambda: None)
    speed.main([*SPEED_ARGS, "--models", "cifar_resnet20:2:16", "lenet5:4:32", "--deadline", "60", "--out", str(out)])

    data = json.loads(out.read_text())
    # the first round of the first model was measured; the deadline then passed
    assert {(r["model"], r["variant"]): r["repeats"] for r in data["results"]} == {
        ("cifar_resnet20", "plain"): 1, ("cifar_resnet20", "ONE m=2 fused"): 1, ("cifar_resnet20", "OSAKD in-batch"): 1}
    assert {(m["model"], m["variant"]): m["reason"] for m in data["not_measured"]} == {
        ("lenet5", v): "not measured: deadline" for v in ("plain", "ONE m=2 fused", "OSAKD in-batch")}
    assert data["meta"]["complete"] and str(tmp_path) not in data["meta"]["command"]
    rows = [r[:5] for r in cells(capsys.readouterr().out)]
    assert ["cifar_resnet20 (2, 16)", "ONE m=2 fused", "fused", "1"] == rows[2][:4]
    assert ["lenet5 (4, 32)", "OSAKD in-batch", "", "0", "not measured: deadline"] in rows
    assert out.with_suffix(".png").is_file()

    speed.main(["--report", str(out)])  # the same table from the file alone
    assert [r[:5] for r in cells(capsys.readouterr().out)] == rows


def test_speed_stopped_midway_writes_what_it_measured(tmp_path, monkeypatch, capsys):
    out = tmp_path / "speed_stopped.json"
    steps = 0
    real_step = speed.timed_step

    def stop_in_the_second_round(*args, **kwargs):
        nonlocal steps
        steps += 1
        if steps > 4:  # one step of each of 2 variants to estimate, one round of 2, then SIGTERM
            raise common.Stopped()
        return real_step(*args, **kwargs)

    monkeypatch.setattr(speed, "timed_step", stop_in_the_second_round)
    monkeypatch.setattr(speed, "stop_on_sigterm", lambda: None)
    speed.main([*SPEED_ARGS, "--variants", "^OSAKD in-batch$", "--models", "lenet5:4:32", "cifar_resnet20:2:16",
                "--out", str(out)])
    data = json.loads(out.read_text())
    assert [(r["variant"], r["repeats"]) for r in data["results"]] == [("plain", 1), ("OSAKD in-batch", 1)]
    assert {m["reason"] for m in data["not_measured"]} == {"not measured: the run was stopped (SIGTERM)"}
    assert len(data["not_measured"]) == 2 and not data["meta"]["complete"]
    assert ["cifar_resnet20 (2, 16)", "plain", "", "0", "not measured: the run was stopped (SIGTERM)"] in [
        r[:5] for r in cells(capsys.readouterr().out)]


def test_sigterm_becomes_stopped():
    old = signal.getsignal(signal.SIGTERM)
    try:
        common.stop_on_sigterm()
        with pytest.raises(common.Stopped):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode
    finally:
        signal.signal(signal.SIGTERM, old)


def test_knn_cut_by_its_deadline_lists_the_bank_not_measured(tmp_path, monkeypatch, capsys):
    out = tmp_path / "knn.json"
    monkeypatch.setattr(knn_speed, "Deadline", lambda seconds: UntilFirstRow(out))
    monkeypatch.setattr(knn_speed, "stop_on_sigterm", lambda: None)
    knn_speed.main(["--device", "cpu", "--banks", "512:10:8", "2048:10:8", "--repeats", "2", "--backends", "torch",
                    "matmul", "--deadline", "60", "--out", str(out)])
    data = json.loads(out.read_text())
    assert [(r["bank"], r["repeats"]) for r in data["results"]] == [(512, 2)]
    assert data["not_measured"] == [{"bank": 2048, "classes": 10, "queries": 8, "reason": "not measured: deadline"}]
    capsys.readouterr()
    knn_speed.main(["--report", str(out)])
    rows = cells(capsys.readouterr().out)
    assert rows[1][:3] == ["512 x 10", "8", "2"]
    assert rows[2][:4] == ["2,048 x 10", "8", "0", "not measured: deadline"]


# --- the one-call ResNet-32 accuracy protocol on a CPU ------------------------------------------------------------

class UntilFirstEpoch:
    """A deadline that passes once a run in ``runs`` has more finished epochs than it had when this was made."""

    def __init__(self, runs: Path) -> None:
        self.runs = runs
        self.before = self.epochs()

    def epochs(self) -> dict[str, int]:
        return {d.name: accuracy.count_epochs(d) for d in self.runs.glob("*-seed*") if d.is_dir()}

    def allows(self, seconds: float) -> bool:
        return not any(n > self.before.get(name, 0) for name, n in self.epochs().items())

    def left(self) -> float:
        return 1e9 if self.allows(0) else 0.0


def _accuracy(tmp_path: Path, monkeypatch, capsys) -> tuple[dict, str]:
    runs = tmp_path / "runs"
    runs.mkdir(exist_ok=True)
    monkeypatch.setattr(accuracy, "Deadline", lambda seconds: UntilFirstEpoch(runs))
    monkeypatch.setattr(accuracy, "stop_on_sigterm", lambda: None)
    # 20 one-step epochs: the deadline passes long before any run could finish them
    monkeypatch.setattr(sys, "argv", [
        "accuracy.py", "--protocol", "one-resnet32-gpu-call", "--smoke", "--epochs", "20", "--limit-train", "128",
        "--seeds", "0", "--jobs", "3", "--deadline", "60", "--out", str(runs), "--results", str(tmp_path)])
    accuracy.main()
    result = next(tmp_path.glob("accuracy_one-resnet32-gpu-call_smoke_cpu_*.json"))
    return json.loads(result.read_text()), capsys.readouterr().out


def test_gpu_accuracy_protocol_cut_by_its_deadline_leaves_partial_curves_and_resumes(tmp_path, monkeypatch, capsys):
    data, out = _accuracy(tmp_path, monkeypatch, capsys)
    names = ["plain-seed0", "one-m3-seed0", "osakd-k8-seed0"]
    assert sorted(data["meta"]["unfinished"]) == sorted(names)  # all stopped before their 20 epochs
    measured = {r["variant"] for r in data["results"]}
    # every run is in the table or listed as not measured, never dropped
    assert {f"{v}-seed0" for v in measured} | set(data["meta"]["not_measured"]) == set(names)
    assert measured and "NOT FINISHED (partial curves)" in out and "best epoch:" in out
    assert all(0 < n < 20 for r in data["results"] for n in r["epochs_done"])
    assert "expected wall time: no plan for one-resnet32-gpu-call on cpu" in out
    assert data["meta"]["setup"]["cuda_args"] == ["--compile", "--compile-mode", "reduce-overhead", "--channels-last"]
    assert str(tmp_path) not in data["meta"]["command"]
    assert [s for s in _strings(data["meta"]) if MACHINE_PATH.search(s)] == []  # train_command_example too

    before = {r["variant"]: max(r["epochs_done"]) for r in data["results"]}
    data, out = _accuracy(tmp_path, monkeypatch, capsys)  # the same command again: every run resumes
    for r in data["results"]:
        assert max(r["epochs_done"]) >= before.get(r["variant"], 0)
    logs = [(tmp_path / "runs" / f"{name}.log").read_text() for name in names]
    assert any("resumed from" in log for log in logs)


def test_gpu_plan_expects_the_protocol_to_fit_its_call():
    setup = accuracy.PROTOCOLS["one-resnet32-gpu-call"]
    runs = accuracy.plan_runs(setup["variants"], [0, 1, 2], Path("runs"))
    expected = accuracy.expected_seconds("one-resnet32-gpu-call", setup, runs, "cuda")
    # the plan's arithmetic (PROTOCOLS' comment): 110 s fixed + 10 epochs x ~27 s, with 15 % to spare in 450 s
    assert expected == pytest.approx(380, abs=10) and expected * 1.15 < 450
    assert accuracy.expected_seconds("one-resnet32-gpu-call", setup, runs, "cpu") is None
    args = accuracy.argparse.Namespace(data=None, train_args="")
    gpu = accuracy.run_command(args, setup, "plain", 0, Path("runs/x"), "cuda", 1, {})
    at = gpu.index("--compile")
    assert gpu[at:at + 4] == ["--compile", "--compile-mode", "reduce-overhead", "--channels-last"]
    assert "--compile" not in accuracy.run_command(args, setup, "plain", 0, Path("runs/x"), "cpu", 1, {})


def test_train_cifar_compiles_in_the_mode_the_protocol_asks(tmp_path, monkeypatch):
    import torch

    spec = importlib.util.spec_from_file_location("train_cifar", ROOT / "examples" / "train_cifar.py")
    train_cifar = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_cifar)
    asked = []
    real_compile = torch.compile

    def eager_compile(model, **kwargs):  # inductor takes a minute on a small CPU; dynamo's trace is what runs here
        asked.append(kwargs)
        return real_compile(model, dynamic=kwargs.get("dynamic"), backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    train_cifar.main(["--model", "lenet5", "--method", "osakd", "--epochs", "1", "--limit-train", "128",
                      "--limit-test", "64", "--device", "cpu", "--no-progress", "--compile", "--compile-mode",
                      "reduce-overhead", "--out", str(tmp_path / "run")])
    assert asked == [{"dynamic": False, "mode": "reduce-overhead"}]
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())["epochs"]) == 1


# --- the GPU speed suite on a CPU ----------------------------------------------------------------------------------

def test_speed_profiles_are_written(tmp_path, monkeypatch):
    out = tmp_path / "speed_profiled.json"
    monkeypatch.setattr(speed, "stop_on_sigterm", lambda: None)
    speed.main(["--device", "cpu", "--models", "lenet5:4:32", "--variants", "^OSAKD in-batch$", "--profile",
                "--repeats", "1", "--warmup", "0", "--out", str(out)])
    profile = out.with_name("speed_profiled_profile.txt").read_text()
    # plain and OSAKD in-batch are among the profiled variants: their operator tables, 20 steps each
    assert profile.count("## lenet5, batch 4, 32 px: ") == 2 and profile.count("totals over 20 steps") == 2


def test_gpu_speed_suite_dry_run_packs_its_steps_and_the_verdicts(tmp_path):
    # The steps with their own code paths: eager rows, compiled rows, k-NN (family, branches, models and profile
    # differ from core only in their arguments; the next test reaches every step's name).
    out = tmp_path / "out"
    env = dict(os.environ, DEVICE="cpu", PYTHON=sys.executable, OUT=str(out), DEADLINE="300")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_speed_suite.sh"), "core", "cudagraphs", "knn"],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu.txt", "speed.tgz", "targets.txt"]  # a device call returns at most 8
    with tarfile.open(out / "speed.tgz") as tar:
        names = set(tar.getnames())
        results = {n: json.load(tar.extractfile(n)) for n in names if n.endswith(".json") and "targets" not in n}
        summary = tar.extractfile("./summary.txt").read().decode()
    for step in ("core", "cudagraphs"):
        assert f"./speed_{step}.json" in results and f"./speed_{step}.log" in names, step
        assert results[f"./speed_{step}.json"]["results"] and f"{step}: done" in summary, step
    assert results["./knn_speed_knn.json"]["results"] and "knn: done" in summary
    core = {r["variant"] for r in results["./speed_core.json"]["results"]}
    assert core == {"plain", "ONE m=3 auto", "ONE m=3 sequential", "ONE m=3 fused", "OSAKD in-batch",
                    "OSAKD bank 16,384"}
    assert any(r["compiled"] for r in results["./speed_cudagraphs.json"]["results"])
    assert "| cifar_resnet32" in (out / "targets.txt").read_text()


def test_gpu_speed_suite_lists_the_steps_its_deadline_leaves_out(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, DEVICE="cpu", PYTHON=sys.executable, OUT=str(out))
    # 25 s leave less than a step's minimum once the 10 s kept for the verdicts are set aside: nothing runs
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_speed_suite.sh"), "--deadline", "25"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    with tarfile.open(out / "speed.tgz") as tar:
        summary = tar.extractfile("./summary.txt").read().decode().splitlines()
    steps = ["core", "cudagraphs", "family", "branches", "models", "profile", "knn"]
    assert [line.split(":")[0] for line in summary] == steps  # most valuable first
    assert all(": not run: deadline" in line for line in summary)


# An absolute path (POSIX, or a Windows drive), a site-packages folder, or a relative path climbing out of the
# repository, where a path starts: at the start of a string, after a space, '=', a parenthesis or a quote.
MACHINE_PATH = re.compile(r"(?:^|[\s=(\"'])(?:/[\w.~+-]+/|\.\./)|site-packages|\b[A-Za-z]:\\")


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_results_name_no_folder_of_the_machine_they_ran_on():
    found = {
        path.name: hits
        for path in sorted((ROOT / "benchmarks" / "results").glob("*.json"))
        if (hits := [s for s in _strings(json.loads(path.read_text())) if MACHINE_PATH.search(s)])
    }
    assert found == {}, "write paths relative to the repository (benchmarks/common.py: portable_path)"


def test_recorded_commands_keep_repository_paths_and_drop_the_machines_folders():
    argv = [str(ROOT / "examples" / "train_cifar.py"), "--out", "/tmp/run-3/speed.json", "--data=/home/u/c.npz",
            "--lr", "0.1", "--results", "runs/x", "--merge=benchmarks/results/a.json"]
    line = common.command_line("benchmarks/accuracy.py", argv)
    assert line == ("python benchmarks/accuracy.py examples/train_cifar.py --out speed.json --data=c.npz --lr 0.1 "
                    "--results runs/x --merge=benchmarks/results/a.json")
    assert not MACHINE_PATH.search(line)
    assert MACHINE_PATH.search("/work/main/examples/train_cifar.py --seed 0")  # the pattern sees what it is for
    assert MACHINE_PATH.search("python x.py --out /tmp/speed_exec.json")
    assert MACHINE_PATH.search("--data ../shared/data/cifar10-jpeg.npz")
