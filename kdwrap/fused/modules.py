"""Fusion rules for modules: one registry keyed by module class, and :func:`register_module_rule` for your own.

A rule is looked up along the module's class hierarchy; the first registered class decides, and its rule applies
only while the module keeps that class's ``forward`` (a subclass that overrides ``forward`` computes something else,
so it needs a rule of its own). The rules for timm's and torchvision's layers are registered at the first lookup,
so importing kdwrap does not import them.
"""
from __future__ import annotations

import functools
import importlib
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn.functional as F
from torch import nn

from ._catalog import ACTIVATION_MODULES, RANDOM_MODULES, SOFTMAX_MODULES, SPATIAL_MODULES
from ._layers import (
    fused_batch_norm, fused_conv, fused_frozen_batch_norm, fused_group_norm, fused_linear, fused_prelu,
)
from ._layout import (
    FUSED, LIST, SHARED, STACKED, Val, function_key, fused_dim_op, fused_flatten, fused_spatial, fused_unflatten,
)
from ._rule_builder import RuleBuilder

__all__ = ["ModuleRule", "MODULE_RULES", "RULE_KINDS", "register_module_rule", "find_module_rule"]

RuleFn = Callable[[RuleBuilder, str, nn.Module, Val], Val]


@dataclass(frozen=True)
class ModuleRule:
    """How the fused graph computes a module of the tail for all ``m`` branches.

    ``apply(builder, target, module, value)`` returns the fused result; ``target`` is the module's path in the tail,
    ``value`` its input (a kind and a node of the new graph, see docs/fused.md). ``per_branch_params``: the
    rule reads every branch's own parameters (convolutions, norms, Linear); otherwise, an input that is a list of
    per-branch values runs the module once per branch before ``apply`` is ever called.
    """

    apply: RuleFn
    per_branch_params: bool = False


MODULE_RULES: dict[type, ModuleRule] = {}


def _elementwise(b: RuleBuilder, target: str, mod: nn.Module, v: Val) -> Val:
    """Each output element from the same input element (activations): the module runs as is on any layout."""
    if getattr(mod, "inplace", False) and v.kind == SHARED:
        b.fail(f"in-place {type(mod).__name__} on a value shared by every branch")
    if type(mod) is nn.Identity:
        return v
    return Val(v.kind, b.module_forward(f"branches.0.{target}", v.ref))


def _per_channel(b: RuleBuilder, target: str, mod: nn.Module, v: Val, k: int = 0) -> Val:
    """Each channel on its own, axes 0 and 1 kept (pooling, padding, resizing over the last ``k`` axes; 0: any)."""
    if getattr(mod, "return_indices", False):
        b.fail(f"{type(mod).__name__} with return_indices has no fusion rule")
    mod0 = f"branches.0.{target}"
    if v.kind == SHARED:
        return Val(SHARED, b.module_forward(mod0, v.ref))
    return Val(FUSED, b.call(fused_spatial, b.g.get_attr(mod0), k, b.fused(v)))


# What register_module_rule accepts by name, for modules of one's own.
RULE_KINDS: dict[str, RuleFn] = {"elementwise": _elementwise, "per_channel": _per_channel}


