"""What each torch op and module does to a value's layout: the facts the fusion rules read."""
from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

ACTIVATION_MODULES: tuple[type, ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Softshrink,
    nn.Hardshrink, nn.LogSigmoid, nn.Threshold,
)
RANDOM_MODULES: tuple[type, ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.RReLU,
)
# module type -> number of spatial axes it acts on (0: any batched input)
SPATIAL_MODULES: dict[type, int] = {
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
    nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3, nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
    nn.LPPool1d: 1, nn.LPPool2d: 2,
    nn.ZeroPad1d: 1, nn.ZeroPad2d: 2, nn.ZeroPad3d: 3, nn.ConstantPad1d: 1, nn.ConstantPad2d: 2,
    nn.ConstantPad3d: 3, nn.ReflectionPad1d: 1, nn.ReflectionPad2d: 2, nn.ReflectionPad3d: 3,
    nn.ReplicationPad1d: 1, nn.ReplicationPad2d: 2, nn.ReplicationPad3d: 3,
    nn.Upsample: 0, nn.UpsamplingNearest2d: 0, nn.UpsamplingBilinear2d: 0,
}
SOFTMAX_MODULES: tuple[type, ...] = (nn.Softmax, nn.LogSoftmax, nn.Softmin)

ELEMENTWISE_FUNCS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.neg, operator.pos, operator.abs, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge, operator.and_, operator.or_, operator.xor, operator.invert,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide, torch.true_divide,
    torch.pow, torch.maximum, torch.minimum, torch.fmax, torch.fmin, torch.where, torch.lerp, torch.addcmul,
    torch.addcdiv, torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max, torch.relu, torch.sigmoid,
    torch.tanh, torch.exp, torch.log, torch.log1p, torch.expm1, torch.sqrt, torch.rsqrt, torch.abs, torch.neg,
    torch.square, torch.erf, torch.reciprocal, torch.sign, torch.nan_to_num, torch.masked_fill, torch.sin,
    torch.cos, torch.floor, torch.ceil, torch.round, torch.zeros_like, torch.ones_like, torch.empty_like,
    torch.full_like, torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge, torch.logical_and,
    torch.logical_or, torch.logical_not,
    F.relu, F.relu6, F.elu, F.selu, F.celu, F.leaky_relu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.softplus, F.softsign, F.tanhshrink, F.softshrink, F.hardshrink, F.logsigmoid, F.threshold,
    F.sigmoid, F.tanh,
}
ELEMENTWISE_INPLACE_FUNCS: set[Any] = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor,
    torch.relu_, torch.sigmoid_, torch.tanh_, torch.exp_, torch.clamp_, torch.selu_, torch.celu_, F.elu_,
    F.leaky_relu_, F.hardtanh_, torch.threshold_,
}
RANDOM_FUNCS: set[Any] = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.rrelu, F.rrelu_,
    torch.dropout, torch.feature_dropout, torch.alpha_dropout, torch.feature_alpha_dropout, torch.bernoulli,
    torch.rand_like, torch.randn_like, torch.randint_like,
}
# Random functions with no tensor input: nothing to lay out per branch.
RANDOM_FACTORIES: set[Any] = {torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal, torch.poisson,
                               torch.multinomial}
ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "true_divide", "pow", "maximum", "minimum", "where", "lerp", "addcmul", "addcdiv",
    "clamp", "clip", "clamp_min", "clamp_max", "relu", "sigmoid", "tanh", "exp", "log", "log1p", "expm1", "sqrt",
    "rsqrt", "abs", "neg", "square", "erf", "reciprocal", "sign", "nan_to_num", "masked_fill", "sin", "cos",
    "floor", "ceil", "round", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "rsub",
    "fill_", "zero_", "hardswish", "silu", "gelu", "mish",
}
RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "exponential_", "geometric_", "cauchy_",
                   "log_normal_", "random_"}
# Methods of one tensor whose other arguments only describe a dtype/device/format.
CAST_METHODS = {"to", "type", "type_as", "float", "double", "half", "bfloat16", "contiguous", "clone", "detach",
                 "cpu", "cuda", "requires_grad_"}
