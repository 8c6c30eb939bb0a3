"""The cuts near a split, for ``summary()``, read from the split's :class:`~.split.SplitRecord`: the cuts its rule
considered (:mod:`.stages`) that are valid, and each one's share of the forward FLOPs.

The shares come from one run of the model's eval-mode graph under ``torch.utils.flop_counter.FlopCounterMode``,
node by node: a cut's tail is every node from the cut's first node on, so its FLOPs are a suffix sum.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import SplitError
from .cut import ParameterUse, check_split_name
from .inputs import declared_input_size, example_input, trial_mode
from .outputs import select_output
from .split import SplitRecord
from .tracing import Traced, module_order, trace

__all__ = ["Candidate", "candidates", "describe_split", "flop_input_size", "not_measured_line"]

SHOWN = 5  # the candidates a summary lists, the chosen split included
_NOT_MEASURED = "not measured yet: pass input_size=(C, H, W) or run one batch first"


@dataclass
class Candidate:
    """A cut of the model: its first module, its tail's share of the forward FLOPs (``None`` when no input size is
    known), and whether it is the split in use."""

    name: str
    tail_share: float | None
    chosen: bool


def _valid_cuts(net: nn.Module, traced: Traced, names: Sequence[str]) -> dict[str, int]:
    """The names that cut the graph as :func:`.split.split_model` needs (a module called once, a trunk
    before it, parameters after it, none on both sides), with their first node's index; one name per cut, the
    first name (the split in use) first."""
    nodes = list(traced.graph.nodes)
    where = {n: i for i, n in enumerate(nodes)}
    first = module_order(traced)
    use = ParameterUse.of(net, traced)
    valid: dict[str, int] = {names[0]: first[names[0]]}  # the split in use: split_model checked it
    for name in names[1:]:
        if name not in first or first[name] in valid.values():
            continue
        try:
            check_split_name(net, name, traced)
        except SplitError:
            continue
        i = first[name]
        crossed = any(
            n.op not in ("get_attr", "placeholder") and any(where[u] >= i for u in n.users) for n in nodes[:i]
        )
        if crossed and use.tail_learns(i) and not use.unties(i):
            valid[name] = i
    return valid


class _NodeFlops(fx.Interpreter):
    """Runs a graph under a FLOP counter, keeping each node's forward FLOPs (in graph order)."""

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode) -> None:
        super().__init__(gm)
        self.counter, self.flops = counter, []

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        out = super().run_node(n)
        self.flops.append(self.counter.get_total_flops() - before)
        return out


def _tail_shares(net: nn.Module, traced: Traced, cuts: dict[str, int], x: torch.Tensor) -> dict[str, float]:
    counter = FlopCounterMode(display=False)
    run = _NodeFlops(fx.GraphModule(net, traced.graph), counter)
    with trial_mode(net), counter:
        run.run(x)
    from_here = list(itertools.accumulate(reversed(run.flops)))[::-1]  # FLOPs of node i and every node after it
    total = max(from_here[0], 1)
    return {name: from_here[i] / total for name, i in cuts.items()}


def flop_input_size(
    record: SplitRecord, input_size: Sequence[int] | None = None, seen: Sequence[int] | None = None
) -> tuple[int, ...] | None:
    """The input at which ``summary()`` measures FLOPs: ``input_size``, else the one the split was made with, else
    ``seen`` (the first batch's), else the model's declared size; ``None`` when none is known."""
    for size in (input_size, record.input_size, seen):
        if size is not None:
            return tuple(size)
    return declared_input_size(record.net)


def candidates(
    split: Any, input_size: Sequence[int] | None = None, seen: Sequence[int] | None = None, limit: int = SHOWN,
) -> list[Candidate]:
    """The split and the valid cuts nearest it among those its rule considered (at most ``limit`` in all, nearest
    first, the chosen one first), with each tail's share of the forward FLOPs at :func:`flop_input_size`.

    ``split`` is a :class:`~.split.SplitRecord`, or a wrapper that holds one as ``split_record`` (ONE, OKDDip,
    PCL), whose first batch's size then stands in for ``seen``."""
    record = getattr(split, "split_record", split)
    if not isinstance(record, SplitRecord):
        raise TypeError(f"candidates() takes a SplitRecord or a ONE/OKDDip/PCL wrapper, got {type(split).__name__}")
    if seen is None and record is not split:
        seen = getattr(split, "first_input_size", None)
    choice, net = record.choice, record.net
    traced = trace(net, False, record.leaf_modules, record.autowrap_functions, record.input_size)
    select_output(traced, net, record.output, training=False)
    cuts = _valid_cuts(net, traced, [choice.split, *choice.considered])
    pos = {n: i for i, n in enumerate(sorted(cuts, key=cuts.__getitem__))}
    here = pos[choice.split]
    nearest = sorted(pos, key=lambda n: (abs(pos[n] - here), pos[n] > here))[:limit]  # the earlier one first
    size = flop_input_size(record, input_size, seen)
    shares = {} if size is None else _tail_shares(net, traced, {n: cuts[n] for n in nearest}, example_input(net, size))
    return [Candidate(n, shares.get(n), n == choice.split) for n in nearest]


def describe_split(
    record: SplitRecord, input_size: Sequence[int] | None = None, seen: Sequence[int] | None = None
) -> list[str]:
    """``summary()``'s lines on the split of ``record``: the rule that chose it, and the nearest candidates' FLOP
    shares (at ``input_size``, else where :func:`flop_input_size` finds one; ``seen`` is the first batch's size)."""
    choice = record.choice
    why = f"chosen as {choice.rule}; pass split=... to change it" if choice.automatic else choice.rule
    lines = [f"  split: {choice.split!r}, {why}"]
    size = flop_input_size(record, input_size, seen)
    try:
        found = candidates(record, input_size, seen)
    except Exception as err:  # the candidates are informative only; say why they are missing
        return lines + [f"  candidates: not measured ({type(err).__name__}: {err})"]
    shown = " | ".join(
        c.name + ("" if c.tail_share is None else f" {c.tail_share:.1%}") + (" (chosen)" if c.chosen else "")
        for c in found
    )
    if size is None:
        return lines + [f"  candidates: {shown} (tail shares of forward FLOPs {_NOT_MEASURED})"]
    return lines + [f"  candidates (tail share of forward FLOPs at input {size}): {shown}"]


def not_measured_line(what: str) -> str:
    """The summary line for FLOPs that need an input size nobody gave yet."""
    return f"  {what}: {_NOT_MEASURED}"
