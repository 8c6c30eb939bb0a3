"""What a model's forward costs: its FLOPs (its parameters are counted by :func:`kdwrap.base.count_parameters`,
which the methods that never trace use too)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["forward_flops"]


def forward_flops(module: nn.Module, *args: Any) -> tuple[int, Any]:
    """Forward FLOPs of ``module(*args)`` (``torch.utils.flop_counter``: matmuls, convolutions) and its output."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        out = module(*args)
    return counter.get_total_flops(), out
