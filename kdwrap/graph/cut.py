"""Cutting a traced graph at the first node of a module: the names that mark a place in the model, the trunk and tail
graphs, the pieces that hold them (torchvision ``DualGraphModule``\\ s whose parameters are the original model's own
tensors and whose ``state_dict`` keys are the original model's keys), and where each parameter is read, so that no
cut unties a parameter used on both sides.
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Any

from torch import fx, nn
from torchvision.models.feature_extraction import DualGraphModule

from ..errors import SplitError
from .tracing import Traced, in_module, module_order

__all__ = ["check_split_name", "Cut", "cut_graph", "Piece", "ParameterUse", "parameters_read", "shared_parameters",
           "check_no_shared_parameters", "tail_names_of_shared"]


def _valid_splits(traced: Traced, net: nn.Module) -> list[str]:
    names = set(module_order(traced))
    return [n for n, _ in net.named_modules() if n in names]


def check_split_name(net: nn.Module, split: str, traced: Traced) -> None:
    valid = _valid_splits(traced, net)
    if split in valid:
        # NodePathTracer names the n-th extra call of a module "<name>_<n>" (torchvision ResNet blocks reuse relu).
        depth, name = split.count("."), split.rsplit(".", 1)[-1]
        parent = split[: -len(name)]
        repeats = sorted({
            parent + part for q in traced.qualnames.values() if q and q.startswith(split)
            for part in [q.split(".")[depth]] if part.startswith(name + "_") and part[len(name) + 1:].isdigit()
        })
        if repeats:
            raise SplitError(
                f"split={split!r} is ambiguous: forward calls that module {len(repeats) + 1} times (as "
                f"{', '.join([split, *repeats])}), so it marks no single place in the model; split at a module "
                "called once, such as the enclosing block or stage"
            )
        return
    known = dict(net.named_modules())
    if split in known:
        raise SplitError(
            f"split={split!r} is a module of {type(net).__name__} but no operation of the traced graph belongs to "
            "it (it is unused in forward, or lies inside a module fx treats as a leaf); pick an enclosing module"
        )
    close = difflib.get_close_matches(split, valid, n=5, cutoff=0.5)
    top = [n for n in valid if n.count(".") <= 1]
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise SplitError(
        f"split={split!r} is not a module of {type(net).__name__}.{hint} Valid split names are the dotted module "
        f"names of the model (net.named_modules()), e.g.: {', '.join(top[:40])}{' ...' if len(top) > 40 else ''}"
    )


@dataclass
class Cut:
    trunk: fx.Graph
    tail: fx.Graph
    crossing: list[fx.Node]  # the nodes of the original graph whose values flow from trunk to tail, in order
    tail_inputs: list[str]  # model inputs (placeholders) the tail reads besides the trunk output

    @property
    def cut(self) -> fx.Node:
        """The one value crossing a single-value cut."""
        return self.crossing[0]


def cut_graph(traced: Traced, split: str, single: bool = False) -> Cut:
    """Cut the graph at the first node of module ``split``. The trunk returns the value crossing the cut, or, when
    several do (token models' class token and spatial sizes, two-stream networks), the tuple of them; the tail takes
    them as its first inputs. ``single=True`` refuses a cut crossed by several values."""
    nodes = list(traced.graph.nodes)
    first = next(i for i, n in enumerate(nodes) if n.op != "output" and in_module(traced.qualnames.get(n), split))
    head, rest = nodes[:first], set(nodes[first:])
    in_head = set(head)
    # Parameter reads (get_attr) belong wherever they are used. Model inputs the tail reads (e.g. timm ViT's
    # `attn_mask`) become extra inputs of the tail; every other value the tail reads crosses the cut.
    crossing = [n for n in head if n.op not in ("get_attr", "placeholder") and any(u in rest for u in n.users)]
    tail_inputs = [n for n in head if n.op == "placeholder" and any(u in rest for u in n.users)]
    if not crossing:
        raise SplitError(
            f"split={split!r} leaves no trunk: it is the first operation of the model. Split later, e.g. at the "
            "start of the last stage (the default)"
        )
    if single and len(crossing) > 1:
        names = ", ".join(f"{n.name} (from '{traced.qualnames.get(n, '?')}')" for n in crossing)
        raise SplitError(f"split={split!r} is crossed by {len(crossing)} values ({names}); one is needed here")

    # Trunk: the input placeholders and every ancestor of the crossing values.
    needed: set[fx.Node] = set()
    stack = list(crossing)
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    trunk = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in head:
        if n.op == "placeholder" or n in needed:
            env[n] = trunk.node_copy(n, env.__getitem__)
    trunk.output(env[crossing[0]] if len(crossing) == 1 else tuple(env[n] for n in crossing))

    tail = fx.Graph()
    names = ["trunk_out"] if len(crossing) == 1 else [f"trunk_out_{i}" for i in range(len(crossing))]
    tenv: dict[fx.Node, fx.Node] = {n: tail.placeholder(name) for n, name in zip(crossing, names)}
    for n in tail_inputs:
        tenv[n] = tail.node_copy(n)

    def lookup(n: fx.Node) -> fx.Node:
        if n not in tenv:
            if n.op != "get_attr" or n not in in_head:  # pragma: no cover - every other value crosses the cut
                raise SplitError(f"internal: node {n.name} crosses the cut")
            tenv[n] = tail.node_copy(n, lookup)
        return tenv[n]

    for n in nodes[first:]:
        tenv[n] = tail.node_copy(n, lookup)
    trunk.lint()
    tail.lint()
    return Cut(trunk, tail, crossing, [n.name for n in tail_inputs])


class Piece(DualGraphModule):
    """A trunk or tail: torchvision's ``DualGraphModule`` (one graph per mode) whose deep copy keeps every
    submodule's train/eval mode; ``GraphModule.__deepcopy__`` re-runs ``__init__``, which leaves training mode on."""

    def __deepcopy__(self, memo: dict[int, Any]) -> "Piece":
        res = super().__deepcopy__(memo)
        res.train(self.training)  # picks the graph of the mode
        for mine, theirs in zip(self.modules(), res.modules()):
            theirs.training = mine.training
        return res


def shared_parameters(trunk: nn.Module, tail: nn.Module) -> dict[str, str]:
    """The parameters the trunk uses too: the tail's name -> the trunk's name."""
    trunk_names = {id(p): n for n, p in trunk.named_parameters()}
    return {n: trunk_names[id(p)] for n, p in tail.named_parameters() if id(p) in trunk_names}


def parameters_read(net: nn.Module, node: fx.Node) -> set[int]:
    """The parameters a node reads: its module's, or those of the parameter reads (get_attr) among its inputs."""
    if node.op == "call_module":
        return {id(p) for p in net.get_submodule(node.target).parameters()}
    found = set()
    for a in node.all_input_nodes:
        if a.op == "get_attr":
            value = functools.reduce(getattr, a.target.split("."), net)
            if isinstance(value, nn.Parameter):
                found.add(id(value))
    return found


@dataclass
class ParameterUse:
    """Where in the graph (node indices) each parameter is read first and last."""

    spans: list[tuple[int, int]]

    @classmethod
    def of(cls, net: nn.Module, traced: Traced) -> "ParameterUse":
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for i, node in enumerate(traced.graph.nodes):
            for p in parameters_read(net, node):
                first.setdefault(p, i)
                last[p] = i
        return cls([(first[p], last[p]) for p in first])

    def tail_learns(self, i: int) -> bool:
        """A cut at node ``i`` leaves parameters after it."""
        return any(end >= i for _, end in self.spans)

    def unties(self, i: int) -> bool:
        """A cut at node ``i`` falls between two reads of one parameter, which replication would untie."""
        return any(start < i <= end for start, end in self.spans)


def tail_names_of_shared(net: nn.Module, traced: Traced, i: int) -> list[str]:
    """The modules, named as the tail of a cut at node ``i`` names them, whose parameters are read on both sides
    of the cut: what :func:`shared_parameters` finds between the two pieces, without building them."""
    nodes = list(traced.graph.nodes)
    before = set().union(*(parameters_read(net, n) for n in nodes[:i]))
    names: dict[int, str] = {}
    for node in nodes[i:]:
        if node.op == "call_module":
            for local, p in net.get_submodule(node.target).named_parameters():
                names.setdefault(id(p), f"{node.target}.{local}")
        for a in node.all_input_nodes:
            if a.op == "get_attr":
                value = functools.reduce(getattr, a.target.split("."), net)
                if isinstance(value, nn.Parameter):
                    names.setdefault(id(value), a.target)
    return sorted({name.rsplit(".", 1)[0] for p, name in names.items() if p in before})


def check_no_shared_parameters(trunk: nn.Module, tail: nn.Module, split: str) -> None:
    shared = [f"{n} (trunk: {t})" for n, t in shared_parameters(trunk, tail).items()]
    if shared:
        raise SplitError(
            f"split={split!r}: parameters are used both before and after the split ({', '.join(shared[:5])}); "
            "replicating the tail would untie them. Choose a split after the last use of the shared weights"
        )
