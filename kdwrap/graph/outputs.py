"""What a traced graph returns, and reading it besides that: the logits among the outputs (``output=``), the input of
the classifier (OKDDip attends over its branches' classifier inputs) and the values at stage boundaries, returned as
extra outputs of the graph (BYOT attaches its exits there).
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import fx, nn

from ..errors import SplitError
from .cut import Piece, cut_graph, parameters_read
from .tracing import Traced

__all__ = [
    "select_output", "classifier_name", "found_classifier", "classifier_input", "graph_with_outputs",
    "with_classifier_input", "stage_input", "stage_end",
]


def _describe(value: Any) -> tuple[str, dict[Any, Any] | None]:
    """What a traced forward returns: (kind, {index or key: value}) for a container, (kind, None) for one value."""
    if isinstance(value, fx.Node) and value.op == "call_function" and hasattr(value.target, "_fields"):
        fields = value.target._fields  # a namedtuple built in forward (torchvision GoogLeNet/Inception outputs)
        items = dict(zip(fields, value.args))
        items.update(value.kwargs)
        return f"namedtuple {value.target.__name__}", {**dict(enumerate(items[f] for f in fields)), **items}
    if isinstance(value, (tuple, list)):
        return type(value).__name__, dict(enumerate(value))
    if isinstance(value, dict):
        return "dict", dict(value)
    return "tensor", None


def select_output(traced: Traced, net: nn.Module, output: int | str | None, training: bool) -> None:
    """Make the traced graph return only the logits: ``output`` names them (index, key or field) when the model
    returns a tuple, dict or namedtuple. Fails if that leaves a module with parameters unused (an auxiliary head
    ONE would silently stop training)."""
    out_node = next(n for n in traced.graph.nodes if n.op == "output")
    kind, items = _describe(out_node.args[0])
    if items is None:
        return  # one value (in this mode, e.g. GoogLeNet in eval): it is the logits
    mode = "training" if training else "eval"
    if output is None:
        raise SplitError(
            f"{type(net).__name__} returns a {kind} in {mode} mode, not a logits tensor; name the logits with "
            f"output=<index or key> (valid: {', '.join(map(repr, items))}), e.g. kdwrap.one(net, output="
            f"{next(iter(items))!r})"
        )
    if output not in items or not isinstance(items[output], fx.Node):
        raise SplitError(
            f"output={output!r} does not name a tensor in the {kind} that {type(net).__name__} returns in {mode} "
            f"mode; valid: {', '.join(repr(k) for k, v in items.items() if isinstance(v, fx.Node))}"
        )
    used = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    out_node.args = (items[output],)
    for node in reversed(list(traced.graph.nodes)):  # fx's eliminate_dead_code needs an owning module
        if node.op not in ("placeholder", "output") and not node.users:
            traced.graph.erase_node(node)
    dropped = sorted(
        t for t in used - {n.target for n in traced.graph.nodes if n.op == "call_module"}
        if any(True for _ in net.get_submodule(t).parameters(recurse=False))
    )
    if dropped:
        raise SplitError(
            f"output={output!r} drops the other outputs of {type(net).__name__} in {mode} mode, and with them the "
            f"modules {', '.join(dropped[:8])}{' ...' if len(dropped) > 8 else ''}, whose parameters would no "
            "longer be trained. ONE does not replicate auxiliary heads: build the model without them (torchvision: "
            "aux_logits=False), or use kdwrap.osakd(net, output=...), which keeps the model as it is"
        )


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
        if node.op != "output" and parameters_read(root, node):
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


def with_classifier_input(piece: Piece, classifier: str) -> Piece:
    """``piece`` (same submodules, so the same tensors and ``state_dict`` keys) returning ``(logits, h)``, ``h``
    the input of module ``classifier``."""
    graphs = [graph_with_outputs(g, [classifier_input(g, classifier)]) for g in (piece.train_graph, piece.eval_graph)]
    out = Piece(piece, *graphs, class_name="Branch")
    out.train(piece.training)
    return out


def stage_input(traced: Traced, start: str) -> fx.Node:
    """The value that enters module ``start``: the end of the stage before it (the one value crossing a cut
    there)."""
    return cut_graph(traced, start, single=True).cut


def stage_end(traced: Traced, stage: str) -> fx.Node:
    """The last node computed inside module ``stage``: its output."""
    inside = [n for n in traced.graph.nodes
              if (q := traced.qualnames.get(n)) and (q == stage or q.startswith(stage + ".")) and n.op != "output"]
    if not inside:
        raise SplitError(f"module {stage!r} computes nothing in the traced graph")
    return inside[-1]
