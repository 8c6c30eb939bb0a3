"""ONE: On-the-fly Native Ensemble (Lan, Zhu, Gong, NeurIPS 2018), for any fx-traceable classifier.

The model is cut by :mod:`kdwrap.surgery` into a shared trunk and a tail; the tail is replicated into ``m``
branches (branch 0 *is* the original tail) and a gate weights the branch logits into the ensemble teacher.
The maths is written out in docs/one.md; each default is a keyword argument.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._timing import median_ms, timing_may_decide
from ..base import EVAL_CAPTURE, KDLoss, KDModel, KeepReachable, route_options
from ..fused import FusedBranches, FusionError, fuse_branches
from ..split_candidates import describe_split, flop_input_size, not_measured_line
from ..surgery import count_parameters, example_input, forward_flops
from .branched import BranchedModel
from .soft_targets import check_ramp_options, check_temperature

__all__ = [
    "EXECUTIONS", "FUSE_MAX_GFLOP", "MEASURE_DEVICES", "ONEGate", "ONEModel", "ONELoss", "ONEEnsemble", "build_one",
    "ramp_weight", "RampedLoss",
]

EXECUTIONS = ("auto", "sequential", "fused")
# execution="auto" times both executions instead of guessing, as cudnn.benchmark does for convolution algorithms:
# at the first training forward of each input signature (device, shape, dtype, autocast, memory format) it runs the
# tail forward + backward both ways on that very input and keeps the faster. Which one wins depends on the GPU, the
# model, the batch and the precision: fusing saves kernel launches (what bounds a small model's step) but runs
# grouped convolutions, slower per FLOP than dense ones (what matters for a large one).
MEASURE_DEVICES = ("cuda",)
# Where auto cannot time (the CPU, inside torch.compile, under deterministic algorithms, without autograd) it
# follows a rule: fused on CUDA while one branch's forward work per step (batch x FLOPs per sample) is at most this
# many GFLOP, between those two models' per-step work on a log scale. On the CPU
# fusion saves no measurable time (docs/results.md), so auto stays sequential there: no timing noise in the choice.
FUSE_MAX_GFLOP = 32.0
_MEASURE_REPEATS = 3  # timed runs per execution, after one untimed run (cudnn autotuning, allocation)



def global_pool(f: torch.Tensor, channels_dim: int) -> torch.Tensor:
    """Average over every axis but batch and channels: NCHW (``channels_dim=1``), NHWC or B x N x D (``-1``)."""
    if f.ndim <= 2:
        return f
    if channels_dim == 1:
        return f.flatten(2).mean(-1)
    return f.flatten(1, -2).mean(1)


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
            default :func:`kdwrap.surgery.auto_split` (start of the last stage; last quarter of ViT blocks).
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
        if execution not in EXECUTIONS:
            raise ValueError(f"unknown execution {execution!r}; valid: {', '.join(map(repr, EXECUTIONS))}")
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
        self.execution = execution
        self._plan_execution()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Training: run every branch, capture their logits and the gate for the loss, return branch
        ``branch``'s logits. Eval: run only that branch (the deployed model's computation)."""
        self._note_input(x)
        f = self.trunk(x, *args, **kwargs)
        extra = self._tail_kwargs(args, kwargs)
        if not self.training:
            self._put_capture(EVAL_CAPTURE)
            return self.branches[self.branch](*self._branch_inputs(f), **extra)
        logits = self._run_branches(f, extra)
        _check_logits(logits[0])
        gate = self.gate(self._main(f))
        self._put_capture((logits, gate))
        others = [z for i, z in enumerate(logits) if i != self.branch]
        return KeepReachable.apply(logits[self.branch], gate, *others)

    def forward_all(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every branch's logits and the gate weights, captured for no loss (evaluation, analysis)."""
        f = self.trunk(x, *args, **kwargs)
        extra = self._tail_kwargs(args, kwargs)
        return self._run_branches(f, extra), self.gate(self._main(f))

    # ------------------------------------------------------------------------------------------ branch execution
    def _plan_execution(self) -> None:
        """Build the fused graphs (train and eval) unless ``execution="sequential"``; on a model whose tail cannot
        be fused, ``"auto"`` keeps sequential execution and records why, ``"fused"`` fails."""
        self._fused: dict[bool, FusedBranches] = {}
        self.fusion_error: str | None = None
        self._tail_gflop_per_sample: float | None = None
        self._timings: dict[tuple, dict[str, float]] = {}  # input signature -> ms per execution (auto)
        if self.execution == "sequential":
            return
        if self.cut_values > 1:
            reason = f"the cut is crossed by {self.cut_values} values; fused execution takes one"
            if self.execution == "fused":
                raise FusionError(f"execution='fused' is not possible for this tail: {reason}. Use 'sequential'")
            self.fusion_error = reason
            return
        try:
            self._fused = {mode: fuse_branches(self.branches, mode) for mode in (True, False)}
            self._check_fusion()
        except Exception as err:  # a FusionError names the op; anything else is a gap in the rules: same fallback
            if self.execution == "fused":
                raise FusionError(
                    f"execution='fused' is not possible for this tail: {err}. Use execution='sequential' (or "
                    "'auto', which falls back to it)"
                ) from err
            reason = str(err) if isinstance(err, FusionError) else f"{type(err).__name__}: {err}"
            self._fused, self.fusion_error = {}, reason

    def _check_fusion(self) -> None:
        """Run the shape-dependent fusion checks on a 2-sample example input, and measure one branch's FLOPs per
        sample for the ``auto`` rule. Skipped when no example input fits the model: the first call checks."""
        try:
            x = example_input(self._original, self.input_size, batch=2)
            modes = [m.training for m in self.modules()]
            self.eval()
            try:
                with torch.no_grad():
                    f = self.trunk(x)
                    flops, _ = forward_flops(self.branches[0], f)
            finally:
                for m, mode in zip(self.modules(), modes):
                    m.training = mode
        except Exception:  # the input size is unknown here; an unfusable op still fails at the first call
            return
        self._tail_gflop_per_sample = flops / 2 / 1e9
        for fused in self._fused.values():
            fused.check(f)

    def execution_plan(self, batch: int | None = None, device: str | torch.device = "cuda") -> str:
        """The rule's plan for a training batch of ``batch`` samples on ``device``: ``"fused"`` (one graph for all
        branches) or ``"sequential"``. ``execution="auto"`` follows it where it cannot time the executions
        (see :attr:`execution_timings`): fused on CUDA while ``batch`` x one branch's forward GFLOP per sample is
        at most :data:`FUSE_MAX_GFLOP`."""
        if not self._fused:
            return "sequential"
        if self.execution == "fused":
            return "fused"
        per_sample = self._tail_gflop_per_sample
        small = batch is None or per_sample is None or batch * per_sample <= FUSE_MAX_GFLOP
        return "fused" if torch.device(device).type == "cuda" and small else "sequential"

    @property
    def execution_timings(self) -> dict[str, dict[str, float]]:
        """What ``execution="auto"`` measured: per input signature (device, shape, dtype, autocast, memory
        format), the median milliseconds of the tail's forward + backward in each execution. The faster is used
        for every training batch of that signature."""
        return {_describe_signature(k): dict(v) for k, v in self._timings.items()}

    def _run_branches(self, f: torch.Tensor, extra: dict[str, Any]) -> list[torch.Tensor]:
        if self._fused and self._plan_for(f, extra) == "fused":
            return self._fused[self.training](f, **extra)
        return [b(*self._branch_inputs(f), **extra) for b in self.branches]

    def _plan_for(self, f: torch.Tensor, extra: dict[str, Any]) -> str:
        if (
            self.execution != "auto" or not self.training or f.device.type not in MEASURE_DEVICES
            or torch.compiler.is_compiling()
        ):
            return self.execution_plan(f.shape[0], f.device)
        key = _signature(f)
        timing = self._timings.get(key)
        if timing is None:
            if not _timing_allowed():
                return self.execution_plan(f.shape[0], f.device)
            timing = self._timings[key] = self._time_executions(f, extra)
        return min(timing, key=timing.__getitem__)

    def _time_executions(self, f: torch.Tensor, extra: dict[str, Any]) -> dict[str, float]:
        """Median milliseconds of the tail's forward + backward in each execution, on this input. Leaves no
        trace: gradients are returned, not accumulated, BatchNorm statistics are restored, the RNG is forked."""
        f = f.detach().requires_grad_(f.requires_grad)
        inputs = [t for t in (f, *self.branches.parameters()) if t.requires_grad]
        buffers = list(self.branches.buffers())
        saved = [b.detach().clone() for b in buffers]
        runs = {
            "sequential": lambda: [b(f, **extra) for b in self.branches],
            "fused": lambda: self._fused[True](f, **extra),
        }

        def step(run: Callable[[], list[torch.Tensor]]) -> None:
            outs = run()
            _check_logits(outs[0])
            total = torch.stack([z.float().sum() for z in outs]).sum()
            if inputs:
                torch.autograd.grad(total, inputs, allow_unused=True)

        devices = []  # CUDA RNGs to fork besides the CPU's
        if f.device.type == "cuda":
            devices = [f.device.index if f.device.index is not None else torch.cuda.current_device()]
        try:
            with torch.random.fork_rng(devices=devices):
                return median_ms({name: lambda run=run: step(run) for name, run in runs.items()}, f.device,
                                 _MEASURE_REPEATS)
        finally:
            with torch.no_grad():
                for b, v in zip(buffers, saved):
                    b.copy_(v)

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
            f"kdwrap ONE: {type(self._original).__name__} split at '{self.split}', {self.num_branches} branches "
            f"(forward returns branch {self.branch})",
            f"  parameters: trunk {trunk_p:,} | one branch {branch_p:,} | gate {gate_p:,} | "
            f"wrapper {count_parameters([self]):,} | deployed {trunk_p + branch_p:,}",
        ]
        if self._describe_cut():
            lines.append(self._describe_cut())
        lines += describe_split(self, input_size)
        lines.append("  execution: " + self._describe_execution())
        size = flop_input_size(self, input_size)
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

    def _describe_execution(self) -> str:
        if self.execution == "sequential":
            return "sequential (branches one after the other), as requested"
        if not self._fused:
            return f"sequential: the tail cannot be fused ({self.fusion_error})"
        if self.execution == "fused":
            return "fused (all branches as one graph of m-times wider, grouped layers)"
        if not torch.cuda.is_available() and not self.execution_timings:
            # auto only ever fuses on CUDA: a plan for a device this machine lacks would only mislead.
            return ("auto: sequential on this machine (no CUDA device; on the CPU fusion saves no measurable time); "
                    "on CUDA, auto times fused against sequential at the first training step")
        per_sample = self._tail_gflop_per_sample
        limit = (
            f"batch <= {int(FUSE_MAX_GFLOP // per_sample):,}" if per_sample else "any batch (tail FLOPs unknown)"
        )
        lines = [
            f"auto: on {'/'.join(MEASURE_DEVICES)}, the faster of fused and sequential, timed at the first training "
            "step of each input signature",
            "    where it cannot time (other devices, torch.compile, deterministic algorithms, no autograd): fused on "
            f"CUDA for {limit} (one branch <= {FUSE_MAX_GFLOP:g} GFLOP per step), else sequential",
        ]
        for sig, ms in self.execution_timings.items():
            best = min(ms, key=ms.__getitem__)
            lines.append(
                f"    {sig}: {best} (tail forward + backward: "
                + ", ".join(f"{name} {t:.2f} ms" for name, t in ms.items()) + ")"
            )
        return "\n".join(lines)

    def _flops(self, input_size: Sequence[int]) -> tuple[int, int, int, tuple[int, ...]]:
        x = example_input(self._original, input_size)
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


