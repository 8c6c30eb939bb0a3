"""PyTorch Lightning: the LightningModule pattern of docs/integrations.md trains a kdwrap model, its checkpoints
hold the loss's state (ONE's ramp-up clock, OSAKD's memory bank) so that ``fit(ckpt_path=...)`` resumes it, and
kdwrap.integrations.lightning.ExportAtFitEnd exports the deployable model."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

pl = pytest.importorskip("lightning.pytorch", reason="lightning is an optional extra: pip install 'kdwrap[lightning]'")

import kdwrap  # noqa: E402
import kdwrap.models  # noqa: E402,F401  (registers lenet5 with timm)
from integration_recipes import run_recipe  # noqa: E402
from kdwrap.integrations.lightning import ExportAtFitEnd  # noqa: E402

QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False, logger=False, enable_checkpointing=False,
             enable_model_summary=False)
WRAPPERS = {
    "one": lambda net: kdwrap.one(net, branches=2, rampup_steps=10),
    "osakd": lambda net: kdwrap.osakd(net, k=2, bank_size=16),
}


class KDClassifier(pl.LightningModule):
    def __init__(self, method: str) -> None:
        super().__init__()
        self.model, self.loss_fn = WRAPPERS[method](timm.create_model("lenet5", num_classes=10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader() -> torch.utils.data.DataLoader:
    """Two batches of 8 random images, in a fixed order: every epoch sees the same batches."""
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


class _LossStateAtTrainStart(pl.Callback):
    """The loss's state once Lightning has restored the checkpoint, before the first resumed step."""

    def on_train_start(self, trainer, pl_module):
        self.state = copy.deepcopy(pl_module.loss_fn.state_dict())


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key], key


@pytest.mark.parametrize("method", list(WRAPPERS))
def test_fit_resumes_the_loss_state_from_a_checkpoint_and_exports(method, tmp_path):
    torch.manual_seed(0)
    uninterrupted = KDClassifier(method)
    export = ExportAtFitEnd(tmp_path / "deployed.pt")
    pl.Trainer(max_epochs=2, callbacks=[export], **QUIET).fit(uninterrupted, loader())

    torch.manual_seed(0)
    first = KDClassifier(method)
    trainer = pl.Trainer(max_epochs=1, **QUIET)
    trainer.fit(first, loader())
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    saved = copy.deepcopy(first.loss_fn.state_dict())
    assert first.loss_fn.step == 2 and (method == "one" or int(saved["bank.count"]) == 16)

    torch.manual_seed(1)  # other initial weights: everything must come from the checkpoint
    resumed = KDClassifier(method)
    probe = _LossStateAtTrainStart()
    pl.Trainer(max_epochs=2, callbacks=[probe], **QUIET).fit(resumed, loader(), ckpt_path=tmp_path / "epoch1.ckpt")
    assert_same_state(probe.state, saved)
    # ...and the resumed fit ends where the uninterrupted one does (CPU, same batches): bit for bit
    assert_same_state(resumed.loss_fn.state_dict(), uninterrupted.loss_fn.state_dict())
    for p, q in zip(resumed.parameters(), uninterrupted.parameters(), strict=True):
        assert torch.equal(p, q)

    x = torch.randn(4, 3, 32, 32)
    uninterrupted.model.eval()
    reloaded = timm.create_model("lenet5", num_classes=10).eval()
    reloaded.load_state_dict(torch.load(tmp_path / "deployed.pt"))
    with torch.no_grad():
        torch.testing.assert_close(export.exported(x), uninterrupted.model(x))
        torch.testing.assert_close(reloaded(x), uninterrupted.model(x))


class _LossNotAnAttribute(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model, loss_fn = kdwrap.osakd(timm.create_model("lenet5", num_classes=10))
        self.losses = [loss_fn]  # hidden from Lightning: its bank would be missing from checkpoints

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.losses[0](self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_export_callback_refuses_a_loss_that_checkpoints_would_miss():
    with pytest.raises(ValueError, match="not a submodule of the LightningModule"):
        pl.Trainer(max_epochs=1, callbacks=[ExportAtFitEnd()], **QUIET).fit(_LossNotAnAttribute(), loader())


def test_the_lightning_recipe_of_the_docs_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_recipe("PyTorch Lightning", blocks=1)
    assert (tmp_path / "deployed.pt").is_file() and (tmp_path / "kd.ckpt").is_file()
    assert namespace["resumed"].lightning_module.loss_fn.step == 8  # 4 steps restored + 4 resumed
