"""torch.fx surgery: cut a model at a named module into a shared trunk and a tail that can be replicated.

The model is traced twice (train and eval mode, as torchvision's ``create_feature_extractor`` does) because tracing
bakes Python-level ``if self.training`` branches (stochastic depth, dropout written as functions) into the graph.
Every node is tagged with the module path it came from (torchvision's ``NodePathTracer``); the tail starts at the
first node of the split module. Trunk and tail are torchvision ``DualGraphModule``\\ s whose parameters are the
original model's own tensors and whose ``state_dict`` keys are the original model's keys.
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx, nn
from torchvision.models.feature_extraction import DualGraphModule, NodePathTracer

from .concrete_trace import ConcreteTracerMixin, check_batch_free, plain_fx_can_take_inputs
from .errors import SplitError, TraceError
from .probe import _main_value, _run_trunk, _trunk_channels, example_input

__all__ = [
    "SplitError", "TraceError", "SplitResult", "trace", "select_output", "auto_split", "split_model", "example_input",
]


def _timm_tracer_kwargs() -> dict[str, list]:
    """timm registers modules and functions that fx must not trace into; honour them when timm is installed."""
    try:
        from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover - timm is a dependency, but keep surgery usable without it
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
class _Traced:
    graph: fx.Graph
    qualnames: dict[fx.Node, str]
    # The input the graph was traced with concrete values on (None: plain symbolic tracing); branches the forward
    # took on shapes follow that input's.
    example: torch.Tensor | None = None


class _ConcreteTracer(ConcreteTracerMixin, _Tracer):
    """kdwrap's tracer with values (:mod:`kdwrap.concrete_trace`): node paths, buffers as graph reads."""


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
) -> _Traced:
    """Trace ``net`` in the given mode, tagging each node with the module path it belongs to.

    Plain symbolic tracing first; where it fails, or the forward takes ``*args``/``**kwargs`` (Hugging Face models),
    tracing with concrete values on an example input (:mod:`kdwrap.concrete_trace`) at ``input_size`` or the
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
                return _Traced(graph, dict(tracer.node_to_qualname))
            except Exception as err:  # fx raises many types (TraceError, TypeError, RuntimeError, ...)
                plain_err = err
        example = example_input(net, input_size, batch=2)
        # Values run on meta copies of the parameters and buffers (BatchNorm statistics stay as they are); random
        # ops on them must still not advance the user's generator.
        with torch.random.fork_rng(devices=[]):
            graph, tracer = _trace_with(lambda: _ConcreteTracer(example, **options), net)
        return _Traced(graph, dict(tracer.node_to_qualname), example)
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


def select_output(traced: _Traced, net: nn.Module, output: int | str | None, training: bool) -> None:
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


def _in_module(qualname: str | None, module: str) -> bool:
    return qualname is not None and (qualname == module or qualname.startswith(module + "."))


def _module_paths_with_nodes(traced: _Traced) -> dict[str, int]:
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


def _downsamples(module: nn.Module) -> bool:
    for m in module.modules():
        stride = getattr(m, "stride", None)
        if stride is not None:
            strides = stride if isinstance(stride, (tuple, list)) else (stride,)
            if any(isinstance(s, int) and s > 1 for s in strides):
                return True
        if "Merging" in type(m).__name__:  # Swin's patch merging halves resolution without a stride
            return True
    return False


def auto_split(
    net: nn.Module, traced: _Traced | None = None, input_size: Sequence[int] | None = None, *, explain: bool = False
) -> Any:
    """The default split: the start of the last resolution stage, or the last quarter of a transformer's blocks.

    Rule: walk down the containers (the model itself, ``nn.Sequential``/``nn.ModuleList``) following the last child
    that downsamples (a stride > 1 or a patch merging) while a container holds several downsampling children; the
    last such child starts the last stage (ResNet ``layer4``, CIFAR ResNet ``layer3``, ConvNeXt/Swin/EfficientNet
    /RegNet last stage). Models that downsample only once (ViT, DeiT) are split at block ``n - n // 4`` of their
    longest stack of identical blocks. Where neither applies (a hand-written LeNet whose downsampling is
    ``F.max_pool2d``), the start of the last of the resolution stages read from the graph
    (:func:`kdwrap.taps.graph_stage_starts`, a trial forward at ``input_size``).

    Returns the module name; with ``explain=True`` a :class:`kdwrap.split_candidates.SplitChoice`: the name, the
    rule that chose it as a sentence, and the cuts that rule considered.
    """
    from .split_candidates import choose_split  # it builds on this module

    choice = choose_split(net, traced or trace(net, training=False), input_size)
    return choice if explain else choice.split


def _valid_splits(traced: _Traced, net: nn.Module) -> list[str]:
    names = set(_module_paths_with_nodes(traced))
    return [n for n, _ in net.named_modules() if n in names]


def _check_split_name(net: nn.Module, split: str, traced: _Traced) -> None:
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
class _Cut:
    trunk: fx.Graph
    tail: fx.Graph
    crossing: list[fx.Node]  # the nodes of the original graph whose values flow from trunk to tail, in order
    tail_inputs: list[str]  # model inputs (placeholders) the tail reads besides the trunk output

    @property
    def cut(self) -> fx.Node:
        """The one value crossing a single-value cut."""
        return self.crossing[0]


def _cut_graph(traced: _Traced, split: str, single: bool = False) -> _Cut:
    """Cut the graph at the first node of module ``split``. The trunk returns the value crossing the cut, or, when
    several do (token models' class token and spatial sizes, two-stream networks), the tuple of them; the tail takes
    them as its first inputs. ``single=True`` refuses a cut crossed by several values."""
    nodes = list(traced.graph.nodes)
    first = next(i for i, n in enumerate(nodes) if n.op != "output" and _in_module(traced.qualnames.get(n), split))
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
    return _Cut(trunk, tail, crossing, [n.name for n in tail_inputs])


class Piece(DualGraphModule):
    """A trunk or tail: torchvision's ``DualGraphModule`` (one graph per mode) whose deep copy keeps every
    submodule's train/eval mode; ``GraphModule.__deepcopy__`` re-runs ``__init__``, which leaves training mode on."""

    def __deepcopy__(self, memo: dict[int, Any]) -> "Piece":
        res = super().__deepcopy__(memo)
        res.train(self.training)  # picks the graph of the mode
        for mine, theirs in zip(self.modules(), res.modules()):
            theirs.training = mine.training
        return res


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
    choice: Any = None  # a kdwrap.split_candidates.SplitChoice (that module builds on this one): why this split


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
    """Cut ``net`` at module ``split`` (default :func:`auto_split`) into trunk and tail sharing ``net``'s tensors.

    ``output`` names the logits (index, key or field) when ``net`` returns a tuple, dict or namedtuple.
    """
    train_t = trace(net, True, leaf_modules, autowrap_functions, input_size)
    eval_t = trace(net, False, leaf_modules, autowrap_functions, input_size)
    select_output(train_t, net, output, training=True)
    select_output(eval_t, net, output, training=False)
    if eval_t.example is not None:
        check_batch_free(fx.GraphModule(net, eval_t.graph), net, eval_t.example, output)
    from .split_candidates import given_split  # it builds on this module

    choice = auto_split(net, eval_t, input_size, explain=True) if split is None else None
    split = choice.split if choice is not None else split
    if not isinstance(split, str):
        raise TypeError(f"split must be a dotted module name (str), got {type(split).__name__}")
    _check_split_name(net, split, eval_t)
    choice = choice or given_split(net, eval_t, split)
    cut_train, cut_eval = _cut_graph(train_t, split), _cut_graph(eval_t, split)
    trunk = Piece(net, cut_train.trunk, cut_eval.trunk, class_name="Trunk")
    tail = Piece(net, cut_train.tail, cut_eval.tail, class_name="Tail")
    shared = sorted({n.rsplit(".", 1)[0] for n in _shared_parameters(trunk, tail)})
    later = _after_shared_parameters(net, eval_t, split) if choice.automatic and shared else None
    if later is not None:  # the automatic split would untie weights (timm CoaT's position encodings): move on
        choice.rule += (f", moved to the first module after the last use of weights the trunk shares "
                        f"({', '.join(shared[:4])})")
        choice.split = split = later
        cut_train, cut_eval = _cut_graph(train_t, split), _cut_graph(eval_t, split)
        trunk = Piece(net, cut_train.trunk, cut_eval.trunk, class_name="Trunk")
        tail = Piece(net, cut_train.tail, cut_eval.tail, class_name="Tail")
    for piece in (trunk, tail):
        piece.train(net.training)
    if not any(True for _ in tail.parameters()):
        raise SplitError(
            f"split={split!r} leaves a tail with no parameters (nothing to replicate); split earlier, e.g. at the "
            "start of the last stage (the default)"
        )
    _check_no_shared_parameters(trunk, tail, split)
    crossing = cut_eval.crossing
    if len(cut_train.crossing) != len(crossing):
        raise SplitError(
            f"split={split!r} is crossed by {len(cut_train.crossing)} values in training mode and {len(crossing)} "
            "in eval mode; choose another split"
        )
    if gate_channels is None:
        gate_channels, dim, main = _trunk_channels(net, trunk, crossing, input_size)
    else:
        dim, main = 1, 0
        if len(crossing) > 1:
            try:
                main = _main_value(tuple(_run_trunk(net, trunk, input_size, "the value the gate pools")))
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
    return SplitResult(split, trunk, tail, int(gate_channels), dim, input_names, tail_inputs,
                       [n.name for n in crossing], main, choice)


def _shared_parameters(trunk: nn.Module, tail: nn.Module) -> dict[str, str]:
    """The parameters the trunk uses too: the tail's name -> the trunk's name."""
    trunk_names = {id(p): n for n, p in trunk.named_parameters()}
    return {n: trunk_names[id(p)] for n, p in tail.named_parameters() if id(p) in trunk_names}


def _parameters_read(net: nn.Module, node: fx.Node) -> set[int]:
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
class _ParameterUse:
    """Where in the graph (node indices) each parameter is read first and last."""

    spans: list[tuple[int, int]]

    @classmethod
    def of(cls, net: nn.Module, traced: _Traced) -> "_ParameterUse":
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for i, node in enumerate(traced.graph.nodes):
            for p in _parameters_read(net, node):
                first.setdefault(p, i)
                last[p] = i
        return cls([(first[p], last[p]) for p in first])

    def tail_learns(self, i: int) -> bool:
        """A cut at node ``i`` leaves parameters after it."""
        return any(end >= i for _, end in self.spans)

    def unties(self, i: int) -> bool:
        """A cut at node ``i`` falls between two reads of one parameter, which replication would untie."""
        return any(start < i <= end for start, end in self.spans)


def _after_shared_parameters(net: nn.Module, traced: _Traced, split: str) -> str | None:
    """The outermost module that starts after ``split`` at a cut that unties no parameter and leaves a tail with
    parameters (timm CoaT: after the last use of the position encodings its stages share); None if there is none."""
    use, order = _ParameterUse.of(net, traced), _module_paths_with_nodes(traced)
    later = sorted((path.count("."), i, path) for path, i in order.items() if path and i > order[split])
    for _, i, path in later:
        if use.tail_learns(i) and not use.unties(i):
            try:
                _check_split_name(net, path, traced)
            except SplitError:
                continue
            return path
    return None


def _check_no_shared_parameters(trunk: nn.Module, tail: nn.Module, split: str) -> None:
    shared = [f"{n} (trunk: {t})" for n, t in _shared_parameters(trunk, tail).items()]
    if shared:
        raise SplitError(
            f"split={split!r}: parameters are used both before and after the split ({', '.join(shared[:5])}); "
            "replicating the tail would untie them. Choose a split after the last use of the shared weights"
        )


def count_parameters(modules: Iterable[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def forward_flops(module: nn.Module, *args: Any) -> tuple[int, Any]:
    """Forward FLOPs of ``module(*args)`` (``torch.utils.flop_counter``: matmuls, convolutions) and its output."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        out = module(*args)
    return counter.get_total_flops(), out
