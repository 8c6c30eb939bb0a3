"""Tracing with concrete values beside the proxies, for models plain torch.fx cannot trace.

Plain fx fails on code that asks a traced value a question: ``if x.shape[1] != self.num_patches``, ``int(n ** 0.5)``,
``len(x.shape)``, a root ``forward(self, *args, **kwargs)`` under a decorator (Hugging Face transformers, whose own fx
tracer is gone from transformers 5). This tracer runs every traced operation on an example input as it records it,
on the meta device (shapes, no data; transformers' former ``HFTracer`` did the same), so such questions get the
example's answer: shapes stay symbolic in the graph wherever the code keeps them as tensors' sizes, and only
branches taken on them are fixed to the example's path. Questions on a tensor's data stay errors.
:func:`check_batch_free` then runs the graph on a batch of another size against the model itself, so a batch size
frozen into the graph is an error at wrap time, not at the first step.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _maybe_revert_all_patches
from torch.fx.experimental.meta_tracer import gen_constructor_wrapper
from torch.fx.proxy import Attribute

from ..errors import TraceError
from .inputs import trial_mode

__all__ = ["ConcreteTracerMixin", "plain_fx_can_take_inputs", "first_input_forward", "check_batch_free"]

_MISSING = object()
_CONSTRUCTORS = ("arange", "zeros", "ones", "full", "empty", "eye", "rand", "randn", "randint", "linspace")


# What a value may be read off without reading a tensor's data: questions on these (and on Python arithmetic over
# them) are answered with the example's value; a question on data (``if x.sum() > 0``) stays a TraceError, since
# fixing it to the example's answer would make a graph that is wrong on other inputs.
_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "is_sparse", "is_quantized"}
_METADATA_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "get_device", "is_floating_point",
                     "is_complex", "element_size", "is_contiguous"}


class _ConcreteProxy(fx.Proxy):
    """A proxy that answers Python's questions (truth, length, int) about shapes with the example input's values."""

    def __bool__(self) -> bool:
        return bool(self.tracer.shape_value_of(self))

    def __len__(self) -> int:
        return len(self.tracer.value_of(self))  # a length is a shape, even of a tensor

    def __int__(self) -> int:
        return int(self.tracer.shape_value_of(self))

    def __index__(self) -> int:
        return int(self.tracer.shape_value_of(self))

    def __float__(self) -> float:
        return float(self.tracer.shape_value_of(self))

    def __getattr__(self, k: str) -> "_ConcreteAttribute":
        return _ConcreteAttribute(self, k)


class _ConcreteAttribute(Attribute, _ConcreteProxy):
    """``proxy.shape`` and the like: fx's lazy attribute, answering as the proxies above."""


