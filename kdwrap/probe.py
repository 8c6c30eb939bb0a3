"""What kdwrap reads off a model it was not told about: a plausible input, the channel count and axis of a value
at a cut (read off the module that makes it, or from a trial forward), and which of several values crossing a cut the
gate pools."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import fx, nn

from .errors import SplitError

__all__ = ["example_input", "declared_input_size", "trial_mode"]


# Ops through which a channel count read off a module upstream may no longer hold.
_SHAPE_CHANGING = {
    "cat", "concat", "stack", "reshape", "view", "flatten", "unflatten", "split", "chunk", "getitem",
    "matmul", "bmm", "einsum", "pixel_shuffle", "pixel_unshuffle", "unfold", "fold", "transpose", "permute",
    "mean", "sum", "amax", "max", "squeeze", "unsqueeze", "expand", "repeat", "tensor_split", "unbind",
}


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


_CHANNEL_ATTRS: tuple[tuple[type, Callable[[nn.Module], int], int], ...] = (
    (nn.modules.conv._ConvNd, lambda m: m.out_channels, 1),
    (nn.modules.batchnorm._NormBase, lambda m: m.num_features, 1),
    (nn.GroupNorm, lambda m: m.num_channels, 1),
    (nn.Linear, lambda m: m.out_features, -1),
    (nn.LayerNorm, lambda m: m.normalized_shape[-1], -1),
)


def _module_channels(module: nn.Module) -> tuple[int, int] | None:
    for cls, get, dim in _CHANNEL_ATTRS:
        if isinstance(module, cls):
            if isinstance(module, nn.LayerNorm) and type(module).__name__.endswith("2d"):
                dim = 1  # timm/torchvision LayerNorm2d normalises the channel axis of NCHW maps
            return get(module), dim
    return None


def _passes_channels(module: nn.Module) -> bool:
    """Parameter-free modules that keep the shape of their input (activations, dropout, identity, drop-path)."""
    if any(True for _ in module.parameters()):
        return False
    name = type(module).__name__
    return module.__class__.__module__ == nn.modules.activation.__name__ or any(
        k in name for k in ("Identity", "Dropout", "DropPath", "StochasticDepth", "Drop")
    )


def _producer_channels(net: nn.Module, cut: fx.Node) -> tuple[int, int, bool] | None:
    """Search upstream from the cut for a module that states the channel count: (channels, dim, reliable).

    Breadth-first over node inputs (so residual adds reach their branch's last conv/linear); a path through a
    reshaping op or an unknown module is unreliable, since the count read beyond it may not hold at the cut.
    """
    frontier: list[tuple[fx.Node, bool]] = [(cut, True)]
    seen: set[fx.Node] = set()
    fallback = None
    while frontier and len(seen) < 400:
        node, reliable = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            module = net.get_submodule(node.target)
            found = _module_channels(module)
            if found:
                # BatchNorm1d normalises axis 1 of B x C and of (B*N) x C alike: on tokens flattened for it (timm
                # LeViT) the count holds but its axis at the cut is unknown, so it is confirmed by a trial forward.
                if reliable and not isinstance(module, nn.BatchNorm1d):
                    return found[0], found[1], True
                fallback = fallback or (found[0], found[1], False)
                continue
            reliable = reliable and _passes_channels(module)
        else:
            target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            reliable = reliable and target.strip("_") not in _SHAPE_CHANGING
        frontier.extend((a, reliable) for a in node.args if isinstance(a, fx.Node))
    return fallback


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


def _run_trunk(net: nn.Module, trunk: nn.Module, input_size: Sequence[int] | None, why: str) -> Any:
    """The trunk's eval-mode output on an example input; a SplitError asking for ``input_size`` if it fails."""
    # Two samples, so that the batch axis is told apart from axes that fold samples with patches (MobileViT).
    x = example_input(net, input_size, batch=_TRIAL_BATCH)
    was_training = trunk.training
    trunk.eval()
    try:
        with torch.no_grad():
            return trunk(x)
    except Exception as err:
        raise SplitError(
            f"kdwrap needs {why} and ran the trunk on a {tuple(x.shape)} input to find it, which failed "
            f"({type(err).__name__}: {err}); pass input_size=(C, H, W) of your inputs, or gate_channels=<int>"
        ) from err
    finally:
        trunk.train(was_training)


_TRIAL_BATCH = 2


def _main_value(values: Sequence[Any], batch: int | None = _TRIAL_BATCH) -> int:
    """Which of the values crossing a cut the gate pools: the largest tensor whose first axis is the batch (one
    value per sample, not samples folded with patches), else the largest tensor."""
    tensors = [(v.numel(), -i) for i, v in enumerate(values) if isinstance(v, torch.Tensor) and v.ndim >= 2]
    per_sample = [t for t in tensors if values[-t[1]].shape[0] == batch]
    tensors = per_sample or tensors
    if not tensors:
        raise SplitError("no tensor with a batch axis crosses this cut; choose another split")
    return -max(tensors)[1]


def _trunk_channels(
    net: nn.Module, trunk: nn.Module, crossing: Sequence[fx.Node], input_size: Sequence[int] | None
) -> tuple[int, int, int]:
    """``(channels, axis, main)``: the gate's input channels, their axis (1 or -1) and which crossing value holds
    them. Read off the module that makes a single crossing value where it says; else from a trial forward."""
    if len(crossing) == 1:
        found = _producer_channels(net, crossing[0])
        if found and found[2]:
            return found[0], found[1], 0
    out = _run_trunk(net, trunk, input_size, "the channel count of the trunk output to build the gate")
    values = tuple(out) if len(crossing) > 1 else (out,)
    main = _main_value(values)
    f, found = values[main], _producer_channels(net, crossing[main])
    if f.ndim <= 3:
        return f.shape[-1], -1, main  # B x D features, B x N x D tokens
    if found and found[0] in (f.shape[1], f.shape[-1]):
        return found[0], (1 if f.shape[1] == found[0] else -1), main
    return f.shape[1], 1, main