def register_module_rule(cls: type, rule: str | RuleFn, *, per_branch_params: bool = False,
                         replace: bool = False) -> None:
    """Let fused execution run modules of class ``cls`` (and of its subclasses that keep its ``forward``).

    ``rule`` is ``"elementwise"`` (every output element is computed from the same input element, as in an
    activation: the module runs as is on the fused layout), ``"per_channel"`` (each channel on its own, axes 0 and
    1 kept, as in pooling: the module runs once on the ``(B, m*C, ...)`` layout), or a function
    ``rule(builder, target, module, value) -> value`` (see :class:`ModuleRule`). ``replace=True`` overrides an
    existing rule, kdwrap's included. Register before wrapping the model (``kdwrap.one``): rules are read when
    the fused graph is built. A module with parameters of its own needs a function rule that reads every
    branch's copy of them (see the rules for ``nn.Linear`` or ``nn.PReLU`` in this module).
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_module_rule needs an nn.Module subclass, got {cls!r}")
    if isinstance(rule, str):
        if rule not in RULE_KINDS:
            raise ValueError(f"unknown rule kind {rule!r}; valid kinds: {', '.join(RULE_KINDS)}, or a function")
        rule = RULE_KINDS[rule]
    elif not callable(rule):
        raise TypeError(f"rule must be one of {', '.join(RULE_KINDS)} or a function, got {type(rule).__name__}")
    _library_rules()
    if cls in MODULE_RULES and not replace:
        raise ValueError(f"{cls.__qualname__} already has a fusion rule; pass replace=True to override it")
    MODULE_RULES[cls] = ModuleRule(rule, per_branch_params)


def find_module_rule(mod: nn.Module) -> ModuleRule | None:
    """The rule for ``mod``: that of the first registered class in its hierarchy, if ``mod`` keeps its forward."""
    _library_rules()
    for cls in type(mod).__mro__:
        rule = MODULE_RULES.get(cls)
        if rule is not None:
            return rule if type(mod).forward is cls.forward else None
    return None


# -- kdwrap's rules ---------------------------------------------------------------------------------------------------


def _random(b: RuleBuilder, target: str, mod: nn.Module, v: Val) -> Val:
    mod0 = f"branches.0.{target}"
    if v.kind == SHARED and b.training:  # one draw per branch: apply to m copies
        return Val(FUSED, b.module_forward(mod0, b.fused(v)))
    if getattr(mod, "inplace", False) and v.kind == SHARED:
        b.fail(f"in-place {type(mod).__name__} on a value shared by every branch")
    return Val(v.kind, b.module_forward(mod0, v.ref))


def _shape_rule(fn: Callable[[RuleBuilder, nn.Module, Any], Any]) -> RuleFn:
    """A shape-only module: computed once on a shared input, else ``fn`` on the fused layout."""
    def rule(b: RuleBuilder, target: str, mod: nn.Module, v: Val) -> Val:
        if v.kind == SHARED:
            return Val(SHARED, b.module_forward(f"branches.0.{target}", v.ref))
        return Val(FUSED, fn(b, mod, b.fused(v)))

    return rule


def _softmax(b: RuleBuilder, mod: nn.Module, x: Any) -> Any:
    if mod.dim is None:
        b.fail(f"{type(mod).__name__} with dim=None (implicit dim) on a per-branch value")
    fn = {nn.Softmax: F.softmax, nn.LogSoftmax: F.log_softmax, nn.Softmin: F.softmin}[type(mod)]
    return b.call(fused_dim_op, function_key(fn), 0, "dim", x, mod.dim)


def _linear_rule(b: RuleBuilder, target: str, mod: nn.Module, v: Val) -> Val:
    if v.kind == LIST:
        v = Val(FUSED, b.fused(v))
    params = b.params(target, ("weight", "bias"))
    out = b.call(fused_linear, v.ref, v.kind, b.modules(target), params)
    return Val(FUSED if v.kind == SHARED else STACKED, out)


def _conv_rule(b: RuleBuilder, target: str, mod: nn.Module, v: Val, same: bool = False) -> Val:
    x = v.ref if v.kind == SHARED else b.fused(v)
    params = b.params(target, ("weight", "bias"))
    return Val(FUSED, b.call(fused_conv, x, b.modules(target), v.kind == SHARED, b.conv_mode, same, params))


def _act_parts(b: RuleBuilder, target: str, mod: nn.Module, v: Val) -> Val:
    """timm norm-act modules: the drop and act submodules after the normalisation."""
    for part in ("drop", "act"):
        sub = getattr(mod, part, None)
        if sub is not None:
            v = b.apply_module(f"{target}.{part}", sub, v)
    return v


def _bn_rule(b: RuleBuilder, target: str, mod: nn.Module, v: Val, act: bool = False) -> Val:
    defer = b.uses.get(target, 0) == 1
    stats = ("running_mean", "running_var")
    params = b.params(target, ("weight", "bias", *stats), stats)
    out = b.call(fused_batch_norm, b.fused(v), b.modules(target), defer, params)
    if defer:
        b.pending.append(b.call(operator.getitem, out, 1))
        out = b.call(operator.getitem, out, 0)
    res = Val(FUSED, out)
    return _act_parts(b, target, mod, res) if act else res


def _frozen_bn_rule(b: RuleBuilder, target: str, mod: nn.Module, v: Val, act: bool = False) -> Val:
    names = ("weight", "bias", "running_mean", "running_var")  # all buffers in FrozenBatchNorm2d
    params = b.params(target, names, names)
    res = Val(FUSED, b.call(fused_frozen_batch_norm, b.fused(v), b.modules(target), params))
    return _act_parts(b, target, mod, res) if act else res


def _gn_rule(b: RuleBuilder, target: str, mod: nn.Module, v: Val) -> Val:
    params = b.params(target, ("weight", "bias"))
    return Val(FUSED, b.call(fused_group_norm, b.fused(v), b.modules(target), params))


def _prelu_rule(b: RuleBuilder, target: str, mod: nn.Module, v: Val) -> Val:
    return Val(FUSED, b.call(fused_prelu, b.fused(v), b.modules(target)))


def _torch_rules() -> dict[type, ModuleRule]:
    params = functools.partial(ModuleRule, per_branch_params=True)
    rules: dict[type, ModuleRule] = {
        **{c: params(_conv_rule) for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d)},
        nn.modules.batchnorm._BatchNorm: params(_bn_rule),
        nn.SyncBatchNorm: params(_bn_rule),
        nn.GroupNorm: params(_gn_rule),
        nn.Linear: params(_linear_rule),
        nn.PReLU: params(_prelu_rule),
        **{c: ModuleRule(_elementwise) for c in ACTIVATION_MODULES},
        **{c: ModuleRule(_random) for c in RANDOM_MODULES},
        **{c: ModuleRule(functools.partial(_per_channel, k=k)) for c, k in SPATIAL_MODULES.items()},
        nn.Flatten: ModuleRule(_shape_rule(lambda b, mod, x: b.call(fused_flatten, x, mod.start_dim, mod.end_dim))),
        nn.Unflatten: ModuleRule(_shape_rule(
            lambda b, mod, x: b.call(fused_unflatten, x, b.m, mod.dim, tuple(mod.unflattened_size)))),
        **{c: ModuleRule(_shape_rule(_softmax)) for c in SOFTMAX_MODULES},
    }
    return rules


# (module, class name) -> rule, for the layers of timm and torchvision, imported at the first lookup.
_LIBRARY_RULES: dict[tuple[str, str], ModuleRule] = {
    ("timm.layers.norm_act", "BatchNormAct2d"): ModuleRule(functools.partial(_bn_rule, act=True), True),
    ("timm.layers.norm_act", "SyncBatchNormAct"): ModuleRule(functools.partial(_bn_rule, act=True), True),
    ("timm.layers.norm_act", "FrozenBatchNormAct2d"): ModuleRule(functools.partial(_frozen_bn_rule, act=True), True),
    ("timm.layers.conv2d_same", "Conv2dSame"): ModuleRule(functools.partial(_conv_rule, same=True), True),
    ("timm.layers.pool2d_same", "AvgPool2dSame"): ModuleRule(functools.partial(_per_channel, k=2)),
    ("timm.layers.pool2d_same", "MaxPool2dSame"): ModuleRule(functools.partial(_per_channel, k=2)),
    ("torchvision.ops.misc", "FrozenBatchNorm2d"): ModuleRule(_frozen_bn_rule, True),
}


@functools.cache
def _library_rules() -> None:
    """Register kdwrap's rules once, those of torch's modules and of the timm / torchvision layers installed."""
    for cls, rule in _torch_rules().items():
        MODULE_RULES.setdefault(cls, rule)
    for (module, name), rule in _LIBRARY_RULES.items():
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # an older timm without the layer: nothing to fuse there
            continue
        MODULE_RULES.setdefault(cls, rule)

