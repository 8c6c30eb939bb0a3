"""kdwrap in timm's own train.py: what the lines of ``examples/timm_train_py.patch`` call.

The patch adds a few calls to train.py, and the logic lives here, so that it stays small enough to apply to
train.py as timm changes it (docs/integrations.md names the timm versions it was checked against)::

    kdwrap_train.add_arguments(parser)                  # --kdwrap, --kdwrap-kwargs, --kdwrap-eval-ensemble
    kdwrap_train.check_args(args)                       # stops on a kdwrap option or checkpoint train.py would misuse
    task = kdwrap_train.create_task(args, model, train_loss_fn, device=device, dtype=model_dtype)
    kdwrap_train.log_averages(task)                     # after train.py's "Train:" log line
    return OrderedDict([('loss', loss_avg), *kdwrap_train.epoch_averages(task, args).items()])  # summary.csv
    eval_metrics.update(kdwrap_train.validate_ensemble(task, validate, loader_eval, validate_loss_fn, args, ...))

Without ``--kdwrap`` the calls only look for kdwrap options and checkpoints given by mistake, so the patched
train.py trains plain and with timm's own distillation as before.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import pickle
from typing import Any, Callable

import torch
from torch import nn
from timm.utils import ParseKwargs, is_primary, unwrap_model

from ..api import METHODS, export, summary
from .timm import KDTask

__all__ = ["add_arguments", "check_args", "create_task", "log_averages", "epoch_averages", "validate_ensemble",
           "ACCUMULATING"]

_logger = logging.getLogger(__name__)

# The methods whose clocks count optimizer steps (ONE's and OKDDip's ramp-up, PCL's ramp-up and temporal means):
# built with train.py's --grad-accum-steps as their accumulation_steps.
ACCUMULATING = ("one", "okddip", "pcl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--kdwrap METHOD``, ``--kdwrap-kwargs k=v ...`` and ``--kdwrap-eval-ensemble`` on train.py's
    parser."""
    group = parser.add_argument_group("kdwrap online distillation")
    group.add_argument("--kdwrap", default=None, type=str, metavar="METHOD",
                       help=f"train with kdwrap online distillation: {', '.join(_online_methods())}")
    group.add_argument("--kdwrap-kwargs", nargs="*", default={}, action=ParseKwargs,
                       help="options of the kdwrap method, e.g. branches=3 rampup_steps=5000 (see kdwrap.wrap); "
                            "accumulation_steps comes from --grad-accum-steps")
    group.add_argument("--kdwrap-eval-ensemble", action="store_true", default=False,
                       help="also validate the ensemble kdwrap.export(model, ensemble=True) returns (ONE-E), "
                            "logged and written to summary.csv as eval_ensemble_*")


def check_args(args: argparse.Namespace) -> None:
    """Stop with a message naming the fix where train.py would silently ignore kdwrap or fail cryptically: kdwrap
    options without ``--kdwrap``, a kdwrap checkpoint resumed without it, ``--kdwrap kd`` or ``--kdwrap`` with
    ``--kd-model-name``, ``accumulation_steps`` other than ``--grad-accum-steps``. (:func:`create_task` refuses
    ``--kdwrap-eval-ensemble`` for a method without an ensemble.)"""
    method = args.kdwrap
    # A script of one's own built on these helpers may lack train.py's other arguments: train.py's defaults.
    resume, accumulation_steps = getattr(args, "resume", None), getattr(args, "grad_accum_steps", 1)
    if not method:
        given = [flag for flag, value in (("--kdwrap-kwargs", args.kdwrap_kwargs),
                                          ("--kdwrap-eval-ensemble", args.kdwrap_eval_ensemble)) if value]
        if given:
            raise ValueError(
                f"train.py: {' and '.join(given)} without --kdwrap would train without kdwrap; add --kdwrap METHOD "
                f"({', '.join(_online_methods())}), or drop {' and '.join(given)}"
            )
        if resume:
            _refuse_a_kdwrap_checkpoint(resume)
        return
    if method == "kd":
        raise ValueError(
            "train.py: --kdwrap kd needs a trained teacher module, which a flag cannot carry; for offline "
            "distillation from a trained teacher use train.py's own --kd-model-name TEACHER (timm's distillation "
            "tasks) without --kdwrap, or KDTask(model, method='kd', teacher=...) in a script of your own"
        )
    if getattr(args, "kd_model_name", None):
        raise ValueError(
            f"train.py: --kdwrap {method} and --kd-model-name {args.kd_model_name} each choose the training task; "
            "drop one of them"
        )
    accumulation = args.kdwrap_kwargs.get("accumulation_steps")
    if method in ACCUMULATING and accumulation is not None and accumulation != accumulation_steps:
        raise ValueError(
            f"train.py: --kdwrap-kwargs accumulation_steps={accumulation} but --grad-accum-steps "
            f"{accumulation_steps}: kdwrap {method} takes accumulation_steps from --grad-accum-steps, so that its "
            "clock counts train.py's optimizer steps; drop accumulation_steps from --kdwrap-kwargs"
        )


