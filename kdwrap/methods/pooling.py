"""Global average pooling of a feature map or token sequence, whichever axis holds the channels: how ONE's gate,
OKDDip's attention and BYOT's heads read features."""
from __future__ import annotations

import torch

__all__ = ["global_pool"]


def global_pool(f: torch.Tensor, channels_dim: int) -> torch.Tensor:
    """Average over every axis but batch and channels: NCHW (``channels_dim=1``), NHWC or B x N x D (``-1``)."""
    if f.ndim <= 2:
        return f
    if channels_dim == 1:
        return f.flatten(2).mean(-1)
    return f.flatten(1, -2).mean(1)
