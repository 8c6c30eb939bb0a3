"""BYOT: Be Your Own Teacher (Zhang, Song, Gao, Chen, Bao, Ma, ICCV 2019), self-distillation through exits.

Auxiliary classifiers (exits) read the ends of the network's stages (:func:`kdwrap.graph.stage_starts`: ResNet's
layer1..layer3, ViT's block quarters); the deepest classifier is the network's own head. Each exit gives logits
``z_i`` and a feature vector ``F_i`` of the width ``d`` of the network's classifier input ``F_n``:

    L = (1 - alpha) sum_{i=1..n} CE(z_i, y) + alpha sum_{i<n} T^2 mean_b sum_c -sg(p_T(z_n))_c log p_T(z_i)_c
        + lambda sum_{i<n} sum_{b,c} mask (F_i - sg(F_n))^2,      mask = (F_i > 0) | (F_n > 0)

defaults alpha = 0.1, T = 3, lambda = 1e-6 (luanyunteng/pytorch-be-your-own-teacher; no official code exists, and
the paper gives no head architecture). The exits' heads follow the layout they read (:data:`EXIT_HEADS`).
``model(x)`` returns the network's own logits; :func:`kdwrap.export` returns the network without the exits, or,
with ``exits=True``, a multi-exit model returning every exit's logits (shallowest first).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from .._deploy import rebuild_original
from ..base import EVAL_CAPTURE, KDLoss, KDModel, KeepReachable, count_parameters, route_options
from ..errors import SplitError
from ..graph import (
    Piece, check_split_name, classifier_input, classifier_name, example_input, graph_with_outputs,
    producer_channels, select_output, stage_end, stage_input, stage_starts, trace, trial_mode,
)
from .losses import check_fraction, check_temperature, cross_entropy_rows, softened_kl
from .pooling import global_pool
from .registry import entry_point

__all__ = ["byot", "EXIT_HEADS", "ConvExitHead", "TokenExitHead", "BYOTModel", "BYOTLoss", "MultiExit", "build_byot"]


class ConvExitHead(nn.Module):
    """BYOT's head for a conv map ``B x C x H x W``: 1x1 conv to ``d/4``, BN, ReLU; ``k x k`` conv with stride
    ``k`` bringing the map to the deepest stage's size, BN, ReLU; 1x1 conv to ``d``, BN, ReLU; global average
    pool (``F``); Linear (``z``)."""

    def __init__(self, channels: int, features: int, num_classes: int, stride: tuple[int, int]) -> None:
        super().__init__()
        mid = max(1, features // 4)
        self.features = nn.Sequential(
            nn.Conv2d(channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, stride, stride=stride, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, features, 1, bias=False), nn.BatchNorm2d(features), nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, F)``: the exit's logits and its pooled feature."""
        f = self.features(x).mean((2, 3))
        return self.fc(f), f


class TokenExitHead(nn.Module):
    """The head for tokens ``B x N x D`` or channels-last maps ``B x H x W x D``: LayerNorm, mean over tokens,
    a Linear to ``d`` where ``D`` differs (``F``), Linear (``z``)."""

    def __init__(self, channels: int, features: int, num_classes: int, stride: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.project = nn.Linear(channels, features) if channels != features else nn.Identity()
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, F)``: the exit's logits and its pooled feature."""
        f = self.project(global_pool(self.norm(x), -1))
        return self.fc(f), f


# The exit head per layout of the value read: where the channels are (axis 1 of a 4-D map, or the last axis).
EXIT_HEADS: dict[str, type[nn.Module]] = {"channels_first": ConvExitHead, "channels_last": TokenExitHead}


def _layout(net: nn.Module, node: fx.Node, value: torch.Tensor) -> tuple[str, int]:
    """(layout, channels) of a stage's output: 4-D maps are channels-first unless the module that makes them says
    the channels are last (Swin's NHWC); everything else (tokens, vectors) is channels-last."""
    if value.dim() == 4:
        found = producer_channels(net, node)
        if found is not None and found[1] == -1 and found[0] == value.shape[-1]:
            return "channels_last", value.shape[-1]
        return "channels_first", value.shape[1]
    return "channels_last", value.shape[-1]


