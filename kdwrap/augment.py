"""Batch augmentation as tensor ops on the batch's device: the CIFAR crop-and-flip that PCL's peers' views
(:mod:`kdwrap.methods.peer_views`) and the demo's and examples' training loops (:mod:`kdwrap.demo.data`) share.

It imports nothing from kdwrap, so the demo's data helpers need no method, and the methods no demo.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["random_crop_flip"]


def random_crop_flip(
    x: torch.Tensor, padding: int | None = None, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Each image of ``x`` (``N x C x H x W``) shifted by a random crop of its zero-padded self and, with ``flip``,
    mirrored left-right with probability 1/2, independently per image: the CIFAR recipe (``RandomCrop(H, padding)``
    + ``RandomHorizontalFlip``) as one gather on ``x``'s device. ``padding`` defaults to ``H // 8`` (4 for 32 px).

    ``generator`` (on ``x``'s device) makes it reproducible; without one it draws from torch's default generator,
    and compiles under ``torch.compile`` without a graph break. The draws, in order: the row offsets, the column
    offsets (none when ``padding`` is 0), the flips (none without ``flip``).

    Pads with zeros, so apply it after normalisation to pad with the mean colour, as torchvision's
    ``RandomCrop(32, padding=4)`` on normalised tensors does.
    """
    if x.dim() != 4:
        raise ValueError(f"expected an N x C x H x W batch, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    dev = x.device
    p = h // 8 if padding is None else int(padding)
    if p > 0:
        xp = F.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (n,), device=dev, generator=generator)
        ox = torch.randint(0, 2 * p + 1, (n,), device=dev, generator=generator)
    else:
        xp = x
        oy = ox = torch.zeros(n, dtype=torch.long, device=dev)
    rows = oy[:, None] + torch.arange(h, device=dev)  # n x h
    cols = torch.arange(w, device=dev).expand(n, w)  # n x w
    if flip:
        mirror = torch.rand(n, device=dev, generator=generator) < 0.5
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    cols = ox[:, None] + cols
    b = torch.arange(n, device=dev)[:, None, None]
    # Advanced indexing around the channel slice puts the indexed dims first: n x h x w x c.
    out = xp[b, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
