"""Fusion rules for functions and tensor methods, in one registry keyed by a normalised op name.

``torch.flatten`` and ``Tensor.flatten`` are both the op ``"flatten"``, so they share a rule; the tables that map
functions and method names to op names are filled by :func:`register_op_rule`. A rule is
``rule(builder, node) -> value`` and is called once the builder knows the node has per-branch inputs (see
:meth:`._builder.Builder.call_op`); an op with no rule fails with the hint of :data:`HINTS` or a generic message.
"""
from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx

from ._catalog import (
    CAST_METHODS, DIM_FUNCS, DIM_METHODS, ELEMENTWISE_FUNCS, ELEMENTWISE_INPLACE_FUNCS, ELEMENTWISE_METHODS,
    RANDOM_FUNCS, RANDOM_METHODS, SHAPE_ATTRS, SPATIAL_FUNCS, SPATIAL_INDEXED_FUNCS, describe_node, is_inplace_call,
)
from ._layers import (
    fused_functional_batch_norm, fused_functional_conv, fused_functional_group_norm, fused_functional_linear,
)
from ._layout import (
    FUSED, LIST, SHARED, STACKED, Val, branch_numel, branch_shape, branch_size, function_key, fused_dim_op,
    fused_elementwise, fused_flatten, fused_getitem, fused_pad, fused_permute, fused_reshape, fused_reshape_as,
    fused_spatial, fused_squeeze, fused_stochastic_depth, fused_transpose, fused_unflatten, fused_unsqueeze, new_fused,
)
from ._rule_builder import RuleBuilder

__all__ = ["OpRule", "OP_RULES", "HINTS", "register_op_rule", "find_op_rule", "op_name"]


@dataclass(frozen=True)
class OpRule:
    """``apply(builder, node) -> value``. ``takes_params``: the op reads per-branch parameters passed as arguments
    (``F.conv2d(x, w)``): it is applied before the builder would run a parameter-only computation per branch."""

    apply: Callable[[RuleBuilder, fx.Node], Val]
    takes_params: bool = False


OP_RULES: dict[str, OpRule] = {}
_FUNCTION_OPS: dict[Any, str] = {}  # function -> op name
_METHOD_OPS: dict[str, str] = {}  # tensor method name -> op name


def register_op_rule(name: str, rule: OpRule, functions: Iterable[Any] = (), methods: Iterable[str] = ()) -> None:
    """The op ``name`` is computed by ``rule``; ``functions`` and tensor ``methods`` are that op."""
    if OP_RULES.get(name, rule) is not rule:
        raise ValueError(f"op {name!r} already has another fusion rule")
    OP_RULES[name] = rule
    for fn in functions:
        _FUNCTION_OPS[fn] = name
    for method in methods:
        _METHOD_OPS[method] = name


def op_name(node: fx.Node) -> str | None:
    """The normalised op name of a ``call_function`` / ``call_method`` node (None: not a registered op)."""
    if node.op == "call_method":
        return _METHOD_OPS.get(node.target)
    try:
        return _FUNCTION_OPS.get(node.target)
    except TypeError:  # an unhashable callable
        return None


def find_op_rule(node: fx.Node) -> OpRule | None:
    name = op_name(node)
    return None if name is None else OP_RULES[name]


# What an op with per-branch inputs and no rule is told, by the op's own name.
HINTS = {
    "cat": "concatenation of per-branch values along channels (DenseNet-style) is not supported",
    "concat": "concatenation of per-branch values is not supported",
    "stack": "stacking per-branch values is not supported",
    "layer_norm": "layer norm normalises over the last axis (channels-last / tokens); not supported",
    "matmul": "matrix products of activations (attention) are not supported",
    "bmm": "matrix products of activations (attention) are not supported",
    "einsum": "einsum of activations is not supported",
    "scaled_dot_product_attention": "attention is not supported",
    "expand": "expand of a per-branch value is not supported",
    "expand_as": "expand of a per-branch value is not supported",
    "repeat": "repeat of a per-branch value is not supported",
    "split": "splitting a per-branch value is not supported",
    "chunk": "splitting a per-branch value is not supported",
}


def _name(node: fx.Node) -> str:
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", "")


