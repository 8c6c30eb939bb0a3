"""Branches that start from their own random initialisation, made the way the model initialises itself, as the
reference code builds each ONE branch separately (rather than as copies of one tail)."""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["MODEL_INITIALISERS", "reinitialise_like"]


def _reset_parameters(module: nn.Module) -> None:
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()


# Whole-model initialisers, tried in order after every module's reset_parameters(): timm models expose
# init_weights(), kdwrap's and many hand-written models _init_weights(). Only one callable without arguments is used
# (timm's per-module _init_weights(m) takes one and is skipped).
MODEL_INITIALISERS = ("init_weights", "_init_weights")


def _own_initialiser(net: nn.Module) -> Callable[[], Any] | None:
    for name in MODEL_INITIALISERS:
        fn = getattr(net, name, None)
        if not callable(fn):
            continue
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            continue
        if all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            return fn
    return None


def reinitialise_like(net: nn.Module, tails: Sequence[nn.Module]) -> None:
    """Give each of ``tails`` (copies of a piece of ``net``, keyed as ``net`` is) the values a fresh initialisation
    of ``net`` gives those modules: every module's ``reset_parameters()``, then the model's own initialiser
    (:data:`MODEL_INITIALISERS`) where it has one, so branches start as the reference code's separately built
    branches do (a CIFAR ResNet's He fan-out convs, timm's zero-initialised last BN of each block, ...)."""
    fresh = copy.deepcopy(net)
    init = _own_initialiser(fresh)
    for tail in tails:
        with torch.no_grad():
            _reset_parameters(fresh)
            if init is not None:
                init()
        state = fresh.state_dict()
        mine = tail.state_dict()
        unknown = [k for k in mine if k not in state or state[k].shape != mine[k].shape]
        if unknown:
            # A tail whose keys are not the model's (a custom piece): each module's own default is all there is.
            _reset_parameters(tail)
            continue
        tail.load_state_dict({k: state[k] for k in mine})
