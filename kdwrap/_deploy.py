"""Export: rebuild the user's own model class from the pieces of a wrapper, for deployment."""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

__all__ = ["rebuild_original", "deployable_copy"]


def rebuild_original(original: nn.Module, pieces: Sequence[nn.Module]) -> nn.Module:
    """A deep copy of ``original`` whose tensors are taken from ``pieces`` (modules keyed like ``original``).

    The pieces (fx graph modules cut from ``original``) use the original ``state_dict`` keys, so together they hold
    the original state. Keys a piece holds beyond the original's (non-persistent buffers that fx turned into
    attributes) are skipped; tensors of the original that no piece holds (modules unused in ``forward``) keep the
    original's values. The result is on the pieces' device.
    """
    net = copy.deepcopy(original)
    target = net.state_dict()
    state = OrderedDict((k, v) for piece in pieces for k, v in piece.state_dict().items() if k in target)
    # The original's per-module metadata (state-dict versions): modules that migrate old checkpoints in
    # _load_from_state_dict (torchvision's MNASNet) read it and refuse a state dict without it.
    state._metadata = getattr(target, "_metadata", None)  # type: ignore[attr-defined]
    with torch.no_grad():
        net.load_state_dict(state, strict=False)
    device = next((p.device for piece in pieces for p in piece.parameters()), None)
    return net.to(device) if device is not None else net


def deployable_copy(net: nn.Module) -> nn.Module:
    """A deep copy of ``net`` without its gradients: what export returns of a network a wrapper holds whole (KD's
    student, OSAKD's model, DML's peer), in the wrapper's train/eval mode, sharing nothing with it."""
    net = copy.deepcopy(net)
    for p in net.parameters():
        p.grad = None
    return net