# Ops acting along ``dim``: (index of dim among the arguments after the input, keyword)
DIM_FUNCS: dict[Any, tuple[int, str]] = {
    torch.mean: (0, "dim"), torch.sum: (0, "dim"), torch.amax: (0, "dim"), torch.amin: (0, "dim"),
    torch.std: (0, "dim"), torch.var: (0, "dim"), torch.logsumexp: (0, "dim"), torch.prod: (0, "dim"),
    torch.nansum: (0, "dim"), torch.nanmean: (0, "dim"), torch.softmax: (0, "dim"), torch.log_softmax: (0, "dim"),
    torch.cumsum: (0, "dim"), torch.cumprod: (0, "dim"), F.softmax: (0, "dim"), F.log_softmax: (0, "dim"),
    F.softmin: (0, "dim"), F.normalize: (1, "dim"),
}
DIM_METHODS: dict[str, tuple[int, str]] = {
    name: (0, "dim") for name in (
        "mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod", "nansum", "nanmean", "softmax",
        "log_softmax", "cumsum", "cumprod",
    )
}
SPATIAL_FUNCS: dict[Any, int] = {
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.avg_pool1d: 1,
    F.avg_pool2d: 2, F.avg_pool3d: 3, F.lp_pool1d: 1, F.lp_pool2d: 2, F.lp_pool3d: 3,
    torch.adaptive_avg_pool1d: 1, torch.avg_pool1d: 1, F.interpolate: 0, F.upsample: 0,
    F.upsample_nearest: 0, F.upsample_bilinear: 0,
}
SPATIAL_INDEXED_FUNCS: dict[Any, int] = {  # pools that may return indices (kwarg / position 5 or 2)
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}
SHAPE_ATTRS = {"ndim", "dtype", "device", "is_cuda", "layout", "requires_grad", "is_sparse", "is_quantized"}


def _is_inplace_method(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")


# Functions with an ``inplace`` flag: its position among the positional arguments.
_INPLACE_POS: dict[Any, int] = {
    F.relu: 1, F.relu6: 1, F.selu: 1, F.silu: 1, F.mish: 1, F.hardswish: 1, F.hardsigmoid: 1, F.elu: 2,
    F.celu: 2, F.leaky_relu: 2, F.hardtanh: 3, F.threshold: 3, F.dropout: 3, F.dropout1d: 3, F.dropout2d: 3,
    F.dropout3d: 3, F.alpha_dropout: 3, F.feature_alpha_dropout: 3, F.rrelu: 4,
}


def is_inplace_call(node: fx.Node) -> bool:
    t = node.target
    if node.op == "call_method":
        return _is_inplace_method(t)
    if t in ELEMENTWISE_INPLACE_FUNCS or t is F.rrelu_:
        return True
    pos = _INPLACE_POS.get(t)
    if pos is None:
        return False
    flag = node.kwargs.get("inplace", node.args[pos] if len(node.args) > pos else False)
    return flag is True


def is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("size", "dim", "ndimension", "numel", "nelement")
    return node.op == "call_function" and node.target is builtins.getattr and (
        node.args[1] == "shape" or node.args[1] in SHAPE_ATTRS
    )


def describe_node(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_method":
        return f"method .{node.target}()"
    if node.op == "get_attr":
        return f"attribute '{node.target}'"
    t = node.target
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)
    if mod in ("_operator", "operator"):
        mod = "operator"
    elif mod.startswith("torch._C") or mod == "torch":
        mod = "torch"
    return f"function {mod + '.' if mod else ''}{name}"


def nearby_module(node: fx.Node) -> str:
    """The module path closest to a node (for messages): its own, or that of an input read from a module."""
    if node.op == "call_module":
        return ""
    for a in node.all_input_nodes:
        if a.op == "call_module":
            return f" (after module '{a.target}')"
        if a.op == "get_attr":
            return f" (using '{a.target}')"
    return ""


def get_by_path(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def is_random_call(node: fx.Node) -> bool:
    """The op draws random numbers (dropout in training with p > 0, RReLU in training, bernoulli, rand_like...)."""
    t = node.target
    if node.op == "call_method":
        return t in RANDOM_METHODS
    if t not in RANDOM_FUNCS:
        return False
    if t in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
             F.rrelu, torch.dropout, torch.feature_dropout, torch.alpha_dropout, torch.feature_alpha_dropout):
        if t is F.rrelu:
            training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else False)
            p = 1.0
        else:
            training = node.kwargs.get("training", node.kwargs.get("train",
                                       node.args[2] if len(node.args) > 2 else True))
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        if training is False or (isinstance(p, (int, float)) and p == 0):
            return False
    return True
