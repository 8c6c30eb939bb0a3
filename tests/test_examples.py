"""The example scripts run end to end on tiny offline data (a synthetic CIFAR pack, scikit-learn's digits)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import kdwrap.models  # noqa: F401  (registers cifar_resnet* with timm)
from test_data import _fake_pack

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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
    pytest.importorskip("PIL")
    _fake_pack(tmp_path / "pack.npz")
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
