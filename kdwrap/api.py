"""The public entry points: wrap a model for a method, export the deployable model, summarise a wrapper."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .base import KDLoss, KDModel, unwrap

__all__ = ["METHODS", "register_method", "wrap", "one", "osakd", "export", "summary"]

Wrapper = Callable[..., "tuple[KDModel, KDLoss]"]
# Method name -> its entry point (``kdwrap.one``, ...): what ``wrap(net, method=name)`` calls. Filled by
# register_method, so a method is declared once, where it is defined.
METHODS: dict[str, Wrapper] = {}


def register_method(name: str) -> Callable[[Wrapper], Wrapper]:
    """Register ``fn(net, **options) -> (model, loss_fn)`` as ``kdwrap.wrap(net, method=name)``."""
    def add(fn: Wrapper) -> Wrapper:
        if name in METHODS:
            raise ValueError(f"kdwrap method {name!r} is already registered (by {METHODS[name].__qualname__})")
        METHODS[name] = fn
        return fn

    return add


def _check_net(net: nn.Module) -> None:
    if not isinstance(net, nn.Module):
        raise TypeError(f"kdwrap expects a torch.nn.Module, got {type(net).__name__}")
    if isinstance(unwrap(net), KDModel):
        raise ValueError(
            f"this model is already wrapped by kdwrap ({unwrap(net).method}); wrap the original model once, "
            "or call kdwrap.export(model) first to get the plain model back"
        )
    if unwrap(net) is not net:
        raise ValueError(
            "wrap the bare model, then apply DistributedDataParallel / torch.compile to the kdwrap model: "
            "model, loss_fn = kdwrap.wrap(net, ...); model = DDP(model)"
        )


@register_method("one")
def one(net: nn.Module, branches: int = 3, **kwargs: Any) -> tuple[KDModel, KDLoss]:
    """Wrap ``net`` for ONE (On-the-fly Native Ensemble). Returns ``(model, loss_fn)``.

    Options (``split``, ``temperature``, ``rampup_steps``, ...): see :class:`kdwrap.methods.one.ONEModel` and
    :class:`kdwrap.methods.one.ONELoss`; an unknown one raises :class:`OptionError` listing the valid ones.
    """
    from .methods.one import build_one

    _check_net(net)
    return build_one(net, branches=branches, **kwargs)


@register_method("osakd")
def osakd(net: nn.Module, **kwargs: Any) -> tuple[KDModel, KDLoss]:
    """Wrap ``net`` for OSAKD (Online Self-Acquired KD). Returns ``(model, loss_fn)``.

    Options (``k``, ``alpha``, ``bank_size``, ``backend``, ...): see :class:`kdwrap.methods.osakd.OSAKDLoss`; an
    unknown one raises :class:`OptionError` listing the valid ones.
    """
    from .methods.osakd import build_osakd

    _check_net(net)
    return build_osakd(net, **kwargs)


def wrap(net: nn.Module, method: str = "one", **kwargs: Any) -> tuple[KDModel, KDLoss]:
    """Wrap ``net`` for online KD with ``method`` (a name in :data:`METHODS`). Returns ``(model, loss_fn)``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[method](net, **kwargs)


def _kd_model(model: nn.Module) -> KDModel:
    inner = unwrap(model)
    if not isinstance(inner, KDModel):
        raise TypeError(
            f"expected a model returned by kdwrap.wrap/one/osakd (possibly inside DDP or torch.compile), "
            f"got {type(inner).__name__}"
        )
    return inner


def export(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Return the deployable plain model of a kdwrap model (the original class, original ``state_dict`` keys).

    ONE: ``branch=i`` picks the branch kept (default: the one ``model(x)`` returns); ``ensemble=True`` returns the
    gated ensemble (ONE-E) as a module with a plain Tensor output. OSAKD: the original model, with no hook.
    """
    return _kd_model(model).export(**kwargs)


def summary(model: nn.Module, **kwargs: Any) -> str:
    """A human-readable description of a kdwrap model: method, split, parameter counts, FLOP shares."""
    return _kd_model(model).summary(**kwargs)