class ConcreteTracerMixin:
    """Mixed in before an ``fx.Tracer``: records each node's value while tracing, on the meta device (shapes, no
    data: holding every value of a trace costs no memory, and questions on data cannot be answered). The traced
    forward is :func:`first_input_forward`'s stand-in; its input is ``example``."""

    device = torch.device("meta")

    def __init__(self, example: torch.Tensor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.example = example
        self.values: dict[fx.Node, Any] = {}
        self.errors: dict[fx.Node, Exception] = {}
        self.data: set[fx.Node] = set()  # nodes whose values derive from tensor data, not only from shapes

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        # Sizes are proxies here, and torch's constructors do not dispatch on proxies given as sizes
        # (``torch.ones(b, n)``): record them as graph calls, as fx's MetaTracer does.
        patched = {name: gen_constructor_wrapper(getattr(torch, name)) for name in _CONSTRUCTORS}
        for name, (wrapper, _) in patched.items():
            setattr(torch, name, wrapper)
        try:
            return super().trace(root, concrete_args)
        finally:
            for name, (_, original) in patched.items():
                setattr(torch, name, original)

    def create_args_for_root(self, root_fn: Callable, is_module: bool, concrete_args: Any = None) -> Any:
        stand_in = first_input_forward(self.root) if is_module else root_fn
        return super().create_args_for_root(stand_in, is_module, concrete_args)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def value_of(self, proxy: fx.Proxy) -> Any:
        value = self.values.get(proxy.node, _MISSING)
        if value is _MISSING:
            cause = self._first_error(proxy.node)
            raise fx.proxy.TraceError(
                f"the forward asks a question of {proxy.node.format_node()}, whose value on the example input "
                f"could not be computed{cause}"
            )
        return value

    def _first_error(self, node: fx.Node) -> str:
        """Why a value is missing: the error of the earliest node upstream whose own evaluation failed."""
        stack, seen, found = [node], set(), None
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in self.errors and not isinstance(self.errors[n], LookupError):
                found = n if found is None or _before(n, found) else found
            stack.extend(a for a in n.all_input_nodes if a not in self.values)
        if found is None:
            return ""
        err = self.errors[found]
        return f" ({found.format_node()} failed: {type(err).__name__}: {str(err)[:200]})"

    def shape_value_of(self, proxy: fx.Proxy) -> Any:
        """The value of a question on shapes; a TraceError for one on a tensor's data."""
        if proxy.node in self.data:
            raise fx.proxy.TraceError(
                f"the forward branches on the values in a tensor ({proxy.node.format_node()}): data-dependent "
                "control flow, which a graph cannot hold"
            )
        return self.value_of(proxy)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.shape_value_of(obj))

    def iter(self, obj: fx.Proxy) -> Any:
        return iter([obj[i] for i in range(len(self.value_of(obj)))])

    def keys(self, obj: fx.Proxy) -> Any:
        return self.value_of(obj).keys()

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **kw: Any) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **kw)
        try:
            value = self._evaluate(kind, target, args, kwargs)
        except Exception as err:  # a value only matters if the forward later asks about it: value_of says so then
            value, self.errors[proxy.node] = _MISSING, err
        if value is not _MISSING:
            self.values[proxy.node] = value
        if isinstance(value, torch.Tensor) or self._reads_data(kind, target, args, kwargs):
            self.data.add(proxy.node)
        return proxy

    def _reads_data(self, kind: str, target: Any, args: Any, kwargs: Any) -> bool:
        if kind in ("placeholder", "get_attr", "call_module"):
            return True
        if kind == "call_function" and target is getattr and args[1] in _METADATA_ATTRIBUTES:
            return False
        if kind == "call_method" and target in _METADATA_METHODS:
            return False
        found: list[fx.Node] = []
        fx.node.map_aggregate((args, kwargs), lambda a: found.append(a.node) if isinstance(a, fx.Proxy) else None)
        return any(n in self.data or isinstance(self.values.get(n), torch.Tensor) for n in found)

    def _evaluate(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        def value(a: Any) -> Any:
            if isinstance(a, fx.Proxy):
                v = self.values.get(a.node, _MISSING)
                if v is _MISSING:
                    raise LookupError(a.node.name)
                return v
            return a

        args, kwargs = fx.node.map_aggregate(args, value), fx.node.map_aggregate(kwargs, value)
        if kind == "placeholder":  # the stand-in forward's one input
            return self.example.to(self.device)
        # fx's patches (module attribute reads and calls made into graph nodes) must not see the real run.
        with _maybe_revert_all_patches(), torch.no_grad():
            # Parameters and buffers as meta tensors too: some kernels refuse a meta input with a CPU weight, and
            # a leaf module's in-place updates (BatchNorm statistics) then touch copies.
            if kind == "get_attr":
                value = functools.reduce(getattr, target.split("."), self.root)
                return value.to(self.device) if isinstance(value, torch.Tensor) else value
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            if kind == "call_module":
                module = self.root.get_submodule(target)
                tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
                tensors = {k: v.to(self.device) for k, v in tensors.items()}
                return torch.func.functional_call(module, tensors, tuple(args), kwargs)
        return _MISSING


def _before(a: fx.Node, b: fx.Node) -> bool:
    """Whether node ``a`` comes before ``b`` in their graph."""
    for n in a.graph.nodes:
        if n is a or n is b:
            return n is a
    return False


def plain_fx_can_take_inputs(net: nn.Module) -> bool:
    """Whether fx can make placeholders of the forward's inputs: not if the forward (under its decorators) takes
    ``*args`` or ``**kwargs`` (every Hugging Face model)."""
    forward = type(net).forward
    params = list(inspect.signature(inspect.unwrap(forward)).parameters.values())[1:]
    varargs = {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}
    return forward is inspect.unwrap(forward) and not {p.kind for p in params} & varargs


def first_input_forward(net: nn.Module) -> Callable:
    """A stand-in for ``type(net).forward`` taking only its first input: the others keep their defaults (a Hugging
    Face classifier's labels, masks and flags; optional masks the forward tests with ``is None``, which a proxy
    would answer wrongly)."""
    forward = type(net).forward
    params = list(inspect.signature(inspect.unwrap(forward)).parameters.values())[1:]
    first = next((p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)), "x")
    namespace: dict[str, Any] = {"forward_": forward}
    # The stand-in's argument carries the real input's name, which becomes the graph's placeholder name.
    exec(f"def forward(self, {first}):\n    return forward_(self, {first})\n", namespace)
    return namespace["forward"]


def check_batch_free(graph_module: nn.Module, net: nn.Module, example: torch.Tensor, output: Any) -> None:
    """Run the eval graph and the model on a batch of another size than the traced one: a batch size frozen into
    the graph (``torch.zeros(int(x.shape[0]), ...)``) fails here, with the fix."""
    x = example[:1] if example.shape[0] > 1 else torch.cat([example, example])
    with trial_mode(net):
        want = net(x)
        try:
            got = graph_module(x)
        except Exception as err:  # the frozen size no longer fits: reported below with the fix
            got = err
    want = _select(want, output)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or not torch.allclose(got, want, atol=1e-4,
                                                                                            rtol=1e-3):
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else f"{type(got).__name__}: {str(got)[:200]}"
        raise TraceError(
            f"the graph of {type(net).__name__} traced on a batch of {example.shape[0]} does not reproduce the model "
            f"on a batch of {x.shape[0]} (got {shape}, expected {tuple(want.shape)}): the forward turns a traced "
            "size into a Python number (int(x.shape[0]), a size passed to a tensor constructor). Keep sizes as the "
            "tensor's own (x.shape[0], x.new_zeros(...)), or use OSAKD (kdwrap.osakd), which needs no tracing"
        )


def _select(out: Any, output: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor) or output is None:
        return out if isinstance(out, torch.Tensor) else out[0]
    return out[output]
