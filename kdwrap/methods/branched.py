"""The layout ONE and OKDDip share: the user's model cut by :func:`kdwrap.graph.split_model` into a shared trunk
and a tail replicated into ``m`` branches (branch 0 *is* the original tail, the others start from their own
initialisation).
Export keeps the trunk and one branch, as an instance of the user's own class."""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .._deploy import rebuild_original
from ..base import KDModel
from ..fused.planner import BranchExecution, branch_inputs, check_execution
from ..graph import SplitChoice, example_input, split_model
from .branch_init import reinitialise_like

__all__ = ["BranchedModel"]


class BranchedModel(KDModel):
    """A trunk and ``m`` branches cut from ``net``; subclasses add what joins the branches (ONE's gate, OKDDip's
    attention) and the forward.

    Args:
        branches: number of branches ``m`` (at least :attr:`min_branches`).
        split: dotted name of the first module of the tail; default :func:`kdwrap.graph.auto_split`.
        reinit_branches: branches 1..m-1 start from their own random initialisation, made the way the model
            initialises itself (default, as the reference code); ``False``: copies of the tail's weights (the
            choice for fine-tuning a pretrained model).
        input_size: (C, H, W) of an input, used when a trial forward is needed (channel counts, FLOPs).
        leaf_modules, autowrap_functions: passed to the fx tracer for code fx cannot trace into.
        output: index, key or field of the logits when ``net`` returns a tuple, dict or namedtuple.
        gate_channels, gate_channels_dim: override the inferred channel count (and its axis) of the trunk output.

    Attributes:
        split_record: what the split was made from (:class:`kdwrap.graph.SplitRecord`): the net as given, why the
            split is where it is (``split_choice``), the tracer's options.
        first_input_size: (C, H, W) of the first batch ``forward`` saw (``None`` before it, and under
            ``torch.compile``): ``summary()`` measures FLOPs there when no input size was given.
    """

    min_branches = 2
    why_min_branches = "an ensemble of one is no teacher"

    def __init__(
        self,
        net: nn.Module,
        *,
        branches: int,
        split: str | None = None,
        reinit_branches: bool = True,
        input_size: Sequence[int] | None = None,
        leaf_modules: Sequence[type] = (),
        autowrap_functions: Sequence[Callable] = (),
        output: int | str | None = None,
        gate_channels: int | None = None,
        gate_channels_dim: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(branches, bool) or not isinstance(branches, int) or branches < self.min_branches:
            raise ValueError(
                f"kdwrap {self.method} needs branches >= {self.min_branches} ({self.why_min_branches}), got "
                f"{branches!r}"
            )
        cut = split_model(
            net, split, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions, input_size=input_size,
            gate_channels=gate_channels, gate_channels_dim=gate_channels_dim, output=output,
        )
        self.split, self.input_size, self.output = cut.split, input_size, output
        # What the split was made from: the summary re-reads it to list the other cuts, export rebuilds its net.
        # A plain attribute (the net is outside the module tree: its tensors are the trunk's and branch 0's).
        self.split_record = cut.record
        # (C, H, W) of the first batch forward saw: summary's FLOPs at a real input size when none was given.
        self.first_input_size: tuple[int, ...] | None = None
        self._input_names, self._tail_inputs = cut.input_names, cut.tail_inputs
        self.trunk_channels, self.trunk_channels_dim = cut.channels, cut.channels_dim
        # A cut crossed by several values: the trunk returns them all, every branch takes them all, and the gate
        # pools the main one.
        self.cut_values, self.main_value = max(1, len(cut.crossing)), cut.main_value
        self.crossing = list(cut.crossing)
        self.trunk = cut.trunk
        copies = [copy.deepcopy(cut.tail) for _ in range(branches - 1)]
        if reinit_branches:
            reinitialise_like(net, copies)
        self.branches = nn.ModuleList([cut.tail, *copies])
        # A hook taking the module (not a bound method): deep copies (EMA, ONE-E export) check their own layout.
        self.register_load_state_dict_pre_hook(BranchedModel._check_checkpoint)

    @property
    def user_network(self) -> nn.Module:
        """The network the user wrapped (outside the module tree; its tensors are the trunk's and branch 0's)."""
        return self.split_record.net

    @property
    def split_choice(self) -> SplitChoice:
        """Why the split is where it is (:class:`kdwrap.graph.SplitChoice`), for ``summary()``."""
        return self.split_record.choice

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def _note_input(self, x: Any) -> None:
        """Called first in forward: keep the first batch's (C, H, W) in a plain attribute (no buffer: the
        state_dict keys stay the model's). Skipped inside torch.compile, where it would cost a graph break."""
        if (
            getattr(self, "first_input_size", None) is None  # wrappers pickled before this attribute existed
            and isinstance(x, torch.Tensor) and not torch.compiler.is_compiling()
        ):
            self.first_input_size = tuple(x.shape[1:])

    def _branch_inputs(self, f: Any) -> tuple:
        """The trunk's output as the branches' positional inputs."""
        return branch_inputs(f, self.cut_values)

    def plan_execution(self, execution: str, per_branch_input: bool = False, companions: Sequence[str] = ()) -> None:
        """Compose the branches' execution (:class:`kdwrap.fused.planner.BranchExecution`), once the tails are
        final: ``companions`` names other ModuleLists of tails that run as the branches do (PCL's mean teachers)."""
        self.branch_execution = BranchExecution(
            execution, self.method, self.branches, cut_values=self.cut_values, per_branch_input=per_branch_input,
            companions={name: getattr(self, name) for name in companions}, trunk=self.trunk,
            example=lambda: example_input(self.user_network, self.input_size, batch=2),
        )

    @property
    def execution(self) -> str:
        """How the branches run in a training forward: ``"auto"``, ``"sequential"`` or ``"fused"``."""
        return self.branch_execution.execution

    @execution.setter
    def execution(self, value: str) -> None:
        check_execution(value, self.method)
        self.branch_execution.execution = value

    @property
    def fusion_error(self) -> str | None:
        """Why the branches cannot be fused (``None`` when they can, or when fusion was not asked for)."""
        return self.branch_execution.fusion_error

    def execution_plan(self, batch: int | None = None, device: str | torch.device = "cuda") -> str:
        """The rule's plan for a training batch of ``batch`` samples on ``device``: ``"fused"`` or
        ``"sequential"`` (:meth:`kdwrap.fused.planner.BranchExecution.plan`)."""
        return self.branch_execution.plan(batch, device)

    @property
    def execution_timings(self) -> dict[str, dict[str, float]]:
        """What ``execution="auto"`` measured: per input signature, the median milliseconds of the tail's forward
        + backward in each execution; the faster runs every training batch of that signature."""
        return self.branch_execution.described_timings()

    def _run_branches(self, f: Any, extra: dict[str, Any], which: str = "branches") -> list[Any]:
        """Every tail of ``which`` (the branches or a companion) on ``f``, as the execution plans it."""
        return self.branch_execution.run(f, extra, self.training, which)

    def _main(self, f: Any) -> torch.Tensor:
        """The trunk output the gate pools: the trunk's output, or the main one of the values crossing the cut."""
        return f[self.main_value] if self.cut_values > 1 else f

    def _describe_cut(self) -> str | None:
        """A summary line for a cut crossed by several values, else None."""
        if self.cut_values == 1:
            return None
        return (f"  cut: crossed by {self.cut_values} values ({', '.join(self.crossing)}), all handed to every "
                f"branch; the gate pools {self.crossing[self.main_value]} (the largest tensor with one row per "
                "sample)")

    def _tail_kwargs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The model inputs besides the image that the tail reads too (timm ViT's ``attn_mask``), by name."""
        if not self._tail_inputs or not (args or kwargs):
            return {}
        given = dict(zip(self._input_names[1:], args), **kwargs)
        return {k: given[k] for k in self._tail_inputs if k in given}

    def _export_branch(self, branch: int) -> nn.Module:
        """The user's class holding the trunk and branch ``branch``, in this wrapper's train/eval mode."""
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < self.num_branches:
            raise ValueError(f"branch must be an int in [0, {self.num_branches}), got {branch!r}")
        net = rebuild_original(self.user_network, [self.trunk, self.branches[branch]])
        return net.train(self.training)

    def _check_checkpoint(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Before the children load: a checkpoint of another configuration fails here, by name, instead of as a
        list of mismatched keys (or, with ``strict=False``, a silent partial load). The configuration is read off
        the checkpoint's keys, so the state_dict holds tensors only (EMA, safetensors and FSDP walk it as such)."""
        legacy = state_dict.pop(prefix + "_extra_state", None)  # checkpoints of earlier versions carried it
        mine = {"branches": self.num_branches, "split": self.split}
        theirs = dict(legacy) if isinstance(legacy, dict) else _configuration_of(state_dict, prefix, self)
        if theirs is not None and {k: theirs.get(k) for k in mine} != mine:
            raise ValueError(
                f"this checkpoint is of a kdwrap {self.method} wrapper with {theirs}, but this wrapper has {mine}; "
                f"build the wrapper with the checkpoint's settings: kdwrap.{self.method}(net, "
                f"branches={theirs.get('branches')}, split={theirs.get('split')!r})"
            )


def _configuration_of(state_dict: dict[str, Any], prefix: str, model: BranchedModel) -> dict[str, Any] | None:
    """``{"branches", "split"}`` of the wrapper that saved ``state_dict``, from its keys; ``None`` when the keys say
    nothing about it (a partial state dict)."""
    branch_keys = [k[len(prefix) + len("branches."):] for k in state_dict if k.startswith(prefix + "branches.")]
    if not branch_keys:
        return None
    branches = len({k.split(".", 1)[0] for k in branch_keys})
    trunk_keys = {k[len(prefix) + len("trunk."):] for k in state_dict if k.startswith(prefix + "trunk.")}
    mine = {k[len("trunk."):] for k in model.state_dict() if k.startswith("trunk.")}
    if trunk_keys <= mine and {k.split(".", 1)[1] for k in branch_keys if k.startswith("0.")} <= set(
        k.split(".", 2)[2] for k in model.state_dict() if k.startswith("branches.0.")
    ):
        return {"branches": branches, "split": model.split}
    # Cut elsewhere: the split is the first module of the tail that is not a module of the trunk.
    parts = next(k for k in branch_keys if k.startswith("0.")).split(".")[1:-1]
    trunk_modules = {".".join(k.split(".")[:i]) for k in trunk_keys for i in range(1, k.count(".") + 1)}
    split = next((".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) not in trunk_modules),
                 ".".join(parts))
    return {"branches": branches, "split": split}