def create_task(
    args: argparse.Namespace,
    model: nn.Module,
    criterion: nn.Module | None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> KDTask:
    """The :class:`KDTask` of ``--kdwrap METHOD --kdwrap-kwargs ...`` (after :func:`check_args`), its
    ``accumulation_steps`` train.py's ``--grad-accum-steps``; logs ``kdwrap.summary`` of the wrapper on the primary
    process."""
    check_args(args)
    if not args.kdwrap:
        raise ValueError("train.py: create_task builds the task of --kdwrap METHOD, and --kdwrap is not set")
    options = dict(args.kdwrap_kwargs)
    if args.kdwrap in ACCUMULATING:
        options["accumulation_steps"] = getattr(args, "grad_accum_steps", 1)
    verbose = is_primary(args)
    task = KDTask(model=model, criterion=criterion, method=args.kdwrap, device=device, dtype=dtype,
                  verbose=verbose, **options)
    export_options = inspect.signature(task.get_trainable_module().export).parameters
    if args.kdwrap_eval_ensemble and "ensemble" not in export_options:
        raise ValueError(
            f"train.py: --kdwrap-eval-ensemble: kdwrap {args.kdwrap} exports no ensemble (kdwrap.export(model, "
            "ensemble=True) is ONE's ONE-E; PCL's ensemble classifier reads every peer on its own training view, so "
            "it has no evaluation form); drop --kdwrap-eval-ensemble"
        )
    if verbose:
        _logger.info("kdwrap summary:\n%s", summary(task.get_trainable_module(), **_summary_size(args, task)))
    return task


def log_averages(task: nn.Module) -> None:
    """Log, beside train.py's ``Train:`` line, the means since the previous such line of the deployed model's
    cross-entropy and the loss's scalar parts (:meth:`KDTask.train_averages`; this process's batches)."""
    if not isinstance(task, KDTask):
        return
    averages = task.train_averages("log")
    if averages:
        _logger.info("kdwrap %s: %s", task.method, "  ".join(f"{k}: {v.item():#.4g}" for k, v in averages.items()))


def epoch_averages(task: nn.Module, args: argparse.Namespace) -> dict[str, float]:
    """The epoch's means of the deployed model's cross-entropy and the loss's scalar parts, averaged over the
    processes, for train.py's train metrics (summary.csv writes them as ``train_deployed_ce``, ...). Every process
    must call it (it all-reduces); empty without ``--kdwrap``."""
    if not isinstance(task, KDTask):
        return {}
    averages = task.train_averages("epoch")
    if averages and getattr(args, "distributed", False):
        values = torch.stack(list(averages.values()))
        torch.distributed.all_reduce(values)
        averages = dict(zip(averages, (values / args.world_size).unbind()))
    return {name: value.item() for name, value in averages.items()}


def validate_ensemble(
    task: nn.Module,
    validate: Callable[..., dict[str, Any]],
    loader: Any,
    loss_fn: nn.Module,
    args: argparse.Namespace,
    **validate_kwargs: Any,
) -> dict[str, Any]:
    """With ``--kdwrap-eval-ensemble``: train.py's ``validate`` of ``kdwrap.export(wrapper, ensemble=True)``, the
    wrapper being the one whose deployed model train.py just validated (the EMA's with ``--model-ema``); its
    metrics as ``ensemble_top1``, ... (``eval_ensemble_top1`` in summary.csv). Else empty."""
    if not isinstance(task, KDTask) or not getattr(args, "kdwrap_eval_ensemble", False):
        return {}
    ema = task.get_trainable_module(ema=True) is not None and not getattr(args, "model_ema_force_cpu", False)
    ensemble = export(unwrap_model(task.get_trainable_module(ema=ema)), ensemble=True)  # a copy, eval-only
    suffix = " (kdwrap ensemble, EMA)" if ema else " (kdwrap ensemble)"
    metrics = validate(ensemble, loader, loss_fn, args, log_suffix=suffix, **validate_kwargs)
    return {f"ensemble_{name}": value for name, value in metrics.items()}


def _summary_size(args: argparse.Namespace, task: KDTask) -> dict[str, Any]:
    """``input_size`` for the summary's FLOP counts: train.py's --input-size or --img-size, where the method's
    summary takes one; else the summary uses the model's declared size."""
    size = getattr(args, "input_size", None)
    if size is None and getattr(args, "img_size", None):
        size = (getattr(args, "in_chans", None) or 3, args.img_size, args.img_size)
    takes = "input_size" in inspect.signature(task.get_trainable_module().summary).parameters
    return {"input_size": tuple(size)} if size is not None and takes else {}


def _online_methods() -> list[str]:
    """The methods --kdwrap trains: all but KD, whose teacher a flag cannot carry."""
    return [name for name in METHODS if name != "kd"]


def _refuse_a_kdwrap_checkpoint(path: str) -> None:
    """Stop if ``path`` holds a kdwrap run's task state: without --kdwrap, timm loads its deployed weights into the
    plain model and then fails on the optimizer's parameter groups (the wrapper's), a message that names no fix."""
    try:  # as timm's resume reads it (weights only, train.py's args allowed), mapped rather than read
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError):
        return  # a file this cannot read: timm's resume reports it itself
    state = checkpoint.get("task_state") if isinstance(checkpoint, dict) else None
    if not (isinstance(state, dict) and {"method", "model", "loss"} <= state.keys()):
        return
    saved = checkpoint.get("args")
    options = getattr(saved, "kdwrap_kwargs", None) or {}
    flags = f"--kdwrap {state['method']}" + (
        " --kdwrap-kwargs " + " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in options.items())
        if options else "")
    raise ValueError(
        f"train.py: {path} is a checkpoint of a kdwrap {state['method']} run, and --resume without --kdwrap would "
        f"fail on the optimizer's parameter groups; resume with {flags} (its args.yaml lists the run's options), "
        f"or start plain training from its deployed weights with --initial-checkpoint {path} instead of --resume"
    )
