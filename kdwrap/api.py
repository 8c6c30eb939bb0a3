"""The public entry points: wrap a model for a method, export the deployable model, summarise a wrapper. Each
method's entry point (``one``, ``osakd``, ...) is declared once, in its module under :mod:`kdwrap.methods`, which
registers it in :data:`METHODS`; this module exports them."""
from __future__ import annotations

from typing import Any

from torch import nn

from .base import KDLoss, KDModel, unwrap
from .methods import METHODS, register_method
from .methods.byot import byot
from .methods.dml import dml
from .methods.kd import kd
from .methods.okddip import okddip
from .methods.one import one
from .methods.osakd import osakd
from .methods.pcl import pcl

__all__ = [
    "METHODS", "register_method", "wrap", "one", "osakd", "kd", "dml", "okddip", "byot", "pcl", "export", "summary",
]


def wrap(net: nn.Module, method: str = "one", **kwargs: Any) -> tuple[KDModel, KDLoss]:
    """Wrap ``net`` for online KD with ``method`` (a name in :data:`METHODS`). Returns ``(model, loss_fn)``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[method](net, **kwargs)


def _kd_model(model: nn.Module) -> KDModel:
    inner = unwrap(model)
    if not isinstance(inner, KDModel):
        raise TypeError(
            f"expected a model returned by kdwrap.wrap/{'/'.join(METHODS)} (possibly inside DDP or torch.compile), "
            f"got {type(inner).__name__}"
        )
    return inner


def export(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Return the deployable plain model of a kdwrap model (the original class, original ``state_dict`` keys).

    ONE: ``branch=i`` picks the branch kept (default: the one ``model(x)`` returns); ``ensemble=True`` returns the
    gated ensemble (ONE-E) as a module with a plain Tensor output. OSAKD: the original model, with no hook. KD: the
    student (never the teacher). DML: ``peer=i`` picks the peer kept (default: the one ``model(x)`` returns).
    OKDDip: the group leader (or ``branch=i``). BYOT: the network without its exits, or ``exits=True`` for a multi-exit model returning every
    exit's logits. PCL: the temporal mean of peer 0 (or ``branch=i``; ``mean=False`` for the live peer).
    """
    return _kd_model(model).export(**kwargs)


def summary(model: nn.Module, **kwargs: Any) -> str:
    """A human-readable description of a kdwrap model: method, split, parameter counts, FLOP shares."""
    return _kd_model(model).summary(**kwargs)