class BYOTModel(KDModel):
    """The network (``self.body``, the user's model traced to also return its classifier input and its stage ends)
    and one exit head per stage end (``self.heads``). ``forward`` returns the network's own logits.

    In training mode the exits run and their logits and features are captured for :class:`BYOTLoss`; in eval mode
    they do not run, so eval accuracy is the deployed network's.

    Args:
        stages: the modules at whose input an exit reads (the end of the stage before each); default
            :func:`kdwrap.graph.stage_starts` (ResNet ``layer2``..``layer4``: exits after ``layer1``..``layer3``).
        classifier: the network's classifier, whose input is ``F_n`` (default: the last ``nn.Linear`` it calls).
        input_size: (C, H, W) of an input, for the trial forward that sizes the heads (default: the model's own
            image size, e.g. timm's ``pretrained_cfg``, else 224 x 224).
        leaf_modules, autowrap_functions, output: as for ONE (:func:`kdwrap.graph.split_model`).
    """

    method = "byot"

    def __init__(
        self,
        net: nn.Module,
        *,
        stages: Sequence[str] | None = None,
        classifier: str | None = None,
        input_size: Sequence[int] | None = None,
        leaf_modules: Sequence[type] = (),
        autowrap_functions: Sequence[Callable] = (),
        output: int | str | None = None,
    ) -> None:
        super().__init__()
        traced = {mode: trace(net, mode, leaf_modules, autowrap_functions) for mode in (True, False)}
        for mode, t in traced.items():
            select_output(t, net, output, training=mode)
        if stages is None:
            starts = stage_starts(net, traced[False], input_size=input_size)
        elif isinstance(stages, str) or not all(isinstance(s, str) for s in stages) or not stages:
            raise TypeError(f"kdwrap byot: stages must be a non-empty list of module names, got {stages!r}")
        else:
            starts = list(stages)
            for s in starts:
                check_split_name(net, s, traced[False])
        self.stages, self.input_size, self.output = starts, input_size, output
        self.classifier = classifier_name(net, [t.graph for t in traced.values()], classifier, "byot")
        taps = {mode: [classifier_input(t.graph, self.classifier)] + [stage_input(t, s) for s in starts]
                for mode, t in traced.items()}
        self.body = Piece(net, *(graph_with_outputs(traced[m].graph, taps[m]) for m in (True, False)),
                          class_name="Body")
        self.heads = nn.ModuleList(self._make_heads(net, traced[False], taps[False][1:]))
        self.__dict__["_original"] = net
        self._follow_mode(net)

    def _make_heads(self, net: nn.Module, traced: Any, nodes: list[fx.Node]) -> list[nn.Module]:
        """One head per stage end, sized by a trial forward: the values' shapes, the deepest stage's map size, the
        classifier's input width and the number of classes."""
        last = stage_end(traced, self.stages[-1])
        probe = fx.GraphModule(net, graph_with_outputs(traced.graph, [classifier_input(traced.graph, self.classifier),
                                                                       last, *nodes]))
        x = example_input(net, self.input_size, batch=2)
        try:
            with trial_mode(net):
                logits, h, deepest, *values = probe(x)
        except Exception as err:
            raise SplitError(
                f"kdwrap byot sizes its exit heads with a trial forward on a {tuple(x.shape)} input, which failed "
                f"({type(err).__name__}: {err}); pass input_size=(C, H, W) of your inputs"
            ) from err
        features, classes = global_pool(h, -1).shape[-1], logits.shape[-1]
        heads = []
        for node, value in zip(nodes, values):
            layout, channels = _layout(net, node, value)
            stride = (1, 1)
            if layout == "channels_first" and deepest.dim() == 4:
                stride = (max(1, value.shape[2] // deepest.shape[2]), max(1, value.shape[3] // deepest.shape[3]))
            heads.append(EXIT_HEADS[layout](channels, features, classes, stride))
        param = next(iter(net.parameters()), None)
        return [h.to(param.device) if param is not None else h for h in heads]

    @property
    def num_exits(self) -> int:
        """Exits, the network's own classifier included."""
        return len(self.heads) + 1

    @property
    def user_network(self) -> nn.Module:
        """The network the user wrapped (outside the module tree; its tensors are the body's)."""
        return self.__dict__["_original"]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Training: run the network and its exits, capture their logits and features, return the network's
        logits. Eval: the network only (the deployed model's computation)."""
        logits, h, *ends = self.body(x, *args, **kwargs)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise TypeError("kdwrap byot: the network returned no (B, C) logits tensor; name them with output=...")
        if not self.training:
            self.put_capture(EVAL_CAPTURE)
            return logits
        exits = [head(v) for head, v in zip(self.heads, ends)]
        z_aux, f_aux = [z for z, _ in exits], [f for _, f in exits]
        self.put_capture((z_aux, f_aux, global_pool(h, -1), logits))
        return KeepReachable.apply(logits, *z_aux, *f_aux)

    def export(self, exits: bool = False) -> nn.Module:
        """The user's class without the exits (default), or a :class:`MultiExit` model returning every exit's
        logits, shallowest first and the network's own last (anytime inference)."""
        if exits:
            return MultiExit(self).train(self.training)
        return rebuild_original(self.user_network, [self.body]).train(self.training)

    def summary(self, **kwargs: Any) -> str:
        """Stages read, heads, parameter counts (options such as ``input_size`` are accepted and ignored)."""
        body = count_parameters([self.body])
        lines = [f"kdwrap BYOT: {type(self.user_network).__name__}, {self.num_exits} exits: at the input of "
                 f"{', '.join(repr(s) for s in self.stages)}, and the network's own '{self.classifier}'"]
        for s, head in zip(self.stages, self.heads):
            lines.append(f"  exit at the input of '{s}': {type(head).__name__}, {count_parameters([head]):,} parameters")
        lines.append(f"  parameters: network {body:,} (deployed) | exits {count_parameters([self.heads]):,} | "
                     f"wrapper {count_parameters([self]):,}")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return f"stages={self.stages!r}, classifier={self.classifier!r}"


class MultiExit(nn.Module):
    """BYOT's network with its exits, for anytime inference: ``forward`` returns every exit's logits as a list,
    shallowest first, the network's own last."""

    def __init__(self, model: BYOTModel) -> None:
        super().__init__()
        self.body = copy.deepcopy(model.body)
        self.heads = copy.deepcopy(model.heads)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits, shallowest first."""
        logits, _, *ends = self.body(x)
        return [head(v)[0] for head, v in zip(self.heads, ends)] + [logits]


class BYOTLoss(KDLoss):
    """``(1 - alpha) sum_i CE(z_i, y) + alpha sum_{i<n} T^2 CE(p_T(sg(z_n)), p_T(z_i)) + lambda sum_{i<n}
    ||mask (F_i - sg(F_n))||^2`` (see :mod:`kdwrap.methods.byot`). Only the exits learn from the deepest
    classifier; the network's own head learns from the labels. After an eval-mode forward it returns plain
    cross-entropy. ``parts``: ``"loss"``, ``"ce"`` (per exit, the network's last), ``"kd"`` and ``"feature"`` (per
    auxiliary exit).

    Args:
        alpha: weight of the distillation term, ``1 - alpha`` that of the labels (the reference's 0.1).
        temperature: ``T`` (the reference's 3).
        feature_weight: ``lambda`` of the feature term (the reference's 1e-6; the term is summed over the batch).
        check_finite: stop with a ``FloatingPointError`` at the first NaN/Inf in the logits (one host sync).
    """

    def __init__(
        self,
        model: BYOTModel,
        *,
        alpha: float = 0.1,
        temperature: float = 3.0,
        feature_weight: float = 1e-6,
        check_finite: bool = False,
    ) -> None:
        super().__init__(model, check_finite)
        self.alpha = check_fraction("byot", "alpha", alpha, "it weighs distillation, 1 - alpha the labels")
        self.temperature = check_temperature("byot", temperature)
        if isinstance(feature_weight, bool) or not isinstance(feature_weight, (int, float)) or feature_weight < 0:
            raise ValueError(f"kdwrap byot: feature_weight must be a float >= 0, got {feature_weight!r}")
        self.feature_weight = float(feature_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The BYOT loss of the preceding training forward (``logits`` is what it returned); cross-entropy after an
        eval forward."""
        target, capture = self._take_checked_capture(logits, target)
        if capture is None:
            return self._eval_cross_entropy(logits, target)
        z_aux, f_aux, f_deep, returned = capture
        self._check_same_shape(logits, returned)
        T = self.temperature
        with torch.autocast(device_type=logits.device.type, enabled=False):
            z = torch.stack([*z_aux, logits]).float()  # n x B x C, the network's own logits last
            self._stop_if_not_finite(z, "exit logits")
            ce = cross_entropy_rows(z.log_softmax(-1), target)
            kd = softened_kl(z[:-1], z[-1].detach(), T, cross_entropy=True)
            f = torch.stack(f_aux).float()  # (n-1) x B x d
            deep = f_deep.detach().float()
            mask = ((f > 0) | (deep > 0)).to(f.dtype)
            feature = (mask * (f - deep) ** 2).sum((1, 2))
            loss = (1 - self.alpha) * ce.sum() + self.alpha * kd.sum() + self.feature_weight * feature.sum()
        self.step += 1
        self.parts = {"loss": loss.detach(), "ce": ce.detach(), "kd": kd.detach(), "feature": feature.detach()}
        return loss

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, temperature={self.temperature}, feature_weight={self.feature_weight}, "
                f"step={self.step}")


def build_byot(net: nn.Module, **options: Any) -> tuple[BYOTModel, BYOTLoss]:
    """Wrap ``net`` for BYOT. Returns ``(model, loss_fn)``.

    Each option goes, unchanged, to the class that owns it: ``stages``, ``classifier``, ``input_size``,
    ``leaf_modules``, ``autowrap_functions`` and ``output`` to :class:`BYOTModel`; ``alpha``, ``temperature``,
    ``feature_weight`` and ``check_finite`` to :class:`BYOTLoss`. An unknown option raises
    :class:`kdwrap.OptionError` listing the valid ones.
    """
    model_options, loss_options = route_options("byot", options, BYOTModel, BYOTLoss)
    model = BYOTModel(net, **model_options)
    return model, BYOTLoss(model, **loss_options)


@entry_point("byot")
def byot(net: nn.Module, **kwargs: Any) -> tuple[KDModel, KDLoss]:
    """Wrap ``net`` for BYOT (Be Your Own Teacher): exits at the ends of its stages learn from its own classifier.
    Returns ``(model, loss_fn)``; ``model(x)`` returns the network's own logits.

    Options (``stages``, ``classifier``, ``alpha``, ``temperature``, ``feature_weight``, ...): see
    :class:`kdwrap.methods.byot.BYOTModel` and :class:`kdwrap.methods.byot.BYOTLoss`; an unknown one raises
    :class:`OptionError` listing the valid ones.
    """
    return build_byot(net, **kwargs)
