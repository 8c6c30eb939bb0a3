"""ONE: On-the-fly Native Ensemble (Lan, Zhu, Gong, NeurIPS 2018), for any fx-traceable classifier.

The model is cut by :func:`kdwrap.graph.split_model` into a shared trunk and a tail; the tail is replicated into ``m``
branches (branch 0 *is* the original tail) and a gate weights the branch logits into the ensemble teacher. How the
branches run in training (sequential, fused, or timed by ``execution="auto"``) is :mod:`kdwrap.fused.planner`'s.
The maths is written out in docs/one.md; each default is a keyword argument.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..base import EVAL_CAPTURE, KDLoss, KDModel, KeepReachable, check_logits, count_parameters, route_options
from ..fused.planner import check_execution
from ..graph import describe_split, example_input, flop_input_size, forward_flops, not_measured_line
from .branched import BranchedModel
from .losses import RampedLoss, cross_entropy_rows, softened_kl
from .pooling import global_pool
from .registry import entry_point

__all__ = ["one", "ONEGate", "ONEModel", "ONELoss", "ONEEnsemble", "build_one"]


class ONEGate(nn.Module):
    """``g = softmax(ReLU(BN1d(Linear(GAP(f)))))``: one weight per branch and sample."""

    def __init__(self, channels: int, branches: int, channels_dim: int = 1) -> None:
        super().__init__()
        self.channels, self.channels_dim = channels, channels_dim
        self.fc = nn.Linear(channels, branches)
        self.bn = nn.BatchNorm1d(branches)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Softmax gate weights ``(B, m)`` from the globally pooled trunk output ``f``."""
        pooled = global_pool(f, self.channels_dim)
        if pooled.shape[-1] != self.channels:
            raise RuntimeError(
                f"ONE gate: the trunk output has shape {tuple(f.shape)}, expected {self.channels} channels on axis "
                f"{self.channels_dim}; pass gate_channels=... and gate_channels_dim=1 (channels first) or -1 "
                "(channels last / tokens) to kdwrap.one"
            )
        if self.training and pooled.shape[0] == 1:
            raise ValueError(
                "ONE's gate normalises over the batch (BatchNorm1d) and needs at least 2 samples per batch in "
                "training; use drop_last=True in your DataLoader or a batch size > 1"
            )
        return F.softmax(F.relu(self.bn(self.fc(pooled))), dim=1)