def _timing_allowed() -> bool:
    # Deterministic algorithms ask for runs that repeat exactly; a choice by timing may differ between runs (the
    # executions agree to float tolerance, not bit for bit), so the rule decides there. Without autograd there is
    # no backward to time.
    return torch.is_grad_enabled() and timing_may_decide()


def _check_logits(z: Any) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(
            f"kdwrap one: the tail returned a {type(z).__name__}, not a logits tensor; name the logits "
            "with kdwrap.one(net, output=<index or key>)"
        )


def _signature(f: torch.Tensor) -> tuple:
    """What the speed of the branches depends on, besides the model: the key of ``execution="auto"``'s timings."""
    kind = f.device.type
    autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    channels_last = f.ndim == 4 and not f.is_contiguous() and f.is_contiguous(memory_format=torch.channels_last)
    return str(f.device), tuple(f.shape), f.dtype, autocast, channels_last


def _describe_signature(key: tuple) -> str:
    device, shape, dtype, autocast, channels_last = key
    parts = [device, "x".join(map(str, shape)), str(dtype).removeprefix("torch.")]
    if autocast is not None:
        parts.append(f"autocast {str(autocast).removeprefix('torch.')}")
    if channels_last:
        parts.append("channels_last")
    return " ".join(parts)


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


