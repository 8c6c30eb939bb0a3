"""timm's task API: a ``TrainingTask`` that trains with a kdwrap method (needs timm >= 1.0.27).

    task = KDTask(model, criterion=train_loss_fn, method="one", device=device)   # was ClassificationTask(...)
    result = task(input, target)            # {"loss", "output": the deployed model's logits, the loss's parts}
    deployed = task.get_eval_model()        # the user's own class: what kdwrap.export returns, kept up to date

A script built on the task API (timm's train.py) then runs unchanged: DDP, torch.compile, EMA, checkpoints and
resume go through the task. docs/integrations.md has the recipe.
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

try:
    from timm.task import TrainingTask, resume_task_checkpoint  # noqa: F401  (its presence dates the task API)
except ImportError as err:
    raise ImportError(
        f"kdwrap.integrations.timm needs timm's task API with EMA and checkpoint state, timm >= 1.0.27 ({err}): "
        "pip install -U 'timm>=1.0.27'"
    ) from err

from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, unwrap_model

from ..api import wrap
from ..base import KDModel, check_target, select_logits
from ..errors import CheckpointError

__all__ = ["KDTask", "DEPLOYED_PIECES", "CLASSIFIERS"]

_logger = logging.getLogger(__name__)

# Per method: the wrapper's modules whose tensors make up the model kdwrap.export returns, keyed as that model's
# own state_dict is. KDTask's eval model is that model sharing these tensors, so it always holds the weights being
# trained: timm's train.py takes its eval model once, before the first step.
DEPLOYED_PIECES: dict[str, Callable[[KDModel], list[nn.Module]]] = {
    "one": lambda m: [m.trunk, m.branches[m.branch]],
    "okddip": lambda m: [m.trunk, m.branches[m.leader]],
    "byot": lambda m: [m.body],
    "osakd": lambda m: [m.model],
    "kd": lambda m: [m.student],
    "dml": lambda m: [m.peers[m.peer]],
    "pcl": lambda m: [m.mean_trunk, m.mean_branches[m.branch]],
}

# Per method: the classifier parameters of its wrapper, given ``own(module)``, the parameters of the user's
# classifier inside a module that holds a copy of it (a branch, a peer). Adaptive gradient clipping (train.py's
# --clip-mode agc) leaves them out, as timm leaves out a plain model's classifier: every branch's, peer's and
# exit's classifier and PCL's ensemble classifier. ONE's gate and OKDDip's attention weigh branches and peers, they
# output no class logits, so they are clipped with the rest.
CLASSIFIERS: dict[str, Callable[[KDModel, Callable[[nn.Module], list[nn.Parameter]]], list[nn.Parameter]]] = {
    "one": lambda m, own: [p for b in m.branches for p in own(b)],
    "okddip": lambda m, own: [p for b in m.branches for p in own(b)],
    "pcl": lambda m, own: [p for b in m.branches for p in own(b)] + list(m.ensemble.parameters()),
    "byot": lambda m, own: own(m.body) + [p for head in m.heads for p in head.fc.parameters()],
    "osakd": lambda m, own: own(m.model),
    "kd": lambda m, own: own(m.student),
    "dml": lambda m, own: [p for peer in m.peers for p in own(peer)],
}


class KDTask(TrainingTask):
    """timm's ``ClassificationTask(model, criterion)`` with a kdwrap method in place of the criterion.

    The task wraps ``model`` with ``kdwrap.wrap(model, method=method, **options)`` and trains the wrapper:
    ``task(input, target)`` returns ``{"loss", "output", **loss_fn.parts}``, ``output`` being the deployed
    model's logits (ONE's kept branch, DML's kept peer, ...) and the parts the loss's detached terms (some per
    branch or peer) for logging. ``get_trainable_module()`` is the wrapper (give its parameters to the optimizer);
    ``get_eval_model()`` is what ``kdwrap.export`` returns, an instance of the user's class, sharing the wrapper's
    tensors so that it is current at every validation; ``get_eval_model(ema=True)`` is the same for the averaged
    wrapper of :meth:`setup_ema`.

    Targets: class indices, or the dense soft targets of timm's Mixup/CutMix, which every method's cross-entropy
    terms take as probabilities (OSAKD's memory bank stores their argmax). kdwrap's losses compute their own
    cross-entropy, so ``criterion`` only says which one: ``None`` or ``nn.CrossEntropyLoss()``,
    ``SoftTargetCrossEntropy()`` (what train.py uses with Mixup), or label smoothing
    (``LabelSmoothingCrossEntropy(s)``, ``nn.CrossEntropyLoss(label_smoothing=s)``), which the task applies to the
    targets before the loss. Other criteria (binary cross-entropy, JSD) are refused.

    Checkpoints (``get_checkpoint_state``, what timm's ``CheckpointSaver`` writes): ``state_dict`` is the deployed
    model's, so ``timm.create_model(name, checkpoint_path=...)`` and validate.py load it; ``task_state`` holds the
    whole wrapper (other branches, peers, exits, gate) and the loss's state (ONE's ramp-up clock, OSAKD's memory
    bank), so that ``resume_task_checkpoint`` continues the run where it stopped. ``torch.save`` writes tensors
    the two share once. A checkpoint without that state is refused.

    Gradient accumulation: build ONE, OKDDip and PCL with ``accumulation_steps`` equal to the loop's, so that their
    ramp-up clock (and PCL's temporal means) count optimizer steps. The optimizer: the wrapper carries the user's
    model's ``no_weight_decay()`` list, under its own names for those parameters, for
    ``timm.optim.create_optimizer_v2``. Clipping: :meth:`get_clip_parameters` leaves every classifier out for
    adaptive gradient clipping (:data:`CLASSIFIERS`). Logging: :meth:`train_averages` gives the means of the
    deployed model's cross-entropy and the loss's scalar parts over the training steps.

    A method added with ``kdwrap.register_method`` needs an entry in :data:`DEPLOYED_PIECES` (which of its
    wrapper's modules hold the deployed model's tensors), and one in :data:`CLASSIFIERS` for adaptive gradient
    clipping.

    Args:
        model: the user's classifier (a timm model or any ``nn.Module``), on its device, not yet wrapped in DDP or
            ``torch.compile`` (:meth:`compile` and :meth:`prepare_distributed` do that).
        criterion: the cross-entropy to reproduce (see above); ``None``: from ``criterion_kwargs``, else plain.
        criterion_kwargs: arguments of ``timm.loss.create_classification_loss`` when ``criterion`` is ``None``.
        device, dtype, verbose: as for timm's tasks.
        method: a name in ``kdwrap.METHODS``.
        options: the method's options, as for ``kdwrap.wrap`` (``branches=3``, ``k=8``, ``teacher=...``).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | None = None,
        criterion_kwargs: dict[str, Any] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
        *,
        method: str = "one",
        **options: Any,
    ) -> None:
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.label_smoothing = _label_smoothing(_resolve_criterion(criterion, criterion_kwargs))
        self.classifier_names = _classifier_names(model)  # looked up in every copy of the model (branch, peer)
        wrapper, self.loss_fn = wrap(model, method=method, **options)
        if wrapper.method not in DEPLOYED_PIECES:
            raise NotImplementedError(
                f"KDTask: method {wrapper.method!r} is not supported yet: kdwrap.integrations.timm.DEPLOYED_PIECES "
                "does not say which modules of its wrapper make up the deployed model; add an entry "
                f"DEPLOYED_PIECES[{wrapper.method!r}] = lambda wrapper: [modules holding its tensors]"
            )
        self.trainable_module = wrapper
        self.loss_fn.to(device=self.device)  # OSAKD's bank lives with the outputs
        # Eval views (the deployed model sharing a wrapper's tensors) per EMA flag, with the wrapper each views.
        # Outside the module tree: their tensors are the wrapper's, moved and saved with it.
        self.__dict__["_views"] = {}
        # Running sums of the logged scalars per window ("log": since the last log line, "epoch"), kept on the
        # device so that a step waits for no host copy.
        self.__dict__["_sums"] = {}
        _forward_no_weight_decay(wrapper, self.get_eval_model())
        if self.verbose:
            loss_name = type(self.loss_fn).__name__
            _logger.info(f"KDTask: kdwrap {wrapper.method}, {loss_name}({self.loss_fn.extra_repr()})")

    @property
    def method(self) -> str:
        """The kdwrap method the task trains."""
        return self.loss_fn.model.method

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The wrapper's forward and the kdwrap loss. Returns ``{"loss", "output", **loss_fn.parts}``."""
        out = self.trainable_module(input)
        wrapper = self.loss_fn.model
        logits = select_logits(out, getattr(wrapper, "output", None), wrapper.method)
        target = self._smoothed(target, logits)
        loss = self.loss_fn(out, target)
        if wrapper.training:
            self._add_to_averages(logits, target)
        return {**self.loss_fn.parts, "loss": loss, "output": logits}

    # ------------------------------------------------------------------------------------------------- logging
    def _add_to_averages(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        with torch.no_grad():
            logp = F.log_softmax(logits.float(), dim=-1)
            if target.is_floating_point() and target.shape == logp.shape:
                deployed_ce = -(target * logp).sum(-1).mean()
            else:
                deployed_ce = F.nll_loss(logp, target.reshape(-1).long())
            scalars = {"deployed_ce": deployed_ce}
            scalars.update((k, v) for k, v in self.loss_fn.parts.items()
                           if k != "loss" and isinstance(v, torch.Tensor) and v.dim() == 0)
            values = torch.stack([v.float() for v in scalars.values()])
            for window in ("log", "epoch"):
                names, total, count = self._sums.get(window, (None, None, 0))
                if names != list(scalars):
                    names, total, count = list(scalars), torch.zeros_like(values), 0
                self._sums[window] = (names, total + values, count + 1)

    def train_averages(self, window: str = "epoch") -> dict[str, torch.Tensor]:
        """Means of the training steps since the last call for ``window`` (``"log"`` or ``"epoch"``), then starts
        that window again: ``deployed_ce``, the cross-entropy of ``output`` (the deployed model's logits; for PCL
        the live peer whose temporal mean is deployed) with the targets the loss takes (Mixup's, label-smoothed),
        and the loss's scalar parts but the total (``ce_ensemble``, ``ramp_weight``, ...). 0-dim tensors on the
        device; empty when no step ran."""
        if window not in ("log", "epoch"):
            raise ValueError(f"KDTask.train_averages: window is 'log' or 'epoch', got {window!r}")
        names, total, count = self._sums.pop(window, (None, None, 0))
        if not count:
            return {}
        return dict(zip(names, (total / count).unbind()))

    def _smoothed(self, target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``target`` with the criterion's label smoothing applied, as dense probabilities."""
        if not self.label_smoothing:
            return target
        target, _ = check_target(target, *logits.shape, self.method)  # kdwrap's own messages for bad labels
        classes = logits.shape[-1]
        dense = target if target.is_floating_point() else F.one_hot(target, classes).float()
        return dense * (1.0 - self.label_smoothing) + self.label_smoothing / classes

    # --------------------------------------------------------------------------------------- distributed, compile
    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs: Any) -> "KDTask":
        """Wrap the kdwrap wrapper in ``DistributedDataParallel`` (the loss stays outside: OSAKD's bank gathers
        every rank's entries itself). ``device_ids`` are dropped for a wrapper on the CPU, which DDP takes only
        without them (train.py passes ``[device]`` on every device). Returns ``self``."""
        if device_ids is not None and all(p.device.type == "cpu" for p in self.trainable_module.parameters()):
            device_ids = None
        self.trainable_module = nn.parallel.DistributedDataParallel(
            self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs: Any) -> nn.Module:
        """Compile the wrapper's forward (the loss runs eagerly, as kdwrap's tests compile it) and the eval model.
        Call it before :meth:`prepare_distributed`. Returns the compiled eval model."""
        eval_model = self.get_eval_model()
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = torch.compile(eval_model, backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model

    def get_clip_parameters(self, exclude_head: bool = False) -> list[nn.Parameter]:
        """The parameters to clip: all of the wrapper's; ``exclude_head=True`` (train.py with ``--clip-mode agc``)
        all but the classifiers (:data:`CLASSIFIERS`): every branch's, peer's and exit's classifier and PCL's
        ensemble classifier, as timm leaves a plain model's classifier out of adaptive gradient clipping."""
        wrapper = self._wrapper()
        parameters = list(wrapper.parameters())
        if not exclude_head:
            return parameters
        if wrapper.method not in CLASSIFIERS:
            raise NotImplementedError(
                f"KDTask: adaptive gradient clipping (--clip-mode agc) leaves the classifiers out, and "
                f"kdwrap.integrations.timm.CLASSIFIERS does not say which of kdwrap {wrapper.method!r}'s parameters "
                f"they are; add CLASSIFIERS[{wrapper.method!r}], or clip with --clip-mode norm or value"
            )
        heads = {id(p) for p in CLASSIFIERS[wrapper.method](wrapper, self._own_classifier)}
        return [p for p in parameters if id(p) not in heads]

    def _own_classifier(self, host: nn.Module) -> list[nn.Parameter]:
        """The parameters of the user's classifier in ``host``, a module holding a copy of it (a branch, a peer)."""
        held = dict(host.named_parameters())
        missing = [name for name in self.classifier_names if name not in held]
        if missing:
            raise ValueError(
                f"KDTask: adaptive gradient clipping (--clip-mode agc) leaves the classifiers out, but a "
                f"{type(host).__name__} of the kdwrap {self.method} wrapper has no {', '.join(missing)}, where your "
                f"model has its classifier; clip with --clip-mode norm or value"
            )
        return [held[name] for name in self.classifier_names]

    # ------------------------------------------------------------------------------------------------------- EMA
    def setup_ema(
        self, decay: float = 0.9999, use_warmup: bool = False, device: torch.device | None = None, **kwargs: Any
    ) -> nn.Module:
        """A ``ModelEmaV3`` of the whole wrapper (branches, peers and exits averaged too, so that resuming it is
        exact); ``get_eval_model(ema=True)`` is its deployed model, the user's class."""
        self.trainable_module_ema = ModelEmaV3(
            self._wrapper(), decay=decay, use_warmup=use_warmup, device=device, **kwargs)
        if "eval_model_ema" in self._modules:  # compiled for the previous average
            del self.eval_model_ema
        return self.trainable_module_ema

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module | None:
        """What ``kdwrap.export`` returns for the wrapper (``ema=True``: for the averaged wrapper; ``None`` before
        :meth:`setup_ema`), sharing its tensors; compiled after :meth:`compile` / ``compile_ema``. ``module``:
        that of another wrapper (possibly inside DDP, ``torch.compile`` or an EMA)."""
        if module is not None:
            return _deployed_view(_as_wrapper(module))
        compiled = self._modules.get("eval_model_ema" if ema else "eval_model")
        if compiled is not None:
            return compiled
        wrapper = self._wrapper(ema)
        if wrapper is None:
            return None
        cached = self._views.get(ema)
        if cached is None or cached[0] is not wrapper:
            cached = self._views[ema] = (wrapper, _deployed_view(wrapper))
        return cached[1]

    def _wrapper(self, ema: bool = False) -> KDModel | None:
        module = self.get_trainable_module(ema=ema)
        return None if module is None else _as_wrapper(module)

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "KDTask":
        # .to() / .cuda() / .half() give the wrapper's buffers new tensors: the eval views must follow them.
        result = super()._apply(fn, *args, **kwargs)
        for wrapper, view in self.__dict__.get("_views", {}).values():
            view._apply(fn)  # tensors of the user's model that the wrapper does not hold
            _share_tensors(view, wrapper)
        return result

    # ------------------------------------------------------------------------------------------------ checkpoints
    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        """``{"method", "model": the whole wrapper's state_dict, "loss": the loss's}`` (no loss for the EMA)."""
        wrapper = _as_wrapper(module) if module is not None else self._wrapper(ema)
        if wrapper is None:
            return {}
        state = {"method": wrapper.method, "model": wrapper.state_dict()}
        if not ema:
            state["loss"] = self.loss_fn.state_dict()
        return state

    def load_task_state(
        self,
        state: dict[str, Any] | None,
        strict: bool = True,
        module: nn.Module | None = None,
        ema: bool = False,
    ) -> None:
        """Load what :meth:`get_task_state` returned: the wrapper, and (not for the EMA) the loss's state."""
        wrapper = _as_wrapper(module) if module is not None else self._wrapper(ema)
        if wrapper is None:
            raise RuntimeError("KDTask: cannot load EMA task state before setup_ema()")
        if not state or "model" not in state or (not ema and "loss" not in state):
            raise CheckpointError(
                "KDTask: this checkpoint holds no kdwrap state (its task_state: the wrapper's other branches, peers "
                "or exits, and the loss's ramp-up clock or memory bank), so it was not written by a KDTask, and "
                "resuming from it would restart them. To start from its weights instead, load them into your model "
                "before building the task (timm.create_model(..., checkpoint_path=...), train.py's "
                "--initial-checkpoint) and train without --resume"
            )
        if state.get("method") != wrapper.method:
            raise CheckpointError(
                f"KDTask: this checkpoint was written by a KDTask training kdwrap {state.get('method')!r}, but this "
                f"task trains {wrapper.method!r}; resume with the method and options it was written with"
            )
        wrapper.load_state_dict(state["model"], strict=strict)
        if not ema:
            self.loss_fn.load_state_dict(state["loss"], strict=strict)

    def load_checkpoint_state(
        self,
        state_dict: dict[str, Any],
        task_state: dict[str, Any] | None = None,
        ema: bool = False,
        strict: bool = True,
    ) -> None:
        """Load the task state (whole wrapper and loss), then ``state_dict`` into the deployed model: it holds the
        deployed weights (the same as the task state's unless edited) and any tensors the wrapper does not."""
        self.load_task_state(task_state, strict=strict, ema=ema)
        unwrap_model(self.get_eval_model(ema=ema)).load_state_dict(state_dict, strict=strict)


def _as_wrapper(module: nn.Module) -> KDModel:
    """The kdwrap wrapper inside DDP, ``torch.compile`` or a timm EMA."""
    wrapper = unwrap_model(module)
    if not isinstance(wrapper, KDModel):
        raise TypeError(f"KDTask: expected a kdwrap wrapper (possibly inside DDP, torch.compile or an EMA), got "
                        f"{type(wrapper).__name__}")
    return wrapper


def _deployed_view(wrapper: KDModel) -> nn.Module:
    """``kdwrap.export(wrapper)``, the user's class, holding the wrapper's own tensors instead of copies."""
    view = wrapper.export()
    _share_tensors(view, wrapper)
    return view


def _share_tensors(view: nn.Module, wrapper: KDModel) -> None:
    """Make each parameter and buffer of ``view`` the tensor of the same key in the wrapper's deployed pieces."""
    own = view.state_dict(keep_vars=True)
    for piece in DEPLOYED_PIECES[wrapper.method](wrapper):
        for key, tensor in piece.state_dict(keep_vars=True).items():
            if key not in own or not isinstance(tensor, torch.Tensor):
                continue  # non-persistent attributes of a traced piece, extra state
            owner, _, name = key.rpartition(".")
            module = view.get_submodule(owner)
            slots = module._parameters if name in module._parameters else module._buffers
            slots[name] = tensor


def _classifier_names(net: nn.Module) -> list[str]:
    """The names of ``net``'s classifier parameters: those of the module(s) its ``get_classifier()`` returns (timm
    models), else its last two parameters, the rule timm's ``get_clip_parameters`` applies to a plain model."""
    get = getattr(net, "get_classifier", None)
    heads = get() if callable(get) else None
    heads = heads if isinstance(heads, (tuple, list)) else [heads]
    ids = {id(h) for h in heads if isinstance(h, nn.Module)}
    names = [f"{path}.{name}" if path else name
             for path, module in net.named_modules() if id(module) in ids
             for name, _ in module.named_parameters()]
    return names or [name for name, _ in net.named_parameters()][-2:]


def _forward_no_weight_decay(wrapper: KDModel, net: nn.Module) -> None:
    """Give the wrapper the no-weight-decay list of the user's model ``net`` (a ViT's position embedding and class
    token), under the wrapper's names of those parameters in every copy (trunk, branches, peers): timm's
    ``create_optimizer_v2`` reads ``no_weight_decay()`` off the model it is given, the wrapper."""
    if not callable(getattr(net, "no_weight_decay", None)):
        return
    patterns = list(net.no_weight_decay())
    names = set()
    for name, _ in wrapper.named_parameters():
        parts = name.split(".")  # the wrapper's prefix ("trunk", "branches.1", "peers.0", ...) comes first
        suffixes = (".".join(parts[i:]) for i in range(1, len(parts)))
        if any(fnmatch.fnmatch(suffix, pattern) for suffix in suffixes for pattern in patterns):
            names.add(name)
    wrapper.no_weight_decay = lambda: set(names)


def _resolve_criterion(criterion: nn.Module | None, criterion_kwargs: dict[str, Any] | None) -> nn.Module | None:
    if criterion is not None and criterion_kwargs:
        raise ValueError(f"KDTask: pass either a criterion or criterion_kwargs, not both: {sorted(criterion_kwargs)}")
    if criterion is None and criterion_kwargs:
        from timm.loss import create_classification_loss

        return create_classification_loss(**criterion_kwargs)
    return criterion


def _label_smoothing(criterion: nn.Module | None) -> float:
    """The label smoothing of ``criterion`` if it is a cross-entropy kdwrap's losses compute, else a TypeError."""
    if criterion is None or type(criterion) is SoftTargetCrossEntropy:
        return 0.0
    if type(criterion) is LabelSmoothingCrossEntropy:
        return float(criterion.smoothing)
    if type(criterion) is nn.CrossEntropyLoss and criterion.weight is None and criterion.reduction == "mean":
        return float(criterion.label_smoothing)
    raise TypeError(
        f"KDTask: kdwrap's losses compute their own cross-entropy terms, so the criterion can only say which "
        f"cross-entropy: None, nn.CrossEntropyLoss() (no class weights, mean reduction), SoftTargetCrossEntropy() "
        f"(Mixup/CutMix) or label smoothing (LabelSmoothingCrossEntropy(s), nn.CrossEntropyLoss(label_smoothing=s)); "
        f"got {criterion!r}. Train with one of those (train.py: without --bce-loss and --jsd-loss)"
    )
