"""Where ONE cuts a model, and why: the rule that chose the split (:func:`kdwrap.surgery.auto_split`), the other cuts
that rule considered, and each cut's share of the forward FLOPs, for ``summary()``.

The shares come from one run of the model's eval-mode graph under ``torch.utils.flop_counter.FlopCounterMode``,
node by node: a cut's tail is every node from the cut's first node on, so its FLOPs are a suffix sum.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import SplitError
from .probe import declared_input_size, example_input, trial_mode
from .surgery import (
    _check_split_name, _downsamples, _module_paths_with_nodes, _ParameterUse, _Traced, select_output, trace,
)
from .taps import _is_stage, graph_stage_starts

__all__ = ["SplitChoice", "Candidate", "choose_split", "given_split", "candidates", "describe_split",
           "flop_input_size"]

SHOWN = 5  # the candidates a summary lists, the chosen split included
_NOT_MEASURED = "not measured yet: pass input_size=(C, H, W) or run one batch first"


@dataclass
class SplitChoice:
    """The module that starts the tail, the rule that chose it (a sentence), whether kdwrap chose it, and the cuts
    the rule considered (module names; the chosen one among them)."""

    split: str
    rule: str
    automatic: bool = True
    considered: list[str] = field(default_factory=list)


@dataclass
class Candidate:
    """A cut of the model: its first module, its tail's share of the forward FLOPs (``None`` when no input size is
    known), and whether it is the split in use."""

    name: str
    tail_share: float | None
    chosen: bool


def _children(net: nn.Module, order: dict[str, int], path: str) -> list[str]:
    """The children of module ``path`` that own nodes of the graph, in execution order."""
    mod = net.get_submodule(path) if path else net
    names = [f"{path}.{n}" if path else n for n, _ in mod.named_children()]
    return sorted((n for n in names if n in order), key=order.__getitem__)


def _siblings(net: nn.Module, order: dict[str, int], name: str) -> list[str]:
    """Module ``name`` and the other children of its parent that own nodes, in execution order."""
    return _children(net, order, name.rsplit(".", 1)[0] if "." in name else "")


def choose_split(net: nn.Module, traced: _Traced, input_size: Sequence[int] | None = None) -> SplitChoice:
    """The rules of :func:`kdwrap.surgery.auto_split`, in order; the first that applies chooses."""
    order = _module_paths_with_nodes(traced)

    def is_container(path: str) -> bool:
        return path == "" or isinstance(net.get_submodule(path), (nn.Sequential, nn.ModuleList, nn.ModuleDict))

    def last_stage(path: str) -> tuple[str, str, list[str]] | None:
        """(start of the last stage, the container holding it, that container's downsampling children)."""
        if not is_container(path):
            return None
        downs = [c for c in _children(net, order, path) if _downsamples(net.get_submodule(c))]
        if not downs:
            return None
        if len(downs) == 1:  # a single multi-stage child such as torchvision's `features`
            return last_stage(downs[0])
        return last_stage(downs[-1]) or (downs[-1], path, downs)

    found = last_stage("")
    if found is not None and found[0] != next(iter(order), None):
        split, parent, downs = found
        # The other stages (not a lone strided conv or pooling) and the blocks of the chosen stage.
        stages = [d for d in downs if d == split or _is_stage(net.get_submodule(d))]
        where = f"'{parent}'" if parent else "the model"
        return SplitChoice(
            split, f"the start of the last resolution stage (the last of the downsampling children of {where})",
            considered=stages + _children(net, order, split),
        )
    # Transformers: the longest run of same-class blocks.
    best: tuple[int, str] | None = None
    for path, mod in net.named_modules():
        if path in order and isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod) >= 4:
            kinds = {type(c) for c in mod}
            if len(kinds) == 1 and (best is None or len(mod) > best[0]):
                best = (len(mod), path)
    if best is not None:
        n, path = best
        blocks = [f"{path}.{name}" for name, _ in net.get_submodule(path).named_children()]
        return SplitChoice(
            blocks[n - n // 4], f"block n - n // 4 of the longest stack of identical blocks '{path}' ({n} blocks)",
            considered=blocks,
        )
    stages = graph_stage_starts(net, traced, input_size)
    if len(stages) >= 2:
        # The other stages and the modules beside the chosen one (a LeNet's conv1, fc1, ...).
        return SplitChoice(stages[-1], "the start of the last resolution stage read from the graph",
                           considered=stages + _siblings(net, order, stages[-1]))
    raise SplitError(
        f"kdwrap could not choose a split for {type(net).__name__} automatically; pass split=<module name>, "
        f"the first module of the part to replicate, e.g. one of: {', '.join(_children(net, order, '')[-6:])}; or, "
        "if the model downsamples inside forward (F.max_pool2d), input_size=(C, H, W) of your inputs, from which "
        "kdwrap reads its resolution stages"
    )


def given_split(net: nn.Module, traced: _Traced, split: str) -> SplitChoice:
    """A split the user named: the cuts considered are its siblings (``layer3`` -> ``layer1`` .. ``fc``)."""
    siblings = _siblings(net, _module_paths_with_nodes(traced), split)
    return SplitChoice(split, f"given by the user (split={split!r})", automatic=False, considered=siblings)


def _valid_cuts(net: nn.Module, traced: _Traced, names: Sequence[str]) -> dict[str, int]:
    """The names that cut the graph as :func:`kdwrap.surgery.split_model` needs (a module called once, a trunk
    before it, parameters after it, none on both sides), with their first node's index; one name per cut, the
    first name (the split in use) first."""
    nodes = list(traced.graph.nodes)
    where = {n: i for i, n in enumerate(nodes)}
    first = _module_paths_with_nodes(traced)
    use = _ParameterUse.of(net, traced)
    valid: dict[str, int] = {names[0]: first[names[0]]}  # the split in use: split_model checked it
    for name in names[1:]:
        if name not in first or first[name] in valid.values():
            continue
        try:
            _check_split_name(net, name, traced)
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


def _tail_shares(net: nn.Module, traced: _Traced, cuts: dict[str, int], x: torch.Tensor) -> dict[str, float]:
    counter = FlopCounterMode(display=False)
    run = _NodeFlops(fx.GraphModule(net, traced.graph), counter)
    with trial_mode(net), counter:
        run.run(x)
    from_here = list(itertools.accumulate(reversed(run.flops)))[::-1]  # FLOPs of node i and every node after it
    total = max(from_here[0], 1)
    return {name: from_here[i] / total for name, i in cuts.items()}


def flop_input_size(model: Any, input_size: Sequence[int] | None = None) -> tuple[int, ...] | None:
    """The input at which ``summary()`` measures FLOPs: ``input_size``, else the wrapper's ``input_size``, else the
    first batch it saw, else the model's declared size; ``None`` when none is known."""
    for size in (input_size, model.input_size, model.first_input_size):
        if size is not None:
            return tuple(size)
    return declared_input_size(model._original)


def candidates(model: Any, input_size: Sequence[int] | None = None, limit: int = SHOWN) -> list[Candidate]:
    """The split of a ONE / OKDDip wrapper and the valid cuts nearest it among those its rule considered (at most
    ``limit`` in all, nearest first, the chosen one first), with each tail's share of the forward FLOPs at
    :func:`flop_input_size`."""
    choice, net = model.split_choice, model._original
    traced = trace(net, False, *model._trace_options, model.input_size)
    select_output(traced, net, model.output, training=False)
    cuts = _valid_cuts(net, traced, [choice.split, *choice.considered])
    pos = {n: i for i, n in enumerate(sorted(cuts, key=cuts.__getitem__))}
    here = pos[choice.split]
    nearest = sorted(pos, key=lambda n: (abs(pos[n] - here), pos[n] > here))[:limit]  # the earlier one first
    size = flop_input_size(model, input_size)
    shares = {} if size is None else _tail_shares(net, traced, {n: cuts[n] for n in nearest}, example_input(net, size))
    return [Candidate(n, shares.get(n), n == choice.split) for n in nearest]


def describe_split(model: Any, input_size: Sequence[int] | None = None) -> list[str]:
    """``summary()``'s lines on the split: the rule that chose it, and the nearest candidates' FLOP shares."""
    choice = model.split_choice
    why = f"chosen as {choice.rule}; pass split=... to change it" if choice.automatic else choice.rule
    lines = [f"  split: {choice.split!r}, {why}"]
    size = flop_input_size(model, input_size)
    try:
        found = candidates(model, input_size)
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
