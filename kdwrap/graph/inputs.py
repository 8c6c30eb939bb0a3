"""What kdwrap reads off a model it was not told about for its inputs: the size the model declares, a plausible
random input, and the mode a trial forward runs in."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

__all__ = ["example_input", "declared_input_size", "trial_mode"]


@contextmanager
def trial_mode(net: nn.Module) -> Iterator[None]:
    """Every module of ``net`` in eval mode, no autograd, for a trial forward; each module's own mode restored
    after (a user's frozen BatchNorm stays frozen)."""
    modes = [m.training for m in net.modules()]
    net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(net.modules(), modes):
            m.training = mode


def example_input(net: nn.Module, input_size: Sequence[int] | None = None, batch: int = 1) -> torch.Tensor:
    """A random input for ``net``: ``input_size`` (C, H, W), else a guess from the model (image-size attributes,
    timm's ``pretrained_cfg``, the first convolution's input channels; 224 x 224 by default)."""
    input_size = tuple(input_size) if input_size is not None else _guess_input_size(net)
    param = next(iter(net.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    # A private generator: building a wrapper must not advance the user's global RNG (seeded runs stay seeded).
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(0))
    return x.to(device=device, dtype=dtype)


def _first_layer(net: nn.Module) -> nn.Module | None:
    return next((m for m in net.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))), None)


def declared_input_size(net: nn.Module) -> tuple[int, ...] | None:
    """(C, H, W) the model states for its inputs, ``None`` when it states none: its image size (timm's
    ``img_size``, torchvision ViT's ``image_size``, on the model or its ``patch_embed``; a Hugging Face config's
    ``image_size``), else timm's ``pretrained_cfg["input_size"]``."""
    config = getattr(net, "config", None)
    config = getattr(config, "vision_config", None) or config  # HF models with a vision tower (SigLIP, CLIP)
    size = None
    for owner in (net, getattr(net, "patch_embed", None), config):
        value = next((v for a in ("img_size", "image_size") if (v := getattr(owner, a, None)) is not None), None)
        if value is not None:
            size = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
            break
    cfg = next((c for a in ("pretrained_cfg", "default_cfg")
                if isinstance(c := getattr(net, a, None), dict) and c.get("input_size")), None)
    cfg_size = tuple(cfg["input_size"]) if cfg else None
    if size is None:  # the image size first: timm keeps pretrained_cfg's 224 x 224 for a model built with 64
        if cfg_size is None:
            return None
        size = cfg_size[1:]
    # The model's own word first (timm's in_chans, HF num_channels, pretrained_cfg): the first convolution in module
    # order need not be the first one called (timm CSATv2 registers a 64-channel convolution before its stem).
    return (_input_channels(net, getattr(config, "num_channels", None) or (cfg_size[0] if cfg_size else None)),
            *size)


def _input_channels(net: nn.Module, stated: int | None = None) -> int:
    """timm's ``in_chans``, else what the model ``stated`` elsewhere (HF ``num_channels``, ``pretrained_cfg``), else
    its first convolution's input channels, else 3."""
    first = _first_layer(net)
    return getattr(net, "in_chans", None) or stated or (
        first.in_channels if isinstance(first, nn.modules.conv._ConvNd) else 3)


def _guess_input_size(net: nn.Module) -> tuple[int, ...]:
    """(C, H, W) of a plausible input: the size the model declares, else (D,) for a model whose first layer is a
    Linear, else its first convolution's channels at 224 x 224."""
    declared = declared_input_size(net)
    if declared is not None:
        return declared
    first = _first_layer(net)
    if isinstance(first, nn.Linear):
        return (first.in_features,)  # an MLP: its first layer states the (flattened) input size
    return (_input_channels(net), 224, 224)
