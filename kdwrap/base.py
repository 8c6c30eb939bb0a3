"""What every kdwrap method shares: a wrapper whose forward returns the deployed model's logits and captures what
the loss needs, and a loss that consumes exactly one capture per forward (as NVIDIA ModelOpt's distillation does)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["KDModel", "KDLoss", "unwrap"]


class KDModel(nn.Module):
    """Base class of the wrapped models returned by :func:`kdwrap.wrap`.

    ``forward`` returns a plain logits tensor (what the deployed model returns); whatever else the loss needs is
    kept in ``self._capture`` until the paired :class:`KDLoss` takes it.
    """

    method: str = ""

    def __init__(self) -> None:
        super().__init__()
        self._capture: Any = None

    def _put_capture(self, value: Any) -> None:
        self._capture = value

    def _take_capture(self) -> Any:
        value = self._capture
        if value is None:
            raise RuntimeError(
                f"kdwrap {self.method}: loss_fn was called without a preceding forward of the wrapped model "
                "(or twice for one forward). Call it exactly once per forward: loss = loss_fn(model(x), y)."
            )
        self._capture = None
        return value

    def export(self, **kwargs: Any) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def summary(self, **kwargs: Any) -> str:  # pragma: no cover - abstract
        return repr(self)


class KDLoss(nn.Module):
    """Base class of kdwrap's losses. ``parts`` holds the detached terms of the last loss, for logging."""

    def __init__(self, model: KDModel) -> None:
        super().__init__()
        # A plain attribute, not a submodule: the loss's state_dict must not repeat the model's weights.
        self.__dict__["_model"] = model
        self.parts: dict[str, torch.Tensor] = {}

    @property
    def model(self) -> KDModel:
        return self.__dict__["_model"]


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel / torch.compile wrappers around a kdwrap model."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
    return model
