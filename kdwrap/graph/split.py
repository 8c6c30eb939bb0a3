"""The split: cut a model at a named module (by default where :mod:`.stages` says) into a shared trunk and a tail
that can be replicated, both sharing the model's own tensors.

The model is traced in both modes (:mod:`.tracing`), the logits selected among its outputs (:mod:`.outputs`), the
graphs cut at the first node of the split module (:mod:`.cut`), and the channels of the values crossing the cut read
for ONE's gate (:mod:`.channels`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from torch import fx, nn

from ..errors import SplitError
from .channels import main_value, run_trunk, trunk_channels
from .concrete_tracer import check_batch_free
from .cut import (
    ParameterUse, Piece, check_no_shared_parameters, check_split_name, cut_graph, tail_names_of_shared,
)
from .outputs import select_output
from .stages import SplitChoice, Stages, given_split
from .tracing import Traced, module_order, trace

__all__ = ["SplitRecord", "SplitResult", "split_model"]


@dataclass(frozen=True)
class SplitRecord:
    """What a split was made from, handed to whoever reads it again later (``summary()``'s candidate cuts and their
    FLOP shares, export): the network as given, why the split is where it is, and the tracer's options."""

    net: nn.Module
    choice: SplitChoice
    leaf_modules: tuple[type, ...] = ()
    autowrap_functions: tuple[Callable, ...] = ()
    input_size: tuple[int, ...] | None = None
    output: int | str | None = None


@dataclass
class SplitResult:
    """The cut model: ``trunk(x) -> features``, ``tail(features) -> logits``."""

    split: str
    trunk: Piece
    tail: Piece
    channels: int
    channels_dim: int  # 1 (NCHW-like) or -1 (NHWC or tokens): the axis of `channels` in the trunk output
    input_names: list[str]  # the model's forward inputs, in order
    tail_inputs: list[str]  # those of them the tail reads too (passed by name)
    crossing: list[str] = field(default_factory=list)  # the values crossing the cut (graph node names)
    main_value: int = 0  # which of them the gate pools (the largest tensor with a batch axis)
    record: SplitRecord | None = None  # what the split was made from, and why it is where it is

    @property
    def choice(self) -> SplitChoice | None:
        return None if self.record is None else self.record.choice


def split_model(
    net: nn.Module,
    split: str | None = None,
    *,
    leaf_modules: Sequence[type] = (),
    autowrap_functions: Sequence[Callable] = (),
    input_size: Sequence[int] | None = None,
    gate_channels: int | None = None,
    gate_channels_dim: int | None = None,
    output: int | str | None = None,
) -> SplitResult:
    """Cut ``net`` at module ``split`` (default :func:`.stages.auto_split`) into trunk and tail sharing ``net``'s
    tensors.

    ``output`` names the logits (index, key or field) when ``net`` returns a tuple, dict or namedtuple.
    """
    train_t = trace(net, True, leaf_modules, autowrap_functions, input_size)
    eval_t = trace(net, False, leaf_modules, autowrap_functions, input_size)
    select_output(train_t, net, output, training=True)
    select_output(eval_t, net, output, training=False)
    if eval_t.example is not None:
        check_batch_free(fx.GraphModule(net, eval_t.graph), net, eval_t.example, output)
    choice = Stages(net, eval_t, input_size).split() if split is None else None
    split = choice.split if choice is not None else split
    if not isinstance(split, str):
        raise TypeError(f"split must be a dotted module name (str), got {type(split).__name__}")
    check_split_name(net, split, eval_t)
    choice = choice or given_split(net, eval_t, split)
    if choice.automatic:  # the automatic split would untie weights (timm CoaT's position encodings): move on
        shared = tail_names_of_shared(net, eval_t, module_order(eval_t)[split])
        later = _after_shared_parameters(net, eval_t, split) if shared else None
        if later is not None:
            choice.rule += (f", moved to the first module after the last use of weights the trunk shares "
                            f"({', '.join(shared[:4])})")
            choice.split = split = later
    cut_train, cut_eval = cut_graph(train_t, split), cut_graph(eval_t, split)
    trunk = Piece(net, cut_train.trunk, cut_eval.trunk, class_name="Trunk")
    tail = Piece(net, cut_train.tail, cut_eval.tail, class_name="Tail")
    for piece in (trunk, tail):
        piece.train(net.training)
    if not any(True for _ in tail.parameters()):
        raise SplitError(
            f"split={split!r} leaves a tail with no parameters (nothing to replicate); split earlier, e.g. at the "
            "start of the last stage (the default)"
        )
    check_no_shared_parameters(trunk, tail, split)
    crossing = cut_eval.crossing
    if len(cut_train.crossing) != len(crossing):
        raise SplitError(
            f"split={split!r} is crossed by {len(cut_train.crossing)} values in training mode and {len(crossing)} "
            "in eval mode; choose another split"
        )
    if gate_channels is None:
        gate_channels, dim, main = trunk_channels(net, trunk, crossing, input_size)
    else:
        dim, main = 1, 0
        if len(crossing) > 1:
            try:
                main = main_value(tuple(run_trunk(net, trunk, input_size, "the value the gate pools")))
            except SplitError:  # the caller gave the channels; without a trial forward, the first value
                main = 0
    if gate_channels_dim is not None:
        if gate_channels_dim not in (1, -1):
            raise ValueError(
                f"gate_channels_dim must be 1 (channels first) or -1 (channels last), got {gate_channels_dim}"
            )
        dim = gate_channels_dim
    input_names = [n.name for n in cut_eval.trunk.nodes if n.op == "placeholder"]
    tail_inputs = sorted(set(cut_train.tail_inputs) | set(cut_eval.tail_inputs), key=input_names.index)
    record = SplitRecord(net, choice, tuple(leaf_modules), tuple(autowrap_functions),
                         None if input_size is None else tuple(input_size), output)
    return SplitResult(split, trunk, tail, int(gate_channels), dim, input_names, tail_inputs,
                       [n.name for n in crossing], main, record)


def _after_shared_parameters(net: nn.Module, traced: Traced, split: str) -> str | None:
    """The outermost module that starts after ``split`` at a cut that unties no parameter and leaves a tail with
    parameters (timm CoaT: after the last use of the position encodings its stages share); None if there is none."""
    use, order = ParameterUse.of(net, traced), module_order(traced)
    later = sorted((path.count("."), i, path) for path, i in order.items() if path and i > order[split])
    for _, i, path in later:
        if use.tail_learns(i) and not use.unties(i):
            try:
                check_split_name(net, path, traced)
            except SplitError:
                continue
            return path
    return None
