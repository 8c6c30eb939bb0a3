"""What a comparison can train, as one table: plain training, its two free controls and kdwrap's methods.

Each recipe turns a fresh network into what the training loop needs (:class:`Trainee`): the module whose
parameters the optimizer steps, the loss, what to do after each optimizer step, and which deployed models to
evaluate and export. The controls are what a user has without distillation: ``plain-ls`` (label smoothing 0.1) and
``plain-ema`` (an exponential moving average of the weights, decay 0.999), both from :mod:`kdwrap.controls`.

Options reach a recipe as ``--option METHOD.NAME=VALUE`` (``one.branches=2``, ``osakd.k=16``, ``plain-ema.decay=
0.99``): each goes to the method's constructor (:func:`kdwrap.one`, ...), which rejects an unknown one by name.
"""
from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import api
from ..controls import WeightAverage, label_smoothing_loss

__all__ = ["Recipe", "Trainee", "RECIPES", "CONTROLS", "BASELINE", "choose_recipes", "parse_options",
           "build_trainee"]

BASELINE = "plain"
CONTROLS = ("plain-ls", "plain-ema")


@dataclass
class Trainee:
    """A network made ready for training by a recipe."""

    model: nn.Module  # what the loop calls and the optimizer steps (the wrapper, or the network itself)
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]
    # deployed row name -> the callable that gives its logits during training (evaluated after each epoch)
    evaluators: dict[str, Callable[[torch.Tensor], torch.Tensor]]
    # deployed row name -> the plain module to deploy, built once training is over
    exports: Callable[[], dict[str, nn.Module]]
    after_step: Callable[[], None] | None = None
    eval_modules: list[nn.Module] = field(default_factory=list)  # put in eval mode for evaluation


def _check_names(recipe: str, options: dict[str, Any], takes: Callable[..., Any]) -> None:
    """The options a control's constructor has (kdwrap's methods check their own, by name, as OptionError)."""
    valid = [n for n in inspect.signature(takes).parameters if n != "net"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{recipe} has no option {', '.join(unknown)}; "
                         + (f"its options: {', '.join(valid)}" if valid else "it takes none"))


def _plain(net: nn.Module, options: dict[str, Any], teacher: nn.Module | None) -> Trainee:
    _check_names("plain", options, lambda net: None)
    return Trainee(net, F.cross_entropy, {"plain": net}, lambda: {"plain": net}, eval_modules=[net])


def _label_smoothing(net: nn.Module, options: dict[str, Any], teacher: nn.Module | None) -> Trainee:
    _check_names("plain-ls", options, label_smoothing_loss)
    loss = label_smoothing_loss(**options)
    return Trainee(net, loss, {"plain-ls": net}, lambda: {"plain-ls": net}, eval_modules=[net])


def _weight_average(net: nn.Module, options: dict[str, Any], teacher: nn.Module | None) -> Trainee:
    _check_names("plain-ema", options, WeightAverage)
    average = WeightAverage(net, **options)
    return Trainee(net, F.cross_entropy, {"plain-ema": average}, lambda: {"plain-ema": average.export()},
                   after_step=average.update, eval_modules=[net, average])


def _wrapped(method: str, label: str, ensemble: bool = False) -> Callable[..., Trainee]:
    """A kdwrap method: the wrapper's eval logits are the deployed model's (``kdwrap.export``); ONE also deploys
    its gated ensemble (ONE-E), from the same run."""

    def build(net: nn.Module, options: dict[str, Any], teacher: nn.Module | None) -> Trainee:
        extra = {"teacher": teacher} if method == "kd" else {}
        model, loss_fn = api.wrap(net, method=method, **extra, **options)
        evaluators: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {label: model}
        if ensemble:
            evaluators[label + "-E"] = model.forward_ensemble

        def exports() -> dict[str, nn.Module]:
            out = {label: api.export(model)}
            if ensemble:
                out[label + "-E"] = api.export(model, ensemble=True)
            return out

        return Trainee(model, loss_fn, evaluators, exports, eval_modules=[model])

    return build


@dataclass(frozen=True)
class Recipe:
    """One row group of the comparison: a command-line name, its rows and how to build it."""

    name: str  # as --methods and --option spell it
    label: str  # its (first) row in the table
    kind: str  # "baseline", "control" or "method"
    build: Callable[[nn.Module, dict[str, Any], nn.Module | None], Trainee]
    what: str  # one line for the report


# Table order; the costliest recipes start first, in the order of START_ORDER below.
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("plain", "plain", "baseline", _plain, "cross-entropy, the baseline"),
    Recipe("plain-ls", "plain-ls", "control", _label_smoothing, "label smoothing 0.1 (a free control)"),
    Recipe("plain-ema", "plain-ema", "control", _weight_average,
           "moving average of the weights, decay 0.999, deployed (a free control)"),
    Recipe("one", "ONE", "method", _wrapped("one", "ONE", ensemble=True),
           "ONE: gated ensemble of replicated branches; ONE-E deploys that ensemble"),
    Recipe("osakd", "OSAKD", "method", _wrapped("osakd", "OSAKD"), "OSAKD: k-NN soft labels from a memory bank"),
    Recipe("dml", "DML", "method", _wrapped("dml", "DML"), "DML: peer networks learn from each other"),
    Recipe("okddip", "OKDDip", "method", _wrapped("okddip", "OKDDip"), "OKDDip: diverse peers, a group leader"),
    Recipe("byot", "BYOT", "method", _wrapped("byot", "BYOT"), "BYOT: exits taught by the network's classifier"),
    Recipe("pcl", "PCL", "method", _wrapped("pcl", "PCL"), "PCL: peers on their own views, a temporal mean"),
    Recipe("kd", "KD", "method", _wrapped("kd", "KD"), "KD: a frozen teacher from a checkpoint (--teacher)"),
)}
# The start order of the trainings: the costliest first packs them best onto the workers.
START_ORDER = ("pcl", "okddip", "dml", "one", "byot", "kd", "osakd", "plain-ema", "plain-ls", "plain")


def choose_recipes(names: Sequence[str]) -> list[str]:
    """``names`` (any case) as recipe names in table order, plain first (the baseline every row is compared with)."""
    unknown = [n for n in names if n.lower() not in RECIPES]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(RECIPES)}")
    chosen = {n.lower() for n in names} | {BASELINE}
    return [name for name in RECIPES if name in chosen]


def _value(text: str) -> Any:
    """``3`` -> 3, ``0.5`` -> 0.5, ``True`` -> True, ``(2, 3)`` -> (2, 3); anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_options(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["one.branches=2", "osakd.k=16"]`` -> ``{"one": {"branches": 2}, "osakd": {"k": 16}}``; every option must
    name one of ``methods``."""
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not name.isidentifier():
            raise ValueError(f"--option {item!r}: expected METHOD.NAME=VALUE, e.g. one.branches=2 or osakd.k=16")
        if method.lower() not in methods:
            raise ValueError(f"--option {item!r}: {method!r} is not among the methods compared ({', '.join(methods)})"
                             f"; add it to --methods or drop the option")
        options.setdefault(method.lower(), {})[name] = _value(text)
    return options


def build_trainee(recipe: str, net: nn.Module, options: Mapping[str, Any] | None = None,
                  teacher: nn.Module | None = None) -> Trainee:
    """The recipe ``recipe`` applied to ``net``."""
    if recipe == "kd" and teacher is None:
        raise ValueError("method kd needs a trained teacher: pass --teacher CHECKPOINT (a state_dict of "
                         "--teacher-model, by default the --model architecture)")
    return RECIPES[recipe].build(net, dict(options or {}), teacher)
