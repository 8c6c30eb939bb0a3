"""The channels of the values crossing a cut, which ONE's gate pools: their count and axis, read off the module that
makes them or from a trial forward of the trunk, and which of several crossing values the gate pools."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from ..errors import SplitError
from .inputs import example_input

__all__ = ["producer_channels", "run_trunk", "main_value", "trunk_channels"]

# Ops through which a channel count read off a module upstream may no longer hold.
_SHAPE_CHANGING = {
    "cat", "concat", "stack", "reshape", "view", "flatten", "unflatten", "split", "chunk", "getitem",
    "matmul", "bmm", "einsum", "pixel_shuffle", "pixel_unshuffle", "unfold", "fold", "transpose", "permute",
    "mean", "sum", "amax", "max", "squeeze", "unsqueeze", "expand", "repeat", "tensor_split", "unbind",
}



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


def producer_channels(net: nn.Module, cut: fx.Node) -> tuple[int, int, bool] | None:
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


# Two samples, so that the batch axis is told apart from axes that fold samples with patches (MobileViT).
_TRIAL_BATCH = 2


def run_trunk(net: nn.Module, trunk: nn.Module, input_size: Sequence[int] | None, why: str) -> Any:
    """The trunk's eval-mode output on an example input; a SplitError asking for ``input_size`` if it fails."""
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



def main_value(values: Sequence[Any], batch: int | None = _TRIAL_BATCH) -> int:
    """Which of the values crossing a cut the gate pools: the largest tensor whose first axis is the batch (one
    value per sample, not samples folded with patches), else the largest tensor."""
    tensors = [(v.numel(), -i) for i, v in enumerate(values) if isinstance(v, torch.Tensor) and v.ndim >= 2]
    per_sample = [t for t in tensors if values[-t[1]].shape[0] == batch]
    tensors = per_sample or tensors
    if not tensors:
        raise SplitError("no tensor with a batch axis crosses this cut; choose another split")
    return -max(tensors)[1]


def trunk_channels(
    net: nn.Module, trunk: nn.Module, crossing: Sequence[fx.Node], input_size: Sequence[int] | None
) -> tuple[int, int, int]:
    """``(channels, axis, main)``: the gate's input channels, their axis (1 or -1) and which crossing value holds
    them. Read off the module that makes a single crossing value where it says; else from a trial forward."""
    if len(crossing) == 1:
        found = producer_channels(net, crossing[0])
        if found and found[2]:
            return found[0], found[1], 0
    out = run_trunk(net, trunk, input_size, "the channel count of the trunk output to build the gate")
    values = tuple(out) if len(crossing) > 1 else (out,)
    main = main_value(values)
    f, found = values[main], producer_channels(net, crossing[main])
    if f.ndim <= 3:
        return f.shape[-1], -1, main  # B x D features, B x N x D tokens
    if found and found[0] in (f.shape[1], f.shape[-1]):
        return found[0], (1 if f.shape[1] == found[0] else -1), main
    return f.shape[1], 1, main
