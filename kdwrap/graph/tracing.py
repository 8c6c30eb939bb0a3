"""Tracing a model into an fx graph whose nodes know the module they came from.

The model is traced in one mode at a time (the split traces train and eval, as torchvision's
``create_feature_extractor`` does) because tracing bakes Python-level ``if self.training`` branches (stochastic depth,
dropout written as functions) into the graph. Every node is tagged with the module path it came from (torchvision's
``NodePathTracer``). Plain symbolic tracing first; tracing with values (:mod:`.concrete_tracer`) where it fails.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn
from torchvision.models.feature_extraction import NodePathTracer

from ..errors import TraceError
from .concrete_tracer import ConcreteTracerMixin, plain_fx_can_take_inputs
from .inputs import example_input

__all__ = ["Traced", "trace", "in_module", "module_order"]


def _timm_tracer_kwargs() -> dict[str, list]:
    """timm registers modules and functions that fx must not trace into; honour them when timm is installed."""
    try:
        from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover - timm is a dependency, but keep tracing usable without it
        return {"leaf_modules": [], "autowrap_functions": []}
    return {"leaf_modules": list(get_notrace_modules()), "autowrap_functions": list(get_notrace_functions())}


class _Tracer(NodePathTracer):
    """torchvision's NodePathTracer that also remembers the innermost module a tracing error came from."""

    failed_in: str | None = None
    # Buffers read in forward (torchvision's FrozenBatchNorm2d statistics) must stay get_attr nodes; otherwise
    # fx runs the ops on them at trace time and bakes the results in as constants that load_state_dict misses.
    proxy_buffer_attributes = True

    def call_module(self, m: nn.Module, forward: Callable, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def _optional_inputs_branched_on(graph: fx.Graph) -> list[str]:
    """Inputs that default to None and that the traced graph uses as tensors (``mask.view(...)``): the forward
    branched on ``if mask is not None``, which fx cannot see (a proxy is never None) and traced the wrong way (timm
    Hiera). They are traced again as the constant None; inputs only passed along (timm ViT's ``attn_mask``) stay."""
    names = []
    for n in graph.nodes:
        if n.op == "placeholder" and n.args and n.args[0] is None:
            if any(u.op == "call_method" or (u.op == "call_function" and u.target is getattr) for u in n.users):
                names.append(n.target)
    return names


@dataclass
class Traced:
    """A traced graph and, for each node, the path of the module it came from."""

    graph: fx.Graph
    qualnames: dict[fx.Node, str]
    # The input the graph was traced with concrete values on (None: plain symbolic tracing); branches the forward
    # took on shapes follow that input's.
    example: torch.Tensor | None = None


class _ConcreteTracer(ConcreteTracerMixin, _Tracer):
    """kdwrap's tracer with values (:mod:`.concrete_tracer`): node paths, buffers as graph reads."""


def _trace_with(make_tracer: Callable[[], _Tracer], net: nn.Module) -> tuple[fx.Graph, _Tracer]:
    tracer = make_tracer()
    try:
        graph = tracer.trace(net)
        branched = _optional_inputs_branched_on(graph)
        if branched:
            tracer = make_tracer()
            graph = tracer.trace(net, concrete_args={name: None for name in branched})
    except Exception as err:
        err.failed_in = tracer.failed_in  # type: ignore[attr-defined]
        raise
    return graph, tracer


def trace(
    net: nn.Module,
    training: bool,
    leaf_modules: Sequence[type] = (),
    autowrap_functions: Sequence[Callable] = (),
    input_size: Sequence[int] | None = None,
) -> Traced:
    """Trace ``net`` in the given mode, tagging each node with the module path it belongs to.

    Plain symbolic tracing first; where it fails, or the forward takes ``*args``/``**kwargs`` (Hugging Face models),
    tracing with concrete values on an example input (:mod:`.concrete_tracer`) at ``input_size`` or the
    model's own declared size."""
    kwargs = _timm_tracer_kwargs()
    options = dict(leaf_modules=kwargs["leaf_modules"] + list(leaf_modules),
                   autowrap_functions=kwargs["autowrap_functions"] + list(autowrap_functions))
    was_training = net.training
    net.train(training)
    # A forward may store what it computes on its modules (HF Swin: self.window_size = min(height, width)); under
    # tracing that is a proxy, which must not outlive the trace in the user's model.
    attributes = [(m, dict(vars(m))) for m in net.modules()]
    plain_err: Exception | None = None
    example: torch.Tensor | None = None
    try:
        if plain_fx_can_take_inputs(net):
            try:
                graph, tracer = _trace_with(lambda: _Tracer(**options), net)
                return Traced(graph, dict(tracer.node_to_qualname))
            except Exception as err:  # fx raises many types (TraceError, TypeError, RuntimeError, ...)
                plain_err = err
        example = example_input(net, input_size, batch=2)
        # Values run on meta copies of the parameters and buffers (BatchNorm statistics stay as they are); random
        # ops on them must still not advance the user's generator.
        with torch.random.fork_rng(devices=[]):
            graph, tracer = _trace_with(lambda: _ConcreteTracer(example, **options), net)
        return Traced(graph, dict(tracer.node_to_qualname), example)
    except Exception as err:
        first = plain_err or err
        where = getattr(first, "failed_in", None) or f"the forward of {type(net).__name__} itself"
        at = tuple(example.shape) if example is not None else "guessed"
        also = (f"; tracing with values on a {at} example failed too ({type(err).__name__}: "
                f"{str(err)[:300]})") if plain_err is not None and err is not plain_err else ""
        raise TraceError(
            f"torch.fx cannot trace {type(net).__name__}: the failure is in module '{where}' "
            f"({type(first).__name__}: {str(first)[:500]}){also}. kdwrap's ONE needs an fx-traceable model. Fixes: "
            "pass leaf_modules=[TheModuleClass] so fx runs that module as a black box (it must lie wholly in the "
            "trunk or wholly in the tail), or autowrap_functions=[fn] for a free function with data-dependent "
            "control flow, or rewrite the offending control flow (see torch.fx's 'Limitations of Symbolic "
            "Tracing'); if the model's input is not an image of its declared size, pass input_size=(C, H, W). "
            "OSAKD (kdwrap.osakd) needs no tracing."
        ) from first
    finally:
        for m, saved in attributes:  # new attributes stay (fx's tensor constants), unless they hold a proxy
            added = {k: v for k, v in vars(m).items() if k not in saved and not isinstance(v, fx.Proxy)}
            vars(m).clear()
            vars(m).update(saved, **added)
        net.train(was_training)


def in_module(qualname: str | None, module: str) -> bool:
    """Whether a node of module path ``qualname`` lies inside module ``module``."""
    return qualname is not None and (qualname == module or qualname.startswith(module + "."))


def module_order(traced: Traced) -> dict[str, int]:
    """Map every module path that owns at least one node to the index of its first node (execution order)."""
    first: dict[str, int] = {}
    for i, node in enumerate(traced.graph.nodes):
        q = traced.qualnames.get(node)
        if not q or node.op in ("placeholder", "output"):
            continue
        parts = q.split(".")
        for j in range(1, len(parts) + 1):
            first.setdefault(".".join(parts[:j]), i)
    return first
