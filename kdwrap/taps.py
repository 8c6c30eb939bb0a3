"""Reading a traced network besides its output: the input of its classifier and the ends of its stages, returned as
extra outputs of the fx graph (OKDDip attends over the classifier inputs of its branches; BYOT attaches exits at the
stage ends). The stage rule is :func:`kdwrap.surgery.auto_split`'s walk, kept to the end: where ``auto_split`` takes
the start of the last stage, :func:`stage_starts` takes the start of every stage after the first.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import fx, nn

from .errors import SplitError
from .probe import example_input, trial_mode
from .surgery import _cut_graph, _downsamples, _module_paths_with_nodes, _parameters_read, _Traced

__all__ = [
    "classifier_name", "found_classifier", "classifier_input", "graph_with_outputs", "stage_starts", "stage_input", "stage_end",
    "graph_stage_starts",
]

# A node downsamples when its output map has at most this share of the positions of its largest input map: a 2x2
# pooling or a stride-2 convolution (0.25), not a valid 5x5 convolution (32x32 -> 28x28 keeps 0.77).
_DOWNSAMPLED_SHARE = 0.5
# The ops that can downsample a map: convolutions and poolings, as modules or as functions (``F.max_pool2d``,
# ``torch.conv2d``). Reshapes (attention heads, patch flattening) change shapes without downsampling.
_DOWNSAMPLING_MODULES = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                         nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
_DOWNSAMPLING_NAMES = ("pool", "conv")


def _calls(graph: fx.Graph, name: str) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_module" and n.target == name]


def classifier_name(root: nn.Module, graphs: Sequence[fx.Graph], name: str | None, method: str) -> str:
    """The module whose input is the network's feature vector: ``name`` if given, else the last ``nn.Linear`` the
    graph calls. It must be called exactly once per forward in every graph."""
    if name is None:
        linears = [n.target for n in graphs[-1].nodes
                   if n.op == "call_module" and isinstance(root.get_submodule(n.target), nn.Linear)]
        if not linears:
            raise SplitError(
                f"kdwrap {method} reads the input of the network's classifier, found as the last nn.Linear it calls, "
                "and this network (or its replicated tail) calls none; name the classifier with classifier=<module "
                "name> (a module whose input is one feature vector per sample)"
            )
        name = linears[-1]
    calls = max(len(_calls(g, name)) for g in graphs)
    if calls != 1:
        raise SplitError(
            f"kdwrap {method}: classifier={name!r} is called {calls} times per forward; it must be called exactly "
            "once (its input is the feature vector read). Name another module with classifier=<module name>"
        )
    return name


def found_classifier(root: nn.Module, graphs: Sequence[fx.Graph]) -> tuple[str | None, str]:
    """``(name, "")``: the network's classifier, an ``nn.Linear`` whose input is one feature vector per sample (or
    per token); or ``(None, why)`` where there is none to identify. The classifier is the last ``nn.Linear`` the
    graph calls, if it is called once per forward in every graph and nothing with parameters acts on its output on
    the way to the logits (else it is a layer inside the network, and a convolution or another module makes the
    logits)."""
    linears = [n for n in graphs[-1].nodes
               if n.op == "call_module" and isinstance(root.get_submodule(n.target), nn.Linear)]
    if not linears:
        return None, "it calls no nn.Linear: a convolution or another module makes the logits"
    name = linears[-1].target
    calls = max(len(_calls(g, name)) for g in graphs)
    if calls != 1:
        return None, f"its last nn.Linear '{name}' is called {calls} times per forward"
    seen, todo = set(), list(linears[-1].users)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op != "output" and _parameters_read(root, node):
            what = node.target if node.op == "call_module" else node.name
            return None, f"its last nn.Linear '{name}' is followed by '{what}', which has weights of its own"
        todo.extend(node.users)
    return name, ""


def classifier_input(graph: fx.Graph, name: str) -> fx.Node:
    """The node whose value goes into module ``name`` (called once in ``graph``)."""
    return _calls(graph, name)[0].args[0]


def graph_with_outputs(graph: fx.Graph, extra: Sequence[fx.Node]) -> fx.Graph:
    """A copy of ``graph`` that returns ``(its output, *extra)`` (nodes of ``graph``)."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, env)
    new.output((out, *[env[n] for n in extra]))
    new.lint()
    return new


def _is_stage(module: nn.Module) -> bool:
    """A stage holds layers: a module with children and parameters (not a bare convolution or pooling)."""
    return any(True for _ in module.children()) and any(True for _ in module.parameters())


