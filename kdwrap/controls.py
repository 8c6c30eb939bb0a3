"""The free controls every kdwrap gain is compared with: what a user already has without distillation.

- **Label smoothing**: ``nn.CrossEntropyLoss(label_smoothing=0.1)``, one argument (:func:`label_smoothing_loss`).
- **Weight averaging**: :class:`WeightAverage`, an exponential moving average of the weights with PCL's temporal-mean
  decay and warm-up (the mean-teacher rule of :mod:`kdwrap.methods.temporal_mean`), deployed in place of the live
  weights. PCL deploys such an average of its peer, so this control separates what averaging alone gives from what
  PCL's distillation adds. timm's ``ModelEmaV3`` and torch's ``AveragedModel`` do the same job in a user's loop.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .methods.temporal_mean import mean_copy, parameter_names, update_means

__all__ = ["DEFAULT_LABEL_SMOOTHING", "DEFAULT_MEAN_DECAY", "WeightAverage", "label_smoothing_loss"]

DEFAULT_LABEL_SMOOTHING = 0.1
# PCL's default mean_decay (the paper's 0.999): the control averages as PCL's deployed temporal mean does.
DEFAULT_MEAN_DECAY = 0.999


def label_smoothing_loss(smoothing: float = DEFAULT_LABEL_SMOOTHING) -> nn.CrossEntropyLoss:
    """Cross-entropy against labels smoothed by ``smoothing`` (uniform over the classes)."""
    if not 0.0 <= float(smoothing) < 1.0:
        raise ValueError(f"kdwrap: label smoothing must be in [0, 1), got {smoothing!r} (0.1 is the usual choice)")
    return nn.CrossEntropyLoss(label_smoothing=float(smoothing))


class WeightAverage(nn.Module):
    """An exponential moving average of ``net``'s parameters, held as buffers (no optimizer or autograd touches it).

    Call :meth:`update` after each ``optimizer.step()``. The first update copies the weights, and the n-th takes the
    true mean of those seen so far until that weight reaches ``decay`` (the mean-teacher warm-up,
    :func:`kdwrap.methods.temporal_mean.mean_decay`). Buffers that are not parameters (BatchNorm statistics) are
    copied from ``net`` at each update: the average is evaluated with the live network's statistics. ``forward`` runs the averaged network;
    :meth:`export` returns a plain copy of ``net`` holding the averaged weights (its own class and keys).
    """

    def __init__(self, net: nn.Module, decay: float = DEFAULT_MEAN_DECAY) -> None:
        super().__init__()
        if isinstance(decay, bool) or not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"kdwrap: the average's decay must be a float in [0, 1), got {decay!r} "
                             f"(PCL's is {DEFAULT_MEAN_DECAY})")
        self.decay = float(decay)
        self.average = mean_copy(net)
        self._names = parameter_names(net)
        # the buffers that are not parameters (BatchNorm statistics), by name: named once, resolved at each update
        # (``.to()`` replaces buffer objects)
        params = set(self._names)
        self._buffer_names = [name for name, _ in net.named_buffers() if name not in params]
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        # the live net is not a submodule: the average's state_dict holds the average alone
        self.__dict__["_live"] = net

    @torch.no_grad()
    def update(self) -> None:
        """Fold the live weights into the average (after ``optimizer.step()``)."""
        net = self.__dict__["_live"]
        update_means([(net, self.average, self._names)], self.updates, self.decay)
        for name in self._buffer_names:
            self.average.get_buffer(name).copy_(net.get_buffer(name))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.average(*args, **kwargs)

    def export(self) -> nn.Module:
        """A deep copy of the live network with the averaged weights: the model to deploy."""
        net = copy.deepcopy(self.__dict__["_live"])
        net.load_state_dict(self.average.state_dict())
        for p in net.parameters():
            p.grad = None
        return net

    def extra_repr(self) -> str:
        return f"decay={self.decay}"