def _rest(b: RuleBuilder, node: fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments after the first one, which must be shared."""
    return b.shared(node.args[1:]), b.shared(node.kwargs)


def fail_without_rule(b: RuleBuilder, node: fx.Node) -> None:
    b.fail(HINTS.get(_name(node), f"no fusion rule for {describe_node(node)} on per-branch inputs"))


# -- shape queries, casts, factories ------------------------------------------------------------------------------


def _getattr(b: RuleBuilder, node: fx.Node) -> Val:
    x, attr = b.val(node.args[0]), node.args[1]
    if attr == "shape":
        return Val(SHARED, b.call(branch_shape, b.fused(x), b.m))
    if attr in SHAPE_ATTRS:
        return Val(SHARED, b.call(builtins.getattr, b.fused(x) if x.kind != FUSED else x.ref, attr))
    b.fail(f"attribute .{attr} of a per-branch value")


def _size(b: RuleBuilder, node: fx.Node) -> Val:
    x = b.fused(b.val(node.args[0]))
    t = node.target
    if t == "size":
        args, kwargs = _rest(b, node)
        return Val(SHARED, b.call(branch_size, x, b.m, *args, **kwargs))
    if t in ("numel", "nelement"):
        return Val(SHARED, b.call(branch_numel, x, b.m))
    return Val(SHARED, b.g.call_method("dim", (x,)))


def _new(b: RuleBuilder, node: fx.Node) -> Val:
    x = b.val(node.args[0])
    ref = b.fused(x) if x.kind == LIST else x.ref  # only dtype/device are read
    args, kwargs = _rest(b, node)
    return Val(FUSED, b.call(new_fused, ref, b.m, node.target, *args, **kwargs))


def _cast(b: RuleBuilder, node: fx.Node) -> Val:
    """``x.to(other)``, ``x.type_as(other)``, ``x.float()``...: the other arguments only carry a dtype, device or
    memory format, so any layout of theirs will do; the result has the kind of ``x``."""
    x = b.val(node.args[0])

    def raw(n: fx.Node) -> Any:
        v = b.env[n]
        return v.ref[0] if v.kind == LIST else v.ref

    args, kwargs = fx.map_arg(node.args[1:], raw), fx.map_arg(node.kwargs, raw)
    if x.kind == LIST:
        return Val(LIST, tuple(b.g.call_method(node.target, (r, *args), kwargs) for r in x.ref))
    out = b.g.call_method(node.target, (x.ref, *args), kwargs)
    if x.kind == SHARED and x.ref in b.acts:
        b.acts.add(out)
    return Val(x.kind, out)


# -- elementwise ----------------------------------------------------------------------------------------------------


def _elementwise(b: RuleBuilder, node: fx.Node) -> Val:
    inplace = is_inplace_call(node)
    vals = [b.val(a) for a in node.args]
    for k, a in node.kwargs.items():
        if isinstance(a, fx.Node) and b.env[a].kind != SHARED:
            b.fail(f"per-branch keyword argument {k}=")
    kwargs = b.shared(node.kwargs)
    nonshared = [i for i, v in enumerate(vals) if v.kind != SHARED]
    node_args = [i for i, v in enumerate(vals) if v.kind == SHARED and isinstance(v.ref, fx.Node)]
    if len(nonshared) == 1 and not node_args:
        i = nonshared[0]
        v = vals[i]
        if inplace and i != 0:
            b.fail("in-place op on a shared value with a per-branch operand")
        args = [w.ref for w in vals]
        if v.kind == LIST:
            return b.replicate(node)
        return Val(v.kind, b.g.create_node(node.op, node.target, tuple(args), kwargs))
    if inplace and vals[0].kind != FUSED:
        b.fail(f"in-place op on a {vals[0].kind} value with other tensor operands")
    kinds = []
    args = []
    for v in vals:
        if v.kind == STACKED:
            v = Val(FUSED, b.fused(v))
        kinds.append(v.kind)
        args.append(v.ref)
    if FUSED not in kinds and LIST not in kinds:  # pragma: no cover - excluded by the builder
        b.fail("internal: no per-branch operand")
    return Val(FUSED, b.call(fused_elementwise, function_key(node.target), tuple(kinds), b.m, inplace, *args, **kwargs))


def _index(b: RuleBuilder, node: fx.Node) -> Val:
    x = b.val(node.args[0])
    if x.kind not in (FUSED, STACKED):
        b.fail("indexing with a per-branch index")
    return Val(FUSED, b.call(fused_getitem, b.fused(x), b.shared(node.args[1], "the index")))


# -- along a dim, over spatial axes ---------------------------------------------------------------------------------


def static_checks(b: RuleBuilder, node: fx.Node) -> None:
    """Fail at build time, where the arguments are constants, on what the runtime helpers would reject."""
    name, rest = _name(node), node.args[1:]
    if name == "permute":
        perm = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        if all(isinstance(d, int) for d in perm) and perm and [d % len(perm) for d in perm][:2] != [0, 1]:
            b.fail(f"permute{tuple(perm)} moves the batch or branch axis (channels-last layouts are not supported)")
    elif name in ("transpose", "swapaxes", "swapdims") and len(rest) == 2:
        d0, d1 = rest
        if isinstance(d0, int) and isinstance(d1, int) and d0 >= 0 and d1 >= 0 and d0 != d1 and min(d0, d1) < 2:
            b.fail(f"transpose({d0}, {d1}) moves the batch or branch axis (channels-last layouts are not supported)")
    elif name == "flatten":
        start = node.kwargs.get("start_dim", rest[0] if rest else 0)
        end = node.kwargs.get("end_dim", rest[1] if len(rest) > 1 else -1)
        if start == 0 and isinstance(end, int) and end != 0:
            b.fail("flatten(0, ...) merges the batch axis with the branch axis")
    elif name == "unsqueeze":
        d = node.kwargs.get("dim", rest[0] if rest else None)
        if isinstance(d, int) and 0 <= d < 2:
            b.fail(f"unsqueeze({d}) inserts an axis before the branch axis")
    elif (node.op == "call_method" and name in DIM_METHODS) or node.target in DIM_FUNCS:
        pos, kw = DIM_METHODS[name] if node.op == "call_method" else DIM_FUNCS[node.target]
        d = rest[pos] if len(rest) > pos else node.kwargs.get(kw, node.kwargs.get("axis"))
        if d is None and not any(isinstance(a, fx.Node) for a in rest):
            b.fail(f"{name} without dim acts across the batch and branch axes")
        dims = d if isinstance(d, (tuple, list)) else [d]
        if any(isinstance(x, int) and 0 <= x < 2 for x in dims):
            b.fail(f"{name} along dim={d!r} acts across the channel axis, which holds the branches")


def _layout_op(helper: Callable[..., Any], *fixed: Callable[[RuleBuilder, fx.Node], Any]) -> Callable[..., Val]:
    """A rule that runs ``helper(x, *fixed(b, node), *rest)`` on the fused first argument ``x``, after the static
    checks; ``fixed`` computes leading arguments (the branch count, the function)."""
    def rule(b: RuleBuilder, node: fx.Node) -> Val:
        static_checks(b, node)
        x = b.data_input(node)
        args, kwargs = _rest(b, node)
        return Val(FUSED, b.call(helper, x, *(f(b, node) for f in fixed), *args, **kwargs))

    return rule


def _m(b: RuleBuilder, node: fx.Node) -> int:
    return b.m


def _along_dim(b: RuleBuilder, node: fx.Node) -> Val:
    static_checks(b, node)
    pos, kw = DIM_METHODS[node.target] if node.op == "call_method" else DIM_FUNCS[node.target]
    args, kwargs = _rest(b, node)
    return Val(FUSED, b.call(fused_dim_op, function_key(node.target), pos, kw, b.data_input(node), *args, **kwargs))


def _over_space(b: RuleBuilder, node: fx.Node) -> Val:
    target, name = node.target, _name(node)
    if target in SPATIAL_INDEXED_FUNCS:
        ri = node.kwargs.get("return_indices", node.args[5] if len(node.args) > 5 and "max_pool" in name else
                             (node.args[2] if len(node.args) > 2 and "adaptive" in name else False))
        if ri:
            b.fail("pooling with return_indices")
        k = SPATIAL_INDEXED_FUNCS[target]
    else:
        k = SPATIAL_FUNCS[target]
    args, kwargs = _rest(b, node)
    return Val(FUSED, b.call(fused_spatial, function_key(target), k, b.data_input(node), *args, **kwargs))


def _view(b: RuleBuilder, node: fx.Node) -> Val:
    x = b.data_input(node)
    if any(isinstance(a, torch.dtype) for a in node.args[1:]):
        b.fail("view as another dtype")
    method = node.target if node.op == "call_method" else "reshape"
    return Val(FUSED, b.call(fused_reshape, x, b.m, method, *b.shared(node.args[1:])))


def _view_as(b: RuleBuilder, node: fx.Node) -> Val:
    x = b.data_input(node)
    other = b.val(node.args[1])
    if other.kind not in (SHARED, FUSED):
        b.fail(f"{node.target} of a {other.kind} value")
    return Val(FUSED, b.call(fused_reshape_as, x, b.m, node.target, other.ref, other.kind == FUSED))


def _axes_rule(helper: Callable[..., Any]) -> Callable[..., Val]:
    """transpose / permute: ``helper(fn, x, *axes)``, after the static checks."""
    def rule(b: RuleBuilder, node: fx.Node) -> Val:
        static_checks(b, node)
        args, kwargs = _rest(b, node)
        return Val(FUSED, b.call(helper, function_key(node.target), b.data_input(node), *args, **kwargs))

    return rule


# -- functional layers with per-branch parameters as arguments ------------------------------------------------------


def _bind_args(b: RuleBuilder, node: fx.Node, names: Sequence[str], defaults: dict[str, Any]) -> dict[str, Val]:
    out = {k: Val(SHARED, v) for k, v in defaults.items()}
    if len(node.args) > len(names):
        b.fail("unexpected positional arguments")
    for k, a in zip(names, node.args):
        out[k] = b.val(a)
    for k, a in node.kwargs.items():
        if k not in names:
            b.fail(f"unexpected keyword argument {k}=")
        out[k] = b.val(a)
    return out


def _require_shared(b: RuleBuilder, vals: dict[str, Val], names: Iterable[str]) -> list[Any]:
    out = []
    for k in names:
        v = vals[k]
        if v.kind != SHARED:
            b.fail(f"argument {k} differs per branch; no rule for that")
        out.append(v.ref)
    return out


def _conv_f_rule(b: RuleBuilder, node: fx.Node) -> Val:
    a = _bind_args(b, node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                   {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
    x = a["input"]
    w = b.as_list(a["weight"], "the conv weight")
    bias = b.as_list(a["bias"], "the conv bias")
    stride, padding, dilation, groups = _require_shared(b, a, ("stride", "padding", "dilation", "groups"))
    if x.kind in (STACKED, LIST):
        x = Val(FUSED, b.fused(x))
    shared = x.kind == SHARED
    out = b.call(fused_functional_conv, x.ref, shared, b.conv_mode, w, bias, stride, padding, dilation, groups)
    return Val(FUSED, out)


def _linear_f_rule(b: RuleBuilder, node: fx.Node) -> Val:
    a = _bind_args(b, node, ("input", "weight", "bias"), {"bias": None})
    x = a["input"]
    w = b.as_list(a["weight"], "the linear weight")
    bias = b.as_list(a["bias"], "the linear bias")
    if x.kind == LIST:
        x = Val(FUSED, b.fused(x))
    return Val(FUSED if x.kind == SHARED else STACKED, b.call(fused_functional_linear, x.ref, x.kind, w, bias))


def _bn_f_rule(b: RuleBuilder, node: fx.Node) -> Val:
    a = _bind_args(
        b, node, ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
    )
    x = b.fused(a["input"])
    rm = b.as_list(a["running_mean"], "the running mean")
    rv = b.as_list(a["running_var"], "the running variance")
    w = b.as_list(a["weight"], "the batch-norm weight")
    bias = b.as_list(a["bias"], "the batch-norm bias")
    training, momentum, eps = _require_shared(b, a, ("training", "momentum", "eps"))
    if training is not False and rm is not None and a["running_mean"].kind == SHARED:
        b.fail("F.batch_norm in training updates statistics that are not per-branch buffers")
    return Val(FUSED, b.call(fused_functional_batch_norm, x, b.m, rm, rv, w, bias, training, momentum, eps))


def _gn_f_rule(b: RuleBuilder, node: fx.Node) -> Val:
    a = _bind_args(b, node, ("input", "num_groups", "weight", "bias", "eps"),
                   {"weight": None, "bias": None, "eps": 1e-5})
    x = b.fused(a["input"])
    groups, eps = _require_shared(b, a, ("num_groups", "eps"))
    w = b.as_list(a["weight"], "the group-norm weight")
    bias = b.as_list(a["bias"], "the group-norm bias")
    return Val(FUSED, b.call(fused_functional_group_norm, x, b.m, groups, w, bias, eps))


# -- the registry ----------------------------------------------------------------------------------------------------


def _name_of(fn: Any) -> str:
    return getattr(fn, "__name__", repr(fn))


def _stochastic_depth_functions() -> tuple[Any, ...]:
    try:
        from torchvision.ops.stochastic_depth import stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return ()
    return (stochastic_depth,)


def _register_kdwrap_rules() -> None:
    rule = OpRule
    register_op_rule("getattr", rule(_getattr), functions=[builtins.getattr])
    register_op_rule("size", rule(_size), methods=["size", "dim", "ndimension", "numel", "nelement"])
    register_op_rule("new", rule(_new), methods=["new_empty", "new_zeros", "new_ones", "new_full"])
    register_op_rule("cast", rule(_cast), methods=CAST_METHODS)
    # Each elementwise op under its own name (torch.add and Tensor.add are "add"); they share one rule.
    ew = rule(_elementwise)
    for fn in (*ELEMENTWISE_FUNCS, *ELEMENTWISE_INPLACE_FUNCS, *RANDOM_FUNCS):
        register_op_rule(_name_of(fn), ew, functions=[fn])
    for method in (*ELEMENTWISE_METHODS, *RANDOM_METHODS):
        inplace = [method + "_"] if not method.endswith("_") else []
        register_op_rule(method.strip("_") or method, ew, methods=[method, *inplace])
    register_op_rule("getitem", rule(_index), functions=[operator.getitem])
    along_dim = rule(_along_dim)
    for fn in DIM_FUNCS:
        register_op_rule(_name_of(fn), along_dim, functions=[fn])
    for method in DIM_METHODS:
        register_op_rule(method, along_dim, methods=[method])
    over_space = rule(_over_space)
    for fn in (*SPATIAL_FUNCS, *SPATIAL_INDEXED_FUNCS):
        register_op_rule(_name_of(fn), over_space, functions=[fn])
    register_op_rule("flatten", rule(_layout_op(fused_flatten)), functions=[torch.flatten], methods=["flatten"])
    register_op_rule("unflatten", rule(_layout_op(fused_unflatten, _m)), functions=[torch.unflatten],
                     methods=["unflatten"])
    register_op_rule("reshape", rule(_view), functions=[torch.reshape], methods=["view", "reshape"])
    register_op_rule("reshape_as", rule(_view_as), methods=["view_as", "reshape_as"])
    register_op_rule("squeeze", rule(_layout_op(fused_squeeze, _m)), functions=[torch.squeeze], methods=["squeeze"])
    register_op_rule("unsqueeze", rule(_layout_op(fused_unsqueeze)), functions=[torch.unsqueeze], methods=["unsqueeze"])
    register_op_rule("transpose", rule(_axes_rule(fused_transpose)),
                     functions=[torch.transpose, torch.swapaxes, torch.swapdims],
                     methods=["transpose", "swapaxes", "swapdims"])
    register_op_rule("permute", rule(_axes_rule(fused_permute)), functions=[torch.permute], methods=["permute"])
    register_op_rule("pad", rule(_layout_op(fused_pad, _m)), functions=[F.pad])
    register_op_rule("stochastic_depth", rule(_layout_op(fused_stochastic_depth, _m)),
                     functions=_stochastic_depth_functions())
    register_op_rule("conv", rule(_conv_f_rule, True), functions=[F.conv1d, F.conv2d, F.conv3d])
    register_op_rule("linear", rule(_linear_f_rule, True), functions=[F.linear])
    register_op_rule("batch_norm", rule(_bn_f_rule, True), functions=[F.batch_norm])
    register_op_rule("group_norm", rule(_gn_f_rule, True), functions=[F.group_norm])


_register_kdwrap_rules()
