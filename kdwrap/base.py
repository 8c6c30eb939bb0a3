"""What every kdwrap method shares: a wrapper whose forward returns the deployed model's logits and captures what
the loss needs, and a loss that consumes exactly one capture per forward (as NVIDIA ModelOpt's distillation does)."""
from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import OptionError

__all__ = [
    "EVAL_CAPTURE", "KDModel", "KDLoss", "KeepReachable", "check_logits", "check_output_option", "check_target",
    "count_parameters", "route_options", "select_logits", "unwrap",
]

# What a wrapper's eval-mode forward leaves as its capture: the loss then returns plain cross-entropy.
EVAL_CAPTURE = "eval"


class KDModel(nn.Module):
    """Base class of the wrapped models returned by :func:`kdwrap.wrap`.

    ``forward`` returns a plain logits tensor (what the deployed model returns); whatever else the loss needs is
    its *capture*, handed over by a public protocol: the forward leaves it with :meth:`put_capture` (in eval mode
    :data:`EVAL_CAPTURE`), and the paired :class:`KDLoss` takes it exactly once with :meth:`take_capture`.
    :attr:`pending_capture` shows it without taking it. :attr:`user_network` is the network the user wrapped.

    Train/eval mode, the same for every method: a wrapper starts in the mode of the network it wraps, and
    ``train()`` / ``eval()`` set the whole wrapper, that network included. A training-mode forward runs what the
    method adds (branches, peers, exits, the teacher) and the loss distils; an eval-mode forward runs the deployed
    model alone and the loss is its plain cross-entropy, for validation. A loss computed with gradients after an
    eval-mode forward warns, once per wrapper: training through it would be plain cross-entropy.
    """

    method: str = ""
    # transformers' Trainer reads this off its model with no default when a resumed checkpoint lacks keys; a
    # wrapper ties no weights, so it has none to leave out.
    _keys_to_ignore_on_save: list[str] | None = None
    # Set once the eval-mode loss has warned about gradients, so that a validation loop without no_grad warns once.
    _warned_eval_loss = False

    def __init__(self) -> None:
        super().__init__()
        self._capture: Any = None

    def _follow_mode(self, net: nn.Module) -> None:
        """Put the whole wrapper in ``net``'s mode; every method's constructor ends with it. A network created or
        loaded in eval mode then gives a wrapper in eval mode throughout (its loss warns if trained), never a
        training-mode wrapper around a network whose BatchNorm and dropout stay in eval mode."""
        self.train(net.training)

    def put_capture(self, value: Any) -> None:
        """Leave what the loss needs of this forward (replacing an earlier capture that no loss took)."""
        self._capture = value

    @property
    def pending_capture(self) -> Any:
        """The capture the next loss call will take (``None`` when there is none), without taking it."""
        return self._capture

    @property
    def user_network(self) -> nn.Module:
        """The network the user wrapped, as given (its tensors are the wrapper's own): what ``export()`` rebuilds
        and what integrations name in their records. kdwrap's methods define it; a method registered from outside
        that does not raises ``NotImplementedError``, which integrations read as "unknown"."""
        raise NotImplementedError(f"kdwrap {self.method}: this wrapper does not name the network it wraps")

    def take_capture(self) -> Any:
        """The capture of the preceding forward, taken once; a clear error when there is none."""
        value = self._capture
        if value is None:
            raise RuntimeError(
                f"kdwrap {self.method}: loss_fn was called without a preceding forward of the wrapped model "
                "(or twice for one forward). Call it exactly once per forward: loss = loss_fn(model(x), y)."
            )
        self._capture = None
        return value

    def export(self, **kwargs: Any) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def summary(self, **kwargs: Any) -> str:  # pragma: no cover - abstract
        return repr(self)


