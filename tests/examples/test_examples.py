"""The example scripts run end to end on tiny offline data (a synthetic CIFAR pack, scikit-learn's digits)."""
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch

import kdwrap

from fake_data import write_fake_cifar_pack

importlib.import_module("kdwrap.models")  # registers cifar_resnet* with timm

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(tmp_path: Path, script: str, *args: str) -> str:
    env = {**os.environ, "KDWRAP_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


@pytest.mark.parametrize("method", ["one", "osakd"])
def test_timm_loop(tmp_path, method):
    out = _run(tmp_path, "timm_loop.py", "--method", method, "--model", "cifar_resnet20", "--steps", "3")
    assert "its outputs equal the wrapper's eval outputs" in out


def test_train_cifar_then_deploy(tmp_path):
    pytest.importorskip("PIL", reason="pillow is an optional extra: pip install 'kdwrap[demo]'")
    write_fake_cifar_pack(tmp_path / "pack.npz")
    common = ["--data", "pack.npz", "--model", "cifar_resnet20", "--epochs", "1", "--batch-size", "2", "--device",
              "cpu", "--no-progress"]
    out = _run(tmp_path, "train_cifar.py", *common, "--method", "one", "--out", "run")
    assert "saved run/deployed.pt" in out
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history["epochs"]) == 1
    deployed = timm.create_model("cifar_resnet20", num_classes=3)
    deployed.load_state_dict(torch.load(tmp_path / "run" / "deployed.pt"))  # the plain architecture loads it
    out = _run(tmp_path, "deploy.py", "--checkpoint", "run/last.pt", "--ensemble", "--out", "dep")
    assert "all checked outputs agree" in out and "could not run" not in out and (tmp_path / "dep").is_dir()
    # The saved program has a dynamic batch axis: it runs on a batch size other than the traced one (4).
    program = torch.export.load(tmp_path / "dep" / "model.pt2").module()
    deployed.load_state_dict(torch.load(tmp_path / "dep" / "deployed.pt"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program(x), deployed.eval()(x))
    _run(tmp_path, "train_cifar.py", *common, "--method", "osakd", "--out", "run-osakd")
    assert (tmp_path / "run-osakd" / "deployed.pt").is_file()


def _example(script: str) -> ModuleType:
    """An example script imported as a module (its functions called in this process: no start-up cost)."""
    spec = importlib.util.spec_from_file_location(f"example_{Path(script).stem}", EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _resume_is_a_no_op(tmp_path: Path, run: str, *args: str) -> dict:
    """Resume the finished run ``run`` with its own arguments: it trains no epoch and keeps its history."""
    before = json.loads((tmp_path / run / "history.json").read_text())
    out = _run(tmp_path, "train_cifar.py", *args, "--out", run, "--resume")
    after = json.loads((tmp_path / run / "history.json").read_text())
    assert f"after epoch {len(before['epochs'])}" in out and after["epochs"] == before["epochs"]
    return after


def test_train_cifar_dml_and_kd_from_a_teacher_run(tmp_path, monkeypatch):
    pytest.importorskip("PIL", reason="pillow is an optional extra: pip install 'kdwrap[demo]'")
    write_fake_cifar_pack(tmp_path / "pack.npz")
    common = ["--data", "pack.npz", "--epochs", "1", "--batch-size", "2", "--device", "cpu", "--no-progress"]
    dml = [*common, "--model", "lenet5", "--method", "dml", "--peers", "2"]
    _run(tmp_path, "train_cifar.py", *dml, "--out", "dml")
    history = _resume_is_a_no_op(tmp_path, "dml", *dml)
    assert history["config"]["temperature"] == 1.0  # DML's own default, not ONE's
    assert history["epochs"][0]["test_acc_peers"][0] == history["epochs"][0]["test_acc"] == history["deployed_test_acc"]
    assert len(history["last_test_acc_peers"]) == 2

    # The teacher: a plain run of another architecture; the KD run reads its model name from the checkpoint.
    _run(tmp_path, "train_cifar.py", *common, "--model", "cifar_resnet20", "--out", "teacher")
    kd = [*common, "--model", "lenet5", "--method", "kd", "--teacher", "teacher"]
    out = _run(tmp_path, "train_cifar.py", *kd, "--out", "kd")
    assert "teacher: cifar_resnet20 from teacher" in out
    history = _resume_is_a_no_op(tmp_path, "kd", *kd)
    assert history["config"]["temperature"] == 4.0 and history["deployed"]["model"] == "lenet5"
    student = timm.create_model("lenet5", num_classes=3)
    student.load_state_dict(torch.load(tmp_path / "kd" / "deployed.pt"))
    # deploy.py rebuilds a KD run's wrapper without its teacher; its export holds the weights train_cifar.py deployed.
    monkeypatch.setattr(sys, "argv", ["deploy.py", "--checkpoint", str(tmp_path / "kd" / "last.pt")])
    deploy = _example("deploy.py")
    model, method = deploy.build(deploy.parse_args(["kd"]))
    exported = kdwrap.export(model)
    assert method == "kd" and type(exported) is type(student)
    for key, value in exported.state_dict().items():
        assert torch.equal(value, student.state_dict()[key]), key

    # Only a finished plain run of the same classes can teach.
    load_teacher = _example("train_cifar.py").load_teacher
    with pytest.raises(SystemExit, match="a --method dml run; KD's teacher is a plain run"):
        load_teacher(str(tmp_path / "dml"), 3, 3)
    with pytest.raises(SystemExit, match="the teacher has num_classes=3 but this dataset 10"):
        load_teacher(str(tmp_path / "teacher" / "last.pt"), 3, 10)


def test_train_cifar_free_controls_and_the_losss_parts_per_epoch(tmp_path, capsys):
    """--ema-decay deploys the weight average and logs the live weights beside it; --label-smoothing trains plain
    with smoothed labels; OSAKD's scalar parts (its soft-label diagnostics) are logged per epoch; both controls are
    refused for another method."""
    pytest.importorskip("PIL", reason="pillow is an optional extra: pip install 'kdwrap[demo]'")
    write_fake_cifar_pack(tmp_path / "pack.npz")
    common = ["--data", "pack.npz", "--model", "lenet5", "--epochs", "2", "--batch-size", "2", "--device", "cpu",
              "--no-progress", "--lr", "0.05"]
    _run(tmp_path, "train_cifar.py", *common, "--ema-decay", "0.5", "--out", "ema")
    history = _resume_is_a_no_op(tmp_path, "ema", *common, "--ema-decay", "0.5")
    assert all("test_acc_live" in e for e in history["epochs"])
    assert history["config"]["ema_decay"] == 0.5 and history["deployed_test_acc"] == history["last_test_acc"]
    ckpt = torch.load(tmp_path / "ema" / "last.pt", weights_only=True)
    deployed = torch.load(tmp_path / "ema" / "deployed.pt")
    live = ckpt["model"]
    for key, value in deployed.items():  # the deployed weights are the average's, not the live network's
        assert torch.equal(value, ckpt["average"][f"average.{key}"]), key
    assert any(not torch.equal(deployed[k], live[k]) for k in live)

    _run(tmp_path, "train_cifar.py", *common, "--label-smoothing", "0.1", "--out", "ls")
    assert json.loads((tmp_path / "ls" / "history.json").read_text())["config"]["label_smoothing"] == 0.1

    _run(tmp_path, "train_cifar.py", *common, "--method", "osakd", "--bank-size", "0", "--out", "osakd")
    parts = json.loads((tmp_path / "osakd" / "history.json").read_text())["epochs"][-1]["parts"]
    assert {"ce", "distill", "soft_true_mass", "soft_one_hot"} <= set(parts)
    assert 0.0 <= parts["soft_one_hot"] <= 1.0 and 0.0 <= parts["soft_true_mass"] <= 1.0

    parse_args = _example("train_cifar.py").parse_args
    for control in (["--label-smoothing", "0.1"], ["--ema-decay", "0.999"]):
        with pytest.raises(SystemExit):
            parse_args([*common, "--method", "one", *control, "--out", "x"])
    assert "free controls of plain training" in capsys.readouterr().err


@pytest.mark.parametrize("method", kdwrap.METHODS)
def test_deploy_rebuilds_and_exports_a_run_of_every_method(tmp_path, monkeypatch, capsys, method):
    """deploy.py reads the method from a train_cifar.py checkpoint and deploys it through kdwrap.export: the same
    weights as the run's own deployed.pt, and torch.export and ONNX agree with the wrapper."""
    pytest.importorskip("PIL", reason="pillow is an optional extra: pip install 'kdwrap[demo]'")
    write_fake_cifar_pack(tmp_path / "pack.npz")
    monkeypatch.chdir(tmp_path)
    common = ["--data", "pack.npz", "--model", "lenet5", "--epochs", "1", "--batch-size", "2", "--limit-train", "2",
              "--limit-test", "2", "--device", "cpu", "--no-progress"]
    train_cifar = _example("train_cifar.py")
    teacher = []
    if method == "kd":
        train_cifar.main([*common, "--out", "teacher"])
        teacher = ["--teacher", "teacher"]
    train_cifar.main([*common, "--method", method, *teacher, "--out", "run"])
    shutil.rmtree("teacher", ignore_errors=True)  # deploying a KD run needs no teacher

    monkeypatch.setattr(sys, "argv", ["deploy.py", "--checkpoint", "run/last.pt", "--out", "dep"])
    capsys.readouterr()
    _example("deploy.py").main()
    out = capsys.readouterr().out
    assert "all checked outputs agree" in out and "could not run" not in out, out
    assert f"kdwrap {method}" in out.lower()  # the method read from the checkpoint, in its summary
    trained, deployed = (torch.load(Path(p)) for p in ("run/deployed.pt", "dep/deployed.pt"))
    assert trained.keys() == deployed.keys()
    for key, value in trained.items():
        assert torch.equal(deployed[key], value), key
