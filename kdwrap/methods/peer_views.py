"""The peers' own views of a batch (PCL): each peer sees its own random augmentation of every sample, made on the
batch's device inside the training forward, so that the user's loop stays ``loss_fn(model(x), y)``.

A view mode is a rule for turning the batch ``x`` given to ``model(x)`` into the ``m`` peers' inputs, returned as
one tensor of ``m * B`` samples (peer ``i``'s view is rows ``[i*B, (i+1)*B)``), which the trunk then runs on one
view at a time; ``None`` means every peer takes ``x`` itself (one trunk pass).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..augment import random_crop_flip

__all__ = ["VIEW_MODES", "check_augment", "peer_views", "describe_views"]


def _crop_flip_views(x: torch.Tensor, m: int, augment: Any, sample_rank: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"kdwrap pcl: augment='crop_flip' crops image batches (B, C, H, W) of floats, got {what}; pass "
            "augment=None (every peer sees the batch as given) or your own augment=callable(x) -> x"
        )
    # torch's default generator: no generator object in the graph, so no graph break under torch.compile
    return random_crop_flip(x.repeat(m, 1, 1, 1))


def _own_views(x: torch.Tensor, m: int, augment: Callable, sample_rank: int | None = None) -> torch.Tensor:
    views = [augment(x) for _ in range(m)]
    for i, v in enumerate(views):
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            what = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(
                f"kdwrap pcl: augment returned {what} for peer {i}, expected a tensor of the batch's shape "
                f"{tuple(x.shape)}: augment(x) must return one augmented copy of x"
            )
    return torch.cat(views)


def _given_views(x: torch.Tensor, m: int, augment: Any, sample_rank: int | None = None) -> torch.Tensor:
    # sample_rank: the rank of one ordinary sample (3 for C x H x W), where known; a (B, C, H, W) batch whose C
    # happens to equal m has the right axis 1 but one axis too few, and would reach the network as a raw error.
    wrong_rank = isinstance(x, torch.Tensor) and sample_rank is not None and x.dim() != sample_rank + 2
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != m or wrong_rank:
        what = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        if wrong_rank:
            what = f"{what}, {x.dim()} axes where a batch of views of {sample_rank}-axis samples has {sample_rank + 2}"
        raise ValueError(
            f"kdwrap pcl: augment='views' takes training batches of shape (B, {m}, ...) (peer i's view of each "
            f"sample at [:, i]), got {what}; stack the {m} views in your dataset, or use augment='crop_flip'"
        )
    return x.transpose(0, 1).flatten(0, 1)


def _no_views(x: Any, m: int, augment: Any, sample_rank: int | None = None) -> None:
    return None


# augment option -> (how the views are made, what summary() and the docs say about it)
VIEW_MODES: dict[Any, tuple[Callable[[Any, int, Any], torch.Tensor | None], str]] = {
    "crop_flip": (_crop_flip_views, "each peer its own random crop (zero padding H/8) and flip of every sample, made "
                  "on the batch's device"),
    "views": (_given_views, "each peer the view the data loader stacked for it (batches of shape (B, m, ...))"),
    None: (_no_views, "every peer the batch as given (no view of its own)"),
}


def check_augment(augment: Any) -> Any:
    """``augment`` if it names a view mode or is a callable, else a clear error listing the valid values."""
    if callable(augment) or (isinstance(augment, (str, type(None))) and augment in VIEW_MODES):
        return augment
    raise ValueError(
        f"kdwrap pcl: augment={augment!r} is not a view mode; valid: 'crop_flip' (default: a random crop and flip "
        "per peer, on the device), 'views' (your data loader stacks the m views), None (every peer sees the same "
        "batch), or a callable augment(x) -> x called once per peer"
    )


def peer_views(augment: Any, x: Any, m: int, sample_rank: int | None = None) -> torch.Tensor | None:
    """The ``m`` peers' views of ``x`` as one ``m*B`` batch, peer-major, or ``None`` when they all see ``x``.
    ``sample_rank``: the number of axes of one sample (3 for images), where known, so that a batch without the views
    axis is a clear error."""
    make = _own_views if callable(augment) else VIEW_MODES[augment][0]
    return make(x, m, augment, sample_rank)


def describe_views(augment: Any) -> str:
    if callable(augment):
        return f"each peer its own call of {getattr(augment, '__qualname__', type(augment).__name__)}(x)"
    return VIEW_MODES[augment][1]