class KDLoss(nn.Module):
    """Base class of kdwrap's losses. ``parts`` holds the detached terms of the last loss, for logging.

    ``check_finite=True`` makes every training call check the logits and stop with the step number at the first
    NaN/Inf (one host sync per step; off by default).
    """

    def __init__(self, model: KDModel, check_finite: bool = False) -> None:
        super().__init__()
        # A plain attribute, not a submodule: the loss's state_dict must not repeat the model's weights.
        self.__dict__["_model"] = model
        self.parts: dict[str, torch.Tensor] = {}
        self.check_finite = bool(check_finite)
        self.step = 0  # training-mode calls so far

    @property
    def model(self) -> KDModel:
        return self.__dict__["_model"]

    # The step count lives in the state_dict so a resumed run continues the same schedule.
    def get_extra_state(self) -> dict[str, Any]:
        return {"step": self.step}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])

    def _take_checked_capture(self, logits: Any, target: Any) -> tuple[torch.Tensor, Any]:
        """Check the logits (``B x C``) and the labels, then take the preceding forward's capture. Returns
        ``(cross-entropy target, capture)``; the capture is ``None`` after an eval-mode forward."""
        method = self.model.method
        check_logits(logits, method, "loss_fn got", "; pass it the model's output: loss_fn(model(x), y)", ValueError)
        target, _ = check_target(target, *logits.shape, method)  # before taking the capture: a retry still works
        capture = self.model.take_capture()
        return target, (None if capture is EVAL_CAPTURE else capture)

    def _eval_cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss after an eval-mode forward: float32 cross-entropy of the given logits."""
        self._warn_if_trained_in_eval(logits)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = F.cross_entropy(logits.float(), target)
        self.parts = {"loss": loss.detach()}
        return loss

    def _warn_if_trained_in_eval(self, logits: torch.Tensor) -> None:
        """Warn (once per wrapper) when an eval-mode loss could be backpropagated: a wrapper left in eval mode
        (a network loaded in eval mode, a loop without ``model.train()``) would otherwise train on plain
        cross-entropy of one branch without a word."""
        model = self.model
        if model._warned_eval_loss or not (torch.is_grad_enabled() and logits.requires_grad):
            return
        model._warned_eval_loss = True
        warnings.warn(
            f"kdwrap {model.method}: the model is in eval mode, so this loss is plain cross-entropy of the deployed "
            "model's logits and trains no distillation (a wrapper starts in the mode of the network it wraps, and "
            "a network loaded from a checkpoint is often in eval mode). Call model.train() before training; for "
            "validation, compute the loss under torch.no_grad(). This warning is given once per wrapper.",
            # Point at the user's loss_fn(...) line: above this frame are _eval_cross_entropy, the loss's forward,
            # and Module._call_impl / _wrapped_call_impl.
            stacklevel=6,
        )

    def _check_same_shape(self, logits: torch.Tensor, returned: torch.Tensor) -> None:
        """``logits`` must be what the preceding forward returned (``returned``, from the capture)."""
        if logits.shape != returned.shape:
            raise ValueError(
                f"kdwrap {self.model.method}: loss_fn got logits of shape {tuple(logits.shape)}, but the preceding "
                f"forward returned {tuple(returned.shape)}; pass the wrapped model's output: loss_fn(model(x), y)"
            )

    def _stop_if_not_finite(self, logits: torch.Tensor, what: str = "logits") -> None:
        if self.check_finite and not bool(torch.isfinite(logits).all()):
            raise FloatingPointError(
                f"kdwrap {self.model.method}: the {what} hold NaN/Inf at training step {self.step} (loss call "
                f"{self.step + 1}); the run diverged: lower the learning rate, add gradient clipping, use "
                "torch.amp.GradScaler with fp16, or check that batch's inputs (check_finite=False skips this check)"
            )


class KeepReachable(torch.autograd.Function):
    """Returns ``out`` unchanged, but with every other tensor as an autograd input (zero gradient).

    DDP with ``find_unused_parameters=True`` marks parameters unreachable from the forward's output as unused;
    what reaches the loss only through the capture (ONE's other branches and gate, DML's other peers) must hang
    off the output.
    """

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        ctx.num_others = len(others)
        return out.clone()  # a fresh tensor: in-place edits by the caller must not reach the capture

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # None is a zero gradient that costs no kernel; the edges stay in the graph, which is all DDP looks at.
        return (grad, *([None] * ctx.num_others))


def check_logits(
    z: Any, method: str, source: str = "the tail returned", hint: str | None = None,
    error: type[Exception] = TypeError, dims: int | None = 2,
) -> torch.Tensor:
    """``z`` if it is a logits tensor (of ``dims`` dimensions, ``B x C``; of any shape for ``dims=None``), else
    ``error`` saying what ``source`` (``"the tail returned"``, ``"loss_fn got"``, ``"peer 0 returned"``) gave, then
    ``hint`` (default: name the logits with ``output=``). The one check of the logits that a loss gets and a model,
    a peer or a tail returns."""
    if isinstance(z, torch.Tensor) and (dims is None or z.dim() == dims):
        return z
    what = f"a tensor of shape {tuple(z.shape)}" if isinstance(z, torch.Tensor) else f"a {type(z).__name__}"
    wanted = "a logits tensor" if dims is None else "logits of shape (B, C)"
    if hint is None:
        hint = f"; name the logits with kdwrap.{method}(net, output=<index or key>)"
    raise error(f"kdwrap {method}: {source} {what}, not {wanted}{hint}")


def check_target(target: Any, b: int, c: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate labels for ``B x C`` logits. Returns ``(ce_target, hard_labels)``.

    Int class indices ``(B,)`` in ``[0, C)``, or float soft targets ``(B, C)`` (mixup/cutmix probabilities),
    which cross-entropy takes as they are and whose argmax is the hard label.
    """
    who = f"kdwrap {method}"
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{who}: labels must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point():
        if target.shape == (b, c):
            return target.float(), target.argmax(1)
        raise TypeError(
            f"{who}: labels have float dtype {target.dtype} and shape {tuple(target.shape)}; pass int class "
            f"indices of shape ({b},) (e.g. y.long()) or soft targets of shape ({b}, {c})"
        )
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"{who}: labels must be int class indices, got dtype {target.dtype}")
    if target.shape != (b,):
        hint = " (squeeze the extra dimension: y.view(-1))" if target.numel() == b else ""
        raise ValueError(
            f"{who}: labels must have shape ({b},) for logits of shape ({b}, {c}), got {tuple(target.shape)}{hint}"
        )
    msg = f"{who}: labels must lie in [0, {c}) for {c} classes"
    if target.device.type == "cpu":
        if b and (int(target.min()) < 0 or int(target.max()) >= c):
            raise ValueError(f"{msg}; got values in [{int(target.min())}, {int(target.max())}]")
    else:
        # No host sync on accelerators: the check fails at the next synchronisation, with this message.
        torch._assert_async(((target >= 0) & (target < c)).all(), msg)
    target = target.long()  # cross_entropy takes int64 (or uint8) class indices only
    return target, target


