"""How ONE's and OKDDip's branches and PCL's peers run in a training forward: one after the other, or fused into
one graph (:func:`.fuse_branches`), and with ``execution="auto"`` the faster of the two, timed on the first batch of
each input signature, or chosen by a rule where it cannot be timed.

:class:`BranchExecution` is composed into the model: the model hands it, by argument, everything it plans for (the
replicated tails, how many values cross the cut, an example input for the shape checks) and asks it to run the tails.
It reads nothing else of the model. A model whose tails each read their own input (PCL's peers, one view each) says
so with ``per_branch_input``; other sets of tails that run as the branches do (PCL's mean teachers) are its
``companions``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from .._timing import median_ms, timing_may_decide
from ..base import check_logits
from ..errors import FusionError
from ..graph import forward_flops
from .branches import FusedBranches, fuse_branches

__all__ = ["BranchExecution", "branch_inputs", "EXECUTIONS", "FUSE_MAX_GFLOP", "MEASURE_DEVICES", "check_execution"]

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


class BranchExecution:
    """The execution of ``m`` replicated tails (``branches``): the fused graphs and why there are none
    (:attr:`fusion_error`), the rule's plan (:meth:`plan`), what ``auto`` measured (:attr:`timings`), and
    :meth:`run`. A plain object, not a module: the tails stay where the model registers them.

    Args:
        execution: one of :data:`EXECUTIONS` (checked by :func:`check_execution`).
        method: the method's name, for errors.
        branches: the ``m`` tails, a ``ModuleList``.
        cut_values: how many values cross the cut; fused execution takes one.
        per_branch_input: each tail reads its own input (a list of ``m``) instead of one shared.
        companions: other ``ModuleList``\\ s of ``m`` tails with the branches' graph that run without gradient in
            the same training forward (PCL's mean teachers), by name: fused when the branches are.
        trunk, example: the trunk and a callable returning a 2-sample example input of the model (or raising when
            none is known), for the shape-dependent fusion checks and the tail's FLOPs; used here only.
    """

    def __init__(
        self, execution: str, method: str, branches: nn.ModuleList, *, cut_values: int = 1,
        per_branch_input: bool = False, companions: Mapping[str, nn.ModuleList] | None = None,
        trunk: nn.Module | None = None, example: Callable[[], Any] | None = None,
    ) -> None:
        check_execution(execution, method)
        self.execution, self.method = execution, method
        self.branches, self.cut_values, self.per_branch_input = branches, cut_values, per_branch_input
        self.companions = dict(companions or {})
        self.fused: dict[bool, FusedBranches] = {}  # training mode -> the fused graph of the branches
        self.fused_companions: dict[str, FusedBranches] = {}  # training mode only
        self.fusion_error: str | None = None
        self.tail_gflop_per_sample: float | None = None
        self.timings: dict[tuple, dict[str, float]] = {}  # input signature -> ms per execution (auto)
        if execution == "sequential":
            return
        if cut_values > 1:
            reason = f"the cut is crossed by {cut_values} values; fused execution takes one"
            if execution == "fused":
                raise FusionError(f"execution='fused' is not possible for this tail: {reason}. Use 'sequential'")
            self.fusion_error = reason
            return
        try:
            each = per_branch_input
            self.fused = {mode: fuse_branches(branches, mode, per_branch_input=each) for mode in (True, False)}
            self.fused_companions = {
                name: fuse_branches(tails, True, per_branch_input=each) for name, tails in self.companions.items()}
            self._check_fusion(trunk, example)
        except Exception as err:  # a FusionError names the op; anything else is a gap in the rules: same fallback
            if execution == "fused":
                raise FusionError(
                    f"execution='fused' is not possible for this tail: {err}. Use execution='sequential' (or "
                    "'auto', which falls back to it)"
                ) from err
            reason = str(err) if isinstance(err, FusionError) else f"{type(err).__name__}: {err}"
            self.fused, self.fused_companions, self.fusion_error = {}, {}, reason

    def _check_fusion(self, trunk: nn.Module | None, example: Callable[[], Any] | None) -> None:
        """Run the shape-dependent fusion checks on a 2-sample example input, and measure one branch's FLOPs per
        sample for the ``auto`` rule. Skipped when no example input fits the model: the first call checks."""
        if trunk is None or example is None:
            return
        pieces = [trunk, self.branches, *self.companions.values()]
        try:
            x = example()
            modes = [(m, m.training) for piece in pieces for m in piece.modules()]
            for piece in pieces:
                piece.eval()
            try:
                with torch.no_grad():
                    f = trunk(x)
                    flops, _ = forward_flops(self.branches[0], f)
            finally:
                for m, mode in modes:
                    m.training = mode
        except Exception:  # the input size is unknown here; an unfusable op still fails at the first call
            return
        self.tail_gflop_per_sample = flops / 2 / 1e9
        for fused in [*self.fused.values(), *self.fused_companions.values()]:
            fused.check(fused.inputs([f] * len(self.branches)) if self.per_branch_input else f)

    def plan(self, batch: int | None = None, device: str | torch.device = "cuda") -> str:
        """The rule's plan for a training batch of ``batch`` samples on ``device``: ``"fused"`` (one graph for all
        branches) or ``"sequential"``. ``execution="auto"`` follows it where it cannot time the executions
        (see :meth:`described_timings`): fused on CUDA while ``batch`` x one branch's forward GFLOP per sample is
        at most :data:`FUSE_MAX_GFLOP`."""
        if not self.fused:
            return "sequential"
        if self.execution == "fused":
            return "fused"
        per_sample = self.tail_gflop_per_sample
        small = batch is None or per_sample is None or batch * per_sample <= FUSE_MAX_GFLOP
        return "fused" if torch.device(device).type == "cuda" and small else "sequential"

    def described_timings(self) -> dict[str, dict[str, float]]:
        """What ``execution="auto"`` measured: per input signature (device, shape, dtype, autocast, memory
        format), the median milliseconds of the tail's forward + backward in each execution. The faster is used
        for every training batch of that signature."""
        return {_describe_signature(k): dict(v) for k, v in self.timings.items()}

    def run(self, f: Any, extra: dict[str, Any], training: bool, which: str = "branches") -> list[Any]:
        """Every tail of ``which`` (the branches, or one of the ``companions``) on ``f``: the trunk output, or with
        ``per_branch_input`` the list of each tail's own; fused or one after the other, as planned."""
        tails = self.branches if which == "branches" else self.companions[which]
        fused = (self.fused.get(training) if which == "branches"
                 else self.fused_companions.get(which) if training else None)
        if fused is not None and self._plan_for(f, extra, training) == "fused":
            return fused(fused.inputs(f) if self.per_branch_input else f, **extra)
        inputs = f if self.per_branch_input else [f] * len(tails)
        return [b(*branch_inputs(fi, self.cut_values), **extra) for b, fi in zip(tails, inputs)]


    def _plan_for(self, f: Any, extra: dict[str, Any], training: bool) -> str:
        first = f[0] if self.per_branch_input else f
        if (
            self.execution != "auto" or not training or first.device.type not in MEASURE_DEVICES
            or torch.compiler.is_compiling()
        ):
            return self.plan(first.shape[0], first.device)
        key = _signature(first)
        timing = self.timings.get(key)
        if timing is None:
            if not _timing_allowed():
                return self.plan(first.shape[0], first.device)
            timing = self.timings[key] = self.time_executions(f, extra)
        return min(timing, key=timing.__getitem__)

    def time_executions(self, f: Any, extra: dict[str, Any]) -> dict[str, float]:
        """Median milliseconds of the tail's forward + backward in each execution, on this input. Leaves no
        trace: gradients are returned, not accumulated, BatchNorm statistics are restored, the RNG is forked."""
        own = [fi.detach().requires_grad_(fi.requires_grad) for fi in (f if self.per_branch_input else [f])]
        each = own if self.per_branch_input else own * len(self.branches)
        inputs = [t for t in (*own, *self.branches.parameters()) if t.requires_grad]
        buffers = list(self.branches.buffers())
        saved = [b.detach().clone() for b in buffers]
        fused = self.fused[True]
        runs = {
            "sequential": lambda: [b(fi, **extra) for b, fi in zip(self.branches, each)],
            "fused": lambda: fused(fused.inputs(each) if self.per_branch_input else own[0], **extra),
        }

        def step(run: Callable[[], list[Any]]) -> None:
            outs = run()
            check_logits(outs[0][0] if isinstance(outs[0], tuple) else outs[0], self.method, dims=None)
            total = torch.stack([z.float().sum() for o in outs for z in (o if isinstance(o, tuple) else (o,))]).sum()
            if inputs:
                torch.autograd.grad(total, inputs, allow_unused=True)

        device = own[0].device
        devices = []  # CUDA RNGs to fork besides the CPU's
        if device.type == "cuda":
            devices = [device.index if device.index is not None else torch.cuda.current_device()]
        try:
            with torch.random.fork_rng(devices=devices):
                return median_ms({name: lambda run=run: step(run) for name, run in runs.items()}, device,
                                 _MEASURE_REPEATS)
        finally:
            with torch.no_grad():
                for b, v in zip(buffers, saved):
                    b.copy_(v)

    def describe(self) -> str:
        """``summary()``'s account of the execution: the setting, the rule's limit and what auto measured."""
        if self.execution == "sequential":
            return "sequential (branches one after the other), as requested"
        if not self.fused:
            return f"sequential: the tail cannot be fused ({self.fusion_error})"
        if self.execution == "fused":
            return "fused (all branches as one graph of m-times wider, grouped layers)"
        if not torch.cuda.is_available() and not self.timings:
            # auto only ever fuses on CUDA: a plan for a device this machine lacks would only mislead.
            return ("auto: sequential on this machine (no CUDA device; on the CPU fusion saves no measurable time); "
                    "on CUDA, auto times fused against sequential at the first training step")
        per_sample = self.tail_gflop_per_sample
        limit = (
            f"batch <= {int(FUSE_MAX_GFLOP // per_sample):,}" if per_sample else "any batch (tail FLOPs unknown)"
        )
        lines = [
            f"auto: on {'/'.join(MEASURE_DEVICES)}, the faster of fused and sequential, timed at the first training "
            "step of each input signature",
            "    where it cannot time (other devices, torch.compile, deterministic algorithms, no autograd): fused on "
            f"CUDA for {limit} (one branch <= {FUSE_MAX_GFLOP:g} GFLOP per step), else sequential",
        ]
        for sig, ms in self.described_timings().items():
            best = min(ms, key=ms.__getitem__)
            lines.append(
                f"    {sig}: {best} (tail forward + backward: "
                + ", ".join(f"{name} {t:.2f} ms" for name, t in ms.items()) + ")"
            )
        return "\n".join(lines)


def branch_inputs(f: Any, cut_values: int) -> tuple:
    """The trunk's output as a tail's positional inputs: the ``cut_values`` values crossing the cut, or the one."""
    return tuple(f) if cut_values > 1 else (f,)


def _timing_allowed() -> bool:
    # Deterministic algorithms ask for runs that repeat exactly; a choice by timing may differ between runs (the
    # executions agree to float tolerance, not bit for bit), so the rule decides there. Without autograd there is
    # no backward to time.
    return torch.is_grad_enabled() and timing_may_decide()


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


def check_execution(execution: Any, method: str) -> None:
    """A clear error for an unknown ``execution`` option, raised before any surgery."""
    if execution not in EXECUTIONS:
        raise ValueError(
            f"kdwrap {method}: unknown execution {execution!r}; valid: {', '.join(map(repr, EXECUTIONS))}")