def stage_starts(
    net: nn.Module, traced: _Traced, exits: int | None = None, input_size: Sequence[int] | None = None
) -> list[str]:
    """The modules that start the network's stages after the first (their input is the end of a stage).

    Conv networks: the walk of :func:`kdwrap.surgery.auto_split` down the containers; in the container where the
    last stage was found, every downsampling child that is a stage (has children and parameters) and is not the
    network's first module (ResNet: ``layer2``, ``layer3``, ``layer4``; ConvNeXt: ``stages.1``..``stages.3``).
    Networks that downsample once (ViT): the block stack's quarters (``blocks.3``, ``blocks.6``, ``blocks.9`` of 12).
    Networks whose downsampling is not in modules (``F.max_pool2d`` in ``forward``): :func:`graph_stage_starts`.
    ``exits`` keeps the last ``exits`` of them (the deepest).
    """
    order = _module_paths_with_nodes(traced)
    first = min(order.values(), default=0)

    def children(path: str) -> list[str]:
        mod = net.get_submodule(path) if path else net
        names = [f"{path}.{n}" if path else n for n, _ in mod.named_children()]
        return sorted((n for n in names if n in order), key=order.__getitem__)

    def walk(path: str) -> list[str] | None:
        if path and not isinstance(net.get_submodule(path), (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return None
        downs = [c for c in children(path) if _downsamples(net.get_submodule(c))]
        if not downs:
            return None
        if len(downs) == 1:
            return walk(downs[0])
        return walk(downs[-1]) or downs

    starts = [s for s in walk("") or [] if _is_stage(net.get_submodule(s)) and order[s] > first]
    if not starts:
        best: tuple[int, str] | None = None
        for path, mod in net.named_modules():
            if path in order and isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod) >= 4:
                if len({type(c) for c in mod}) == 1 and (best is None or len(mod) > best[0]):
                    best = (len(mod), path)
        if best is not None:
            n, path = best
            names = [name for name, _ in net.get_submodule(path).named_children()]
            starts = [f"{path}.{names[n * q // 4]}" for q in (1, 2, 3)]
    if not starts:
        starts = graph_stage_starts(net, traced, input_size)[1:]
    if not starts:
        raise SplitError(
            f"kdwrap could not find the stages of {type(net).__name__} (no container of downsampling stages, no "
            "stack of 4 or more identical blocks); name the modules that start a stage with stages=[...]"
        )
    return starts if exits is None else starts[-exits:]


def stage_input(traced: _Traced, start: str) -> fx.Node:
    """The value that enters module ``start``: the end of the stage before it (the one value crossing a cut
    there)."""
    return _cut_graph(traced, start, single=True).cut


def stage_end(traced: _Traced, stage: str) -> fx.Node:
    """The last node computed inside module ``stage``: its output."""
    inside = [n for n in traced.graph.nodes
              if (q := traced.qualnames.get(n)) and (q == stage or q.startswith(stage + ".")) and n.op != "output"]
    if not inside:
        raise SplitError(f"module {stage!r} computes nothing in the traced graph")
    return inside[-1]


class _Shapes(fx.Interpreter):
    """Runs the graph, keeping each tensor-valued node's shape (keyed by the traced graph's nodes)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
        return out


def _positions(shape: Sequence[int]) -> int | None:
    return int(torch.Size(shape[2:]).numel()) if len(shape) == 4 else None


def graph_stage_starts(net: nn.Module, traced: _Traced, input_size: Sequence[int] | None = None) -> list[str]:
    """The resolution stages read from the graph itself, for networks whose downsampling is not a module (a
    hand-written LeNet's ``F.max_pool2d``): a trial forward gives every value's shape; a node whose output map keeps
    at most half the positions of its input map, through a convolution or a pooling, downsamples; each stage starts at the last module called once,
    with a valid cut at its start (one value crossing), between the previous downsampling node and its own. Returns
    every stage's start in order, the first stage's included (it may be the network's first module); ``[]`` when
    the network has no map that shrinks or the trial forward fails (pass ``input_size``)."""
    shapes = _Shapes(fx.GraphModule(net, traced.graph))
    try:
        with trial_mode(net):
            shapes.run(example_input(net, input_size))
    except Exception:  # no shapes, no rule: the caller's error asks for a split or an input size
        return []
    nodes = list(traced.graph.nodes)

    def shape(n: fx.Node) -> Sequence[int]:
        return shapes.shapes.get(n, ())

    def may_downsample(n: fx.Node) -> bool:
        if n.op == "call_module":
            return isinstance(net.get_submodule(n.target), _DOWNSAMPLING_MODULES)
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        return n.op in ("call_function", "call_method") and any(k in name for k in _DOWNSAMPLING_NAMES)

    downs = []
    for i, n in enumerate(nodes):
        if not may_downsample(n):
            continue
        out = _positions(shape(n))
        ins = [p for a in n.all_input_nodes if (p := _positions(shape(a)))]
        if out and ins and out <= _DOWNSAMPLED_SHARE * max(ins):
            downs.append(i)
    starts: dict[int, str] = {}  # index of a module's first node -> its name, for modules called once
    counts: dict[str, int] = {}
    for i, n in enumerate(nodes):
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
            starts.setdefault(i, n.target)
    result, previous = [], -1
    for d in downs:
        for i in sorted((i for i in starts if previous < i <= d), reverse=True):
            name = starts[i]
            if counts[name] != 1 or name in result:
                continue
            try:
                _cut_graph(traced, name, single=True)
            except SplitError:
                if i == min(starts):
                    result.append(name)  # the first module: a stage start with no trunk before it
                    break
                continue
            result.append(name)
            break
        previous = d
    return result