def check_output_option(method: str, value: Any, name: str = "output") -> int | str | None:
    """``value`` if it can name the logits inside a net's output (``None``, an int index or a str key), else a
    clear error."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, str))):
        raise TypeError(f"kdwrap {method}: {name} must be an int index or a str key, got {type(value).__name__}")
    return value


def select_logits(
    out: Any, output: int | str | None, method: str, source: str = "the model", option: str = "output"
) -> torch.Tensor:
    """The logits tensor inside a net's output: the output itself if it is a tensor, else ``out[output]`` (index
    or key; a string also names an attribute, e.g. of a namedtuple or a ``ModelOutput``). ``method``, ``source``
    (which net) and ``option`` (which keyword names the logits) word the errors."""
    if isinstance(out, torch.Tensor):
        return out
    if output is None:
        what = f"a dict with keys {list(out.keys())}" if isinstance(out, Mapping) else type(out).__name__
        hint = f"{option}='logits'" if isinstance(out, Mapping) else f"{option}=0"
        raise TypeError(
            f"kdwrap {method}: {source} returned {what}, not a logits tensor; name the logits with "
            f"kdwrap.{method}(..., {hint}) (an index for tuples/lists, a key or attribute name otherwise)"
        )
    try:
        if isinstance(out, Mapping) or isinstance(output, int):
            logits = out[output]
        else:
            logits = getattr(out, output)
    except (KeyError, IndexError, AttributeError, TypeError) as e:
        raise TypeError(
            f"kdwrap {method}: {option}={output!r} does not name an element of the {type(out).__name__} that "
            f"{source} returned ({e!r})"
        ) from e
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"kdwrap {method}: {option}={output!r} names a {type(logits).__name__} in {source}'s output, not a logits "
            "tensor"
        )
    return logits


def count_parameters(modules: Iterable[nn.Module]) -> int:
    """The parameters of ``modules``, each tensor counted once however many of the modules share it."""
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel / torch.compile wrappers around a kdwrap model."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
    return model


def option_names(target: Callable) -> list[str]:
    """The keyword-only parameters of ``target`` (a method's constructor): the options it owns."""
    return [n for n, p in inspect.signature(target).parameters.items() if p.kind is p.KEYWORD_ONLY]


def route_options(method: str, options: dict[str, Any], *targets: Callable) -> list[dict[str, Any]]:
    """Split ``options`` into one dict per target (by the keyword-only parameters each declares), so each option
    is declared, defaulted and documented once, by the class that uses it. An option no target takes raises
    :class:`OptionError` naming it, the closest valid name, and every valid option."""
    names = [option_names(t) for t in targets]
    valid = [n for group in names for n in group]
    unknown = [k for k in options if k not in valid]
    if unknown:
        hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, valid, n=1))
                 else repr(k) for k in unknown]
        raise OptionError(
            f"kdwrap {method}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
            f"valid options: {', '.join(valid)}"
        )
    return [{k: v for k, v in options.items() if k in group} for group in names]
