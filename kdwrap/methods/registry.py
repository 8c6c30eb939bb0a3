"""The registry of methods, timm's ``register_model`` for kdwrap: each method's module declares its entry point
(``kdwrap.one``, ...) once, beside the classes it builds, with :func:`entry_point`; :mod:`kdwrap.api` exports what
is registered here. Importing :mod:`kdwrap.methods` imports every method's module, so the registry is full (in the
order of that package's imports) before ``kdwrap.wrap`` reads it."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from torch import nn

from ..base import KDLoss, KDModel, unwrap

__all__ = ["METHODS", "Wrapper", "check_net", "entry_point", "register_method"]

Wrapper = Callable[..., "tuple[KDModel, KDLoss]"]
# Method name -> its entry point (``kdwrap.one``, ...): what ``wrap(net, method=name)`` calls.
METHODS: dict[str, Wrapper] = {}


def register_method(name: str) -> Callable[[Wrapper], Wrapper]:
    """Register ``fn(net, **options) -> (model, loss_fn)`` as ``kdwrap.wrap(net, method=name)``."""
    def add(fn: Wrapper) -> Wrapper:
        if name in METHODS:
            raise ValueError(f"kdwrap method {name!r} is already registered (by {METHODS[name].__qualname__})")
        METHODS[name] = fn
        return fn

    return add


def check_net(net: nn.Module) -> None:
    """A network every entry point takes: a bare ``nn.Module``, not yet wrapped by kdwrap, DDP or torch.compile."""
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


def entry_point(name: str, check: bool = True) -> Callable[[Wrapper], Wrapper]:
    """Declare ``fn(net, ...)`` as the public entry point ``kdwrap.<name>`` and ``kdwrap.wrap(net, method=name)``.
    The registered function checks its first argument (each network, for a list) with :func:`check_net`, then calls
    ``fn``; ``help()`` shows ``fn``'s signature and docstring. ``check=False``: ``fn`` checks it itself (after
    checks of its own that come first)."""
    def declare(fn: Wrapper) -> Wrapper:
        if not check:
            return register_method(name)(fn)
        signature = inspect.signature(fn)
        first = next(iter(signature.parameters))

        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> tuple[KDModel, KDLoss]:
            try:
                net = signature.bind(*args, **kwargs).arguments[first]
            except (TypeError, KeyError):
                return fn(*args, **kwargs)  # fn raises Python's own error for the arguments
            for n in (net if isinstance(net, (list, tuple)) else [net]):
                check_net(n)
            return fn(*args, **kwargs)

        return register_method(name)(checked)

    return declare
