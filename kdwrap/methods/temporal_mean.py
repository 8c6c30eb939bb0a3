"""Temporal means (exponential moving averages) of a wrapper's pieces, kept inside the wrapper as buffers (PCL's peer
mean teachers).

A mean copy is a deep copy of a piece whose parameters are turned into buffers of the same names: it computes as the
piece does, ``state_dict`` holds it under the piece's own keys, and neither an optimizer (it has no parameters) nor
autograd (it is only run under ``no_grad``) touches it. Its BatchNorm statistics are its own, gathered by its own
training-mode forwards, as the mean-teacher code does (only the weights are averaged).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["mean_copy", "mean_decay", "parameter_names", "update_means"]


def mean_copy(piece: nn.Module) -> nn.Module:
    """A deep copy of ``piece`` with every parameter turned into a (persistent) buffer of the same name."""
    mean = copy.deepcopy(piece)
    for module in mean.modules():
        for name, p in list(module._parameters.items()):
            del module._parameters[name]
            # a None parameter (Conv2d(bias=False)) stays a None attribute, which the module's forward reads
            module.register_buffer(name, None if p is None else p.detach().clone())
    return mean


def mean_decay(updates: torch.Tensor, decay: float) -> torch.Tensor:
    """The averaging weight of update number ``updates`` (0-based): ``min(decay, 1 - 1 / (updates + 1))``, the
    mean-teacher code's warm-up, so that the first updates take the true average of the weights seen so far
    (the first one copies them). A tensor, so that the update stays inside a compiled graph."""
    warm = 1.0 - 1.0 / (updates.to(torch.float32) + 1.0)
    return torch.clamp(warm, max=decay)


@torch.no_grad()
def update_means(
    pairs: list[tuple[nn.Module, nn.Module, list[str]]], updates: torch.Tensor, decay: float,
    take: torch.Tensor | None = None,
) -> None:
    """``mean <- a * mean + (1 - a) * live`` for each named parameter of each ``(live, mean, names)``, ``a`` of
    :func:`mean_decay`; then ``updates += 1``. With ``take`` (a bool tensor), only where it is true: ``a = 1`` and
    no count otherwise, decided on the device (no host sync). Names are resolved at every call: ``.to()`` replaces
    buffers."""
    means, lives = [], []
    for live, mean, names in pairs:
        for name in names:
            means.append(mean.get_buffer(name))
            lives.append(live.get_parameter(name))
    a = mean_decay(updates, decay)
    if take is not None:
        a = torch.where(take, a, torch.ones_like(a))
    groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for m, p in zip(means, lives):
        if m.is_floating_point():  # integer parameters (rare: quantised models) are not averaged
            group = groups.setdefault((m.dtype, m.device), ([], []))
            group[0].append(m)
            group[1].append(p.detach())
    for (dtype, device), (ms, ps) in groups.items():
        # m <- a m + (1 - a) p, the mean-teacher code's order of operations; a is a tensor: no host sync and no
        # graph break under torch.compile.
        torch._foreach_mul_(ms, a.to(device=device, dtype=dtype))
        torch._foreach_add_(ms, torch._foreach_mul(ps, (1.0 - a).to(device=device, dtype=dtype)))
    updates.add_(1 if take is None else take.to(updates.dtype))


def parameter_names(piece: nn.Module) -> list[str]:
    """The names of ``piece``'s parameters that a mean copy holds as buffers (shared tensors once)."""
    return [name for name, _ in piece.named_parameters()]