class ONEModel(BranchedModel):
    """Trunk, ``m`` branches and the gate. ``forward`` returns the logits of branch ``self.branch``.

    In training mode every branch runs and the branch logits and gate weights are captured for :class:`ONELoss`;
    in eval mode only the kept branch runs, so eval accuracy is the deployed model's accuracy.

    Args:
        branches: number of branches ``m`` (>= 2).
        split: dotted name of the first module of the tail (``"layer4"``, ``"stages.3"``, ``"blocks.9"``);
            default :func:`kdwrap.graph.auto_split` (start of the last stage; last quarter of ViT blocks).
        reinit_branches: branches 1..m-1 start from their own random initialisation, made the way the model
            initialises itself (:func:`kdwrap.methods.branch_init.reinitialise_like`), as in the reference code (default). ``False``: they
            start as copies of the tail's weights, the choice for fine-tuning a pretrained model.
        branch: the branch ``forward`` returns and :func:`kdwrap.export` keeps.
        input_size: (C, H, W) of an input, used when the gate's channel count or FLOPs need a trial forward.
        gate_channels, gate_channels_dim: override the inferred channels (and their axis, 1 or -1) of the trunk
            output that the gate pools.
        leaf_modules, autowrap_functions: passed to the fx tracer for code fx cannot trace into.
        output: index, key or field of the logits when ``net`` returns a tuple, dict or namedtuple (``model(x)``
            then returns the logits tensor; ``export`` returns the original model, outputs and all).
        execution: how the training forward runs the branches: ``"sequential"`` (one after the other),
            ``"fused"`` (one graph whose convolutions are ``m`` times wider and grouped; same values and
            gradients, fewer kernel launches; an error if the tail has an op that cannot be fused) or ``"auto"``
            (on CUDA, the faster of the two, timed at the first training step of each input shape, see
            :attr:`ONEModel.execution_timings`; a rule where it cannot time, see :meth:`ONEModel.execution_plan`;
            sequential where fusion is not possible, with the reason in ``summary()``). Eval-mode ``model(x)``
            runs one branch either way.
    """

    method = "one"

    def __init__(
        self,
        net: nn.Module,
        *,
        branches: int = 3,
        split: str | None = None,
        reinit_branches: bool = True,
        branch: int = 0,
        input_size: Sequence[int] | None = None,
        gate_channels: int | None = None,
        gate_channels_dim: int | None = None,
        leaf_modules: Sequence[type] = (),
        autowrap_functions: Sequence[Callable] = (),
        output: int | str | None = None,
        execution: str = "auto",
    ) -> None:
        check_execution(execution, "one")
        super().__init__(
            net, branches=branches, split=split, reinit_branches=reinit_branches, input_size=input_size,
            leaf_modules=leaf_modules, autowrap_functions=autowrap_functions, output=output,
            gate_channels=gate_channels, gate_channels_dim=gate_channels_dim,
        )
        if not 0 <= branch < branches:
            raise ValueError(f"branch must be in [0, {branches}), got {branch}")
        self.branch = branch
        self.gate = ONEGate(self.trunk_channels, branches, self.trunk_channels_dim)
        self._follow_mode(net)
        self.plan_execution(execution)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Training: run every branch, capture their logits and the gate for the loss, return branch
        ``branch``'s logits. Eval: run only that branch (the deployed model's computation)."""
        self._note_input(x)
        f = self.trunk(x, *args, **kwargs)
        extra = self._tail_kwargs(args, kwargs)
        if not self.training:
            self.put_capture(EVAL_CAPTURE)
            return self.branches[self.branch](*self._branch_inputs(f), **extra)
        logits = self._run_branches(f, extra)
        check_logits(logits[0], "one", dims=None)
        gate = self.gate(self._main(f))
        self.put_capture((logits, gate))
        others = [z for i, z in enumerate(logits) if i != self.branch]
        return KeepReachable.apply(logits[self.branch], gate, *others)

    def forward_all(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every branch's logits and the gate weights, captured for no loss (evaluation, analysis)."""
        f = self.trunk(x, *args, **kwargs)
        extra = self._tail_kwargs(args, kwargs)
        return self._run_branches(f, extra), self.gate(self._main(f))

    def forward_ensemble(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """ONE-E: the gated ensemble's logits ``sum_i g_i z_i``."""
        logits, gate = self.forward_all(x, *args, **kwargs)
        return ensemble_logits(logits, gate)

    def export(self, branch: int | None = None, ensemble: bool = False) -> nn.Module:
        """The deployable model: the original class holding the trunk and one branch, or ONE-E (``ensemble``)."""
        if ensemble:
            return ONEEnsemble(self).train(self.training)
        return self._export_branch(self.branch if branch is None else branch)

    def summary(self, input_size: Sequence[int] | None = None) -> str:
        """Split (the rule that chose it, and the nearest other cuts with their tails' FLOP shares), parameter
        counts of trunk / one branch / gate, and forward FLOPs (batch of 1). FLOPs are measured at ``input_size``,
        else the wrapper's ``input_size``, else the (C, H, W) of the first batch ``forward`` saw, else the model's
        declared size (timm's ``img_size`` or ``pretrained_cfg``); with none of them, the summary says so."""
        trunk_p = count_parameters([self.trunk])
        branch_p = count_parameters([self.branches[0]])
        gate_p = count_parameters([self.gate])
        lines = [
            f"kdwrap ONE: {type(self.user_network).__name__} split at '{self.split}', {self.num_branches} branches "
            f"(forward returns branch {self.branch})",
            f"  parameters: trunk {trunk_p:,} | one branch {branch_p:,} | gate {gate_p:,} | "
            f"wrapper {count_parameters([self]):,} | deployed {trunk_p + branch_p:,}",
        ]
        if self._describe_cut():
            lines.append(self._describe_cut())
        lines += describe_split(self.split_record, input_size, self.first_input_size)
        lines.append("  execution: " + self.branch_execution.describe())
        size = flop_input_size(self.split_record, input_size, self.first_input_size)
        if size is None:
            return "\n".join(lines + [not_measured_line("FLOPs")])
        try:
            flops = self._flops(size)
        except Exception as err:  # FLOPs are informative only; say why they are missing
            lines.append(f"  FLOPs: not measured ({type(err).__name__}: {err}); pass input_size=(C, H, W)")
        else:
            trunk_f, branch_f, gate_f, shape = flops
            plain = trunk_f + branch_f
            lines.append(
                f"  forward FLOPs at input {shape}: trunk {trunk_f / 1e6:,.1f}M | one branch {branch_f / 1e6:,.1f}M "
                f"| tail share {branch_f / max(plain, 1):.1%} | ONE / plain "
                f"{(trunk_f + self.num_branches * branch_f + gate_f) / max(plain, 1):.2f}x"
            )
        return "\n".join(lines)

    def _flops(self, input_size: Sequence[int]) -> tuple[int, int, int, tuple[int, ...]]:
        x = example_input(self.user_network, input_size)
        modes = [m.training for m in (self.trunk, self.branches[0], self.gate)]
        for m in (self.trunk, self.branches[0], self.gate):
            m.eval()
        try:
            trunk_f, f = forward_flops(self.trunk, x)
            branch_f, _ = forward_flops(self.branches[0], *self._branch_inputs(f))
            gate_f, _ = forward_flops(self.gate, self._main(f))
        finally:
            for m, mode in zip((self.trunk, self.branches[0], self.gate), modes):
                m.train(mode)
        return trunk_f, branch_f, gate_f, tuple(x.shape[1:])

    def extra_repr(self) -> str:
        return f"split={self.split!r}, branches={self.num_branches}, branch={self.branch}"


def ensemble_logits(logits: Sequence[torch.Tensor] | torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``z_e = sum_i g_i z_i`` for branch logits (``m`` tensors B x C, or one m x B x C tensor) and gate weights
    (B x m)."""
    stacked = logits if isinstance(logits, torch.Tensor) else torch.stack(list(logits))  # m x B x C
    return (gate.t().unsqueeze(-1).to(stacked.dtype) * stacked).sum(dim=0)


class ONEEnsemble(nn.Module):
    """ONE-E for deployment: trunk, every branch and the gate, returning the ensemble logits as a Tensor."""

    def __init__(self, model: ONEModel) -> None:
        super().__init__()
        self.trunk = copy.deepcopy(model.trunk)
        self.branches = copy.deepcopy(model.branches)
        self.gate = copy.deepcopy(model.gate)
        self.cut_values, self.main_value = model.cut_values, model.main_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The gate-weighted sum of every branch's logits (ONE-E), a plain tensor."""
        f = self.trunk(x)
        values = tuple(f) if self.cut_values > 1 else (f,)
        return ensemble_logits([b(*values) for b in self.branches], self.gate(values[self.main_value]))


class ONELoss(RampedLoss):
    """``sum_i CE(z_i, y) + CE(z_e, y) + w(t) T^2 sum_i KL(softmax_T(sg(z_e)) || softmax_T(z_i))``.

    Call it once per training forward with the forward's output and the labels. ``step`` counts training calls
    (the ramp-up clock). After an eval-mode forward it returns plain cross-entropy of the given logits, so
    validation loops that reuse the criterion keep working. ``parts`` holds the detached terms of the last call.

    Args:
        temperature: ``T`` of the KL term.
        rampup_steps: optimizer steps of the sigmoid ramp-up of the KL weight (0: full weight from the start).
        accumulation_steps: loss calls per optimizer step under gradient accumulation (the ramp clock counts
            optimizer steps).
        check_finite: stop with a ``FloatingPointError`` naming the step at the first NaN/Inf in the branch
            logits or gate (one host sync per step).
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The ONE loss of the preceding training forward (``logits`` is what it returned); cross-entropy after
        an eval forward."""
        target, capture = self._take_checked_capture(logits, target)
        if capture is None:
            return self._eval_cross_entropy(logits, target)
        branch_logits, gate = capture
        b = self.model.branch
        self._check_same_shape(logits, branch_logits[b])
        # The given tensor stands for the kept branch so that gradients flow through whatever the caller (DDP,
        # autocast) did to it (same values as the captured logits).
        zs = list(branch_logits)
        zs[b] = logits
        z = torch.stack(zs).float()  # m x B x C
        ensemble = ensemble_logits(z, gate.float())
        self._stop_if_not_finite(ensemble, "ensemble logits (branches and gate)")
        # All branches (and the ensemble) in one tensor per op: a small model's step is bound by kernel launches,
        # so the loss's op count must not grow with m.
        T = self.temperature
        ce_all = cross_entropy_rows(torch.cat([z, ensemble.unsqueeze(0)]).log_softmax(-1), target)  # m + 1
        # KL(teacher || branch_i) per branch, without T^2: it is logged so, and the loss applies T^2 with the ramp.
        kl = softened_kl(z, ensemble.detach(), T, scaled=False)  # m
        weight = self.ramp()
        loss = ce_all.sum() + (weight * T * T) * kl.sum()  # sum_i CE(z_i, y) + CE(z_e, y) + w T^2 sum_i KL_i
        self.step += 1
        ce = ce_all.detach()
        self.parts = {
            "loss": loss.detach(), "ce": ce[:-1], "ce_ensemble": ce[-1], "kl": kl.detach(),
            "ramp_weight": torch.tensor(weight),
        }
        return loss


def build_one(net: nn.Module, **options: Any) -> tuple[ONEModel, ONELoss]:
    """Wrap ``net`` for ONE. Returns ``(model, loss_fn)``.

    Each option goes, unchanged, to the class that owns it: the surgery and execution options (``branches``,
    ``split``, ``reinit_branches``, ``branch``, ``input_size``, ``gate_channels``, ``gate_channels_dim``,
    ``leaf_modules``, ``autowrap_functions``, ``output``, ``execution``) to :class:`ONEModel`, the loss options
    (``temperature``, ``rampup_steps``, ``accumulation_steps``, ``check_finite``) to :class:`ONELoss`; their
    docstrings document them. An unknown option raises :class:`kdwrap.OptionError` listing the valid ones.
    """
    model_options, loss_options = route_options("one", options, ONEModel, ONELoss)
    model = ONEModel(net, **model_options)
    return model, ONELoss(model, **loss_options)


@entry_point("one")
def one(net: nn.Module, branches: int = 3, **kwargs: Any) -> tuple[KDModel, KDLoss]:
    """Wrap ``net`` for ONE (On-the-fly Native Ensemble). Returns ``(model, loss_fn)``.

    Options (``split``, ``temperature``, ``rampup_steps``, ...): see :class:`kdwrap.methods.one.ONEModel` and
    :class:`kdwrap.methods.one.ONELoss`; an unknown one raises :class:`OptionError` listing the valid ones.
    """
    return build_one(net, branches=branches, **kwargs)
