"""PyTorch Lightning: a callback that exports the deployable model when ``fit`` ends (``pip install kdwrap[lightning]``).

kdwrap needs no special LightningModule: build the wrapper in ``__init__``, keep the model *and* the loss as
attributes (so the loss's state, ONE's ramp-up clock or OSAKD's memory bank, is a submodule and goes into every
Lightning checkpoint), and return ``self.loss_fn(self.model(x), y)`` from ``training_step``. docs/integrations.md
has the complete recipe.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError as err:
    raise ImportError(
        f"kdwrap.integrations.lightning needs PyTorch Lightning ({err}); kdwrap does not install it by default: "
        "pip install kdwrap[lightning]"
    ) from err

from ..api import export
from ..base import KDLoss, KDModel

__all__ = ["ExportAtFitEnd"]


class ExportAtFitEnd(pl.Callback):
    """When ``trainer.fit`` ends, export the kdwrap model inside the LightningModule and keep it as
    :attr:`exported` (the user's class, the trained weights, in eval mode); with ``path``, the main process also
    saves its ``state_dict`` there.

    At setup it checks that the LightningModule holds exactly one kdwrap model and its loss as submodules: the
    loss must be one for Lightning's checkpoints to hold its state, so that ``fit(ckpt_path=...)`` resumes ONE's
    ramp-up clock and OSAKD's memory bank.

    Args:
        path: file for the exported ``state_dict`` (loads into a fresh instance of your class); ``None``: keep it
            in memory only.
        export_options: passed to :func:`kdwrap.export` (ONE: ``branch=``, ``ensemble=True``).
    """

    def __init__(self, path: str | Path | None = None, **export_options: Any) -> None:
        super().__init__()
        self.path = Path(path) if path is not None else None
        self.export_options = export_options
        self.exported: nn.Module | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check, before any step, that the kdwrap model and its loss are submodules of ``pl_module``."""
        _kd_model_of(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Export the trained model (and save it from the main process when ``path`` is set)."""
        self.exported = export(_kd_model_of(pl_module), **self.export_options).eval()
        if self.path is not None and trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.exported.state_dict(), self.path)


def _kd_model_of(pl_module: pl.LightningModule) -> KDModel:
    """The one kdwrap model among ``pl_module``'s submodules, after checking that its loss is one too."""
    models = [m for m in pl_module.modules() if isinstance(m, KDModel)]
    if len(models) != 1:
        found = "none" if not models else f"{len(models)} ({', '.join(type(m).__name__ for m in models)})"
        raise ValueError(
            f"ExportAtFitEnd: the LightningModule must hold exactly one kdwrap model as a submodule, found {found}; "
            "assign it in __init__: self.model, self.loss_fn = kdwrap.one(net)"
        )
    model = models[0]
    if not any(isinstance(m, KDLoss) and m.model is model for m in pl_module.modules()):
        raise ValueError(
            "ExportAtFitEnd: the kdwrap loss of the model is not a submodule of the LightningModule, so Lightning's "
            "checkpoints would not hold its state (ONE's ramp-up clock, OSAKD's memory bank) and a resumed fit "
            "would restart it; assign it in __init__: self.model, self.loss_fn = kdwrap.one(net)"
        )
    return model