def ramp_weight(step: int, rampup_steps: int) -> float:
    """ONE's sigmoid ramp-up ``exp(-5 (1 - min(t, R) / R)^2)``; 1 when ``rampup_steps`` is 0."""
    if rampup_steps <= 0:
        return 1.0
    t = min(step, rampup_steps) / rampup_steps
    return math.exp(-5.0 * (1.0 - t) ** 2)


class RampedLoss(KDLoss):
    """A loss whose distillation term at temperature ``T`` is weighted by ONE's sigmoid ramp-up (ONE, OKDDip).

    Args:
        temperature: ``T`` of the distillation term.
        rampup_steps: optimizer steps of the sigmoid ramp-up of its weight (0: full weight from the start).
        accumulation_steps: loss calls per optimizer step under gradient accumulation (the ramp clock counts
            optimizer steps).
        check_finite: stop with a ``FloatingPointError`` naming the step at the first NaN/Inf in the logits (one
            host sync per step).
    """

    def __init__(
        self,
        model: KDModel,
        *,
        temperature: float = 3.0,
        rampup_steps: int = 0,
        accumulation_steps: int = 1,
        check_finite: bool = False,
    ) -> None:
        super().__init__(model, check_finite)
        self.temperature = check_temperature(model.method, temperature)
        self.rampup_steps, self.accumulation_steps = check_ramp_options(
            model.method, rampup_steps, accumulation_steps)
        # self.step (KDLoss) counts training-mode calls; the ramp clock is step // accumulation_steps

    def ramp(self) -> float:
        """The distillation weight at this step."""
        return ramp_weight(self.step // self.accumulation_steps, self.rampup_steps)

    def get_extra_state(self) -> dict[str, Any]:
        return {
            **super().get_extra_state(), "temperature": self.temperature, "rampup_steps": self.rampup_steps,
            "accumulation_steps": self.accumulation_steps,
        }

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, rampup_steps={self.rampup_steps}, step={self.step}"


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
        ce_all = _cross_entropy_rows(torch.cat([z, ensemble.unsqueeze(0)]).log_softmax(-1), target)  # m + 1
        teacher = F.softmax(ensemble.detach() / T, dim=-1)
        # KL(teacher || branch_i), summed over classes, averaged over the batch: F.kl_div's "batchmean" per branch.
        cross = (teacher * F.log_softmax(z / T, dim=-1)).sum(-1)  # m x B
        kl = (torch.xlogy(teacher, teacher).sum(-1) - cross).mean(-1)
        weight = self.ramp()
        loss = ce_all.sum() + (weight * T * T) * kl.sum()  # sum_i CE(z_i, y) + CE(z_e, y) + w T^2 sum_i KL_i
        self.step += 1
        ce = ce_all.detach()
        self.parts = {
            "loss": loss.detach(), "ce": ce[:-1], "ce_ensemble": ce[-1], "kl": kl.detach(),
            "ramp_weight": torch.tensor(weight),
        }
        return loss


def _cross_entropy_rows(logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each of the ``n`` rows of ``logp`` (n x B x C log-probabilities) with the same targets: int
    classes (B,) or probabilities (B, C); averaged over the batch, like ``F.cross_entropy``. Returns (n,)."""
    if target.is_floating_point():
        return -(logp * target).sum(-1).mean(-1)
    return -logp.gather(-1, target.expand(logp.shape[0], -1).unsqueeze(-1)).mean((1, 2))


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
