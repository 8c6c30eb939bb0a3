"""What a model costs: its parameters (each tensor once) and its forward FLOPs."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_parameters", "forward_flops"]


def count_parameters(modules: Iterable[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def forward_flops(module: nn.Module, *args: Any) -> tuple[int, Any]:
    """Forward FLOPs of ``module(*args)`` (``torch.utils.flop_counter``: matmuls, convolutions) and its output."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        out = module(*args)
    return counter.get_total_flops(), out
