"""Accelerate: ``accelerator.prepare`` takes a kdwrap model, ``save_state`` / ``load_state`` keep the loss's state
once it is registered for checkpointing, and ``kdwrap.export(accelerator.unwrap_model(model))`` gives the deployable
model with the wrapper's eval outputs."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

pytest.importorskip("accelerate", reason="accelerate is an optional extra: pip install 'kdwrap[hf]'")
from accelerate import Accelerator  # noqa: E402

import kdwrap  # noqa: E402
import kdwrap.models  # noqa: E402,F401  (registers lenet5 with timm)
from integration_recipes import run_recipe  # noqa: E402

WRAPPERS = {
    "one": lambda: kdwrap.one(timm.create_model("lenet5", num_classes=10), branches=2, rampup_steps=10),
    "osakd": lambda: kdwrap.osakd(timm.create_model("lenet5", num_classes=10), k=2, bank_size=16),
}


def prepared(method: str) -> tuple[Accelerator, torch.nn.Module, kdwrap.KDLoss, torch.optim.Optimizer, object]:
    accelerator = Accelerator(cpu=True)
    model, loss_fn = WRAPPERS[method]()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
    model, optimizer, loader = accelerator.prepare(model, optimizer, torch.utils.data.DataLoader(data, batch_size=4))
    loss_fn.to(accelerator.device)
    accelerator.register_for_checkpointing(loss_fn)
    return accelerator, model, loss_fn, optimizer, loader


@pytest.mark.parametrize("method", list(WRAPPERS))
def test_prepare_train_save_load_state_and_export(method, tmp_path):
    accelerator, model, loss_fn, optimizer, loader = prepared(method)
    for x, y in loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
    assert loss_fn.step == 4
    accelerator.save_state(str(tmp_path / "state"))
    saved_loss, saved_model = copy.deepcopy(loss_fn.state_dict()), copy.deepcopy(model.state_dict())

    unwrapped = accelerator.unwrap_model(model)
    deployed = kdwrap.export(unwrapped).eval()
    assert type(deployed) is type(timm.create_model("lenet5"))
    unwrapped.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), unwrapped(x))

    # a fresh run (another process would start the same way) restores the model and the loss's state
    torch.manual_seed(1)
    accelerator, model, loss_fn, optimizer, loader = prepared(method)
    accelerator.load_state(str(tmp_path / "state"))
    for key, value in saved_loss.items():
        got = loss_fn.state_dict()[key]
        assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, key
    for key, value in saved_model.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_the_accelerate_recipe_of_the_docs_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_recipe("Accelerate", blocks=1)
    assert (tmp_path / "kd-state").is_dir()
    assert namespace["loss_fn"].step == 4 and type(namespace["deployed"]).__name__ == "LeNet5"
