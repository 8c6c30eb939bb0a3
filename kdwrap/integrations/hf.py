"""A Hugging Face ``Trainer`` that trains a kdwrap model with its kdwrap loss (``pip install kdwrap[hf]``).

    model, loss_fn = kdwrap.osakd(net, output="logits")   # net: a timm model or an HF image classifier
    trainer = KDTrainer(model=model, kd_loss=loss_fn, args=TrainingArguments(...), train_dataset=dataset)
    trainer.train()
    deployed = trainer.save_exported("deployed")          # the user's class; HF models via save_pretrained

See docs/integrations.md for the complete recipe.
"""
from __future__ import annotations

import inspect
import json
import os
from typing import Any, Sequence

import torch
from torch import nn

try:
    import transformers
    from transformers import Trainer
except ImportError as err:  # transformers missing, or its Trainer missing accelerate
    raise ImportError(
        f"kdwrap.integrations.hf needs Hugging Face transformers and accelerate ({err}); kdwrap does not install "
        "them by default: pip install kdwrap[hf]"
    ) from err

# Earlier Trainers do not divide a custom loss by the gradient accumulation steps (tested: 4.46.3 does not,
# 4.48.3 does), so accumulated gradients would come out that many times too large.
if tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit()) < (4, 48):
    raise ImportError(
        f"kdwrap.integrations.hf needs transformers >= 4.48, found {transformers.__version__} (earlier Trainers do "
        "not scale a custom loss for gradient accumulation): pip install -U kdwrap[hf]"
    )

from ..api import export
from ..base import KDLoss, KDModel, select_logits, unwrap
from ..errors import CheckpointError

__all__ = ["KDTrainer", "LOSS_STATE_FILE", "RUN_FILE", "DEPLOYED_FILE"]

# Written into every checkpoint folder beside the Trainer's own files: ONE's ramp-up clock or OSAKD's memory bank,
# which live in the loss, not in the model the Trainer saves.
LOSS_STATE_FILE = "kdwrap_loss.pt"
# Also written there: which wrapper the checkpoint holds (method, network, loss), so that resuming another run's
# checkpoint fails naming both runs.
RUN_FILE = "kdwrap_run.json"
# save_exported's file for a model that has no save_pretrained (timm and plain PyTorch models): its state_dict.
DEPLOYED_FILE = "deployed.pt"


class KDTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is a kdwrap loss: ``kd_loss(model(x), labels)``.

    Pass the kdwrap model as ``model`` and its loss as ``kd_loss``; every other argument is the Trainer's. Each
    batch is a dict (``default_data_collator`` builds one from ``{"pixel_values": ..., "labels": ...}`` samples):
    ``batch[input_key]`` goes to the model as its first positional argument, so the same batches serve a timm
    model (``forward(x)``) and an HF image classifier (``forward(pixel_values, ...)``); the labels go to the loss,
    never to the model (an HF model would compute a loss of its own); any other key goes to the model as a keyword.
    An HF classifier returns an output object: wrap it with ``output="logits"``, e.g.
    ``kdwrap.osakd(net, output="logits")`` (every method takes it).

    Gradient accumulation: kdwrap's losses are batch means, so the Trainer divides each micro-batch's loss by
    ``gradient_accumulation_steps``, as the plain-PyTorch recipe of docs/training.md does; ``num_items_in_batch``
    (a token count, for language models) is not needed. ONE's ``accumulation_steps`` must equal the Trainer's, so
    that its ramp-up clock counts optimizer steps.

    Checkpoints: each checkpoint folder also holds ``kd_loss.state_dict()`` (ONE's ramp-up clock, OSAKD's memory
    bank) in :data:`LOSS_STATE_FILE` and what it holds (method, network, loss) in :data:`RUN_FILE`;
    ``train(resume_from_checkpoint=...)`` restores the loss's state, and refuses a checkpoint of another wrapper
    (another method, network or configuration: a second run sharing the first one's ``output_dir``) with a
    :class:`kdwrap.CheckpointError` naming both. Evaluation reports the cross-entropy of the
    deployed model's logits (the loss's eval-mode value). :meth:`save_exported` writes the deployable model at the
    end. ``label_smoothing_factor`` is refused: the kdwrap loss takes the labels as they are (pass soft targets to
    smooth them).

    Args:
        kd_loss: the loss returned with ``model`` by ``kdwrap.one`` / ``osakd`` / ``wrap``.
        input_key: the batch key of the images (default ``"pixel_values"``, what HF image processors produce).
    """

    # Tells Trainer.training_step to divide the loss by the accumulation steps (transformers >= 5 reads this
    # attribute; earlier versions decide from model_accepts_loss_kwargs, set in __init__).
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, kd_loss: KDLoss, input_key: str = "pixel_values", **kwargs: Any) -> None:
        if not isinstance(kd_loss, KDLoss):
            raise TypeError(
                f"KDTrainer: kd_loss must be the loss returned by kdwrap.one/osakd/wrap, got {type(kd_loss).__name__}"
            )
        model = kwargs.get("model", args[0] if args else None)
        if model is None or unwrap(model) is not kd_loss.model:
            raise ValueError(
                "KDTrainer: model must be the kdwrap model returned together with kd_loss: "
                "model, loss_fn = kdwrap.osakd(net); KDTrainer(model=model, kd_loss=loss_fn, ...)"
            )
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if getattr(training_args, "label_smoothing_factor", 0):
            raise ValueError(
                "KDTrainer: label_smoothing_factor is not applied to a kdwrap loss (it takes the labels as they are); "
                "set it to 0, and pass smoothed labels as soft targets if you want them: (B, C) probabilities"
            )
        self.kd_loss = kd_loss
        self.input_key = input_key
        super().__init__(*args, **kwargs)
        # The Trainer reads the label names and whether the model takes loss keywords off the forward's
        # signature; the wrapper's is (x, *args, **kwargs), which says neither.
        if self.args.label_names is None:
            self.label_names = ["labels"]
        self.model_accepts_loss_kwargs = False
        steps = getattr(kd_loss, "accumulation_steps", None)
        if steps is not None and steps != self.args.gradient_accumulation_steps:
            raise ValueError(
                f"KDTrainer: the ONE loss counts accumulation_steps={steps}, but the Trainer accumulates "
                f"gradient_accumulation_steps={self.args.gradient_accumulation_steps}; build the wrapper with "
                f"kdwrap.one(net, ..., accumulation_steps={self.args.gradient_accumulation_steps}) so that the "
                "ramp-up clock counts optimizer steps"
            )
        kd_loss.to(self.args.device)  # OSAKD's bank lives with the model's outputs

    def _set_signature_columns_if_needed(self) -> None:
        # With remove_unused_columns (the default) the Trainer keeps only the columns the model's forward names;
        # the wrapper's forward names none of the batch's, so keep the images, the labels, and the net's keywords.
        if self._signature_columns is None:
            net = _user_network(self.kd_loss.model)
            names = list(inspect.signature(net.forward).parameters) if net is not None else []
            self._signature_columns = [self.input_key, "label", "label_ids", *self.label_names, *names]

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``kd_loss(model(inputs[input_key], **other_inputs), labels)``; with ``return_outputs``, also
        ``{"logits": ...}`` (the deployed model's logits) for evaluation. ``num_items_in_batch`` is unused: the
        loss is a batch mean, which the Trainer scales for gradient accumulation."""
        inputs = dict(inputs)
        label_key = self.label_names[0] if self.label_names else "labels"
        if label_key not in inputs:
            raise KeyError(
                f"KDTrainer: the batch has no {label_key!r} (its keys: {sorted(inputs)}); kdwrap's loss needs the "
                "labels: give each sample a 'labels' (or 'label') entry, or set TrainingArguments(label_names=[...])"
            )
        if self.input_key not in inputs:
            raise KeyError(
                f"KDTrainer: the batch has no {self.input_key!r} (its keys: {sorted(inputs)}); pass "
                "KDTrainer(..., input_key=<the key of the images>)"
            )
        labels = inputs.pop(label_key)
        x = inputs.pop(self.input_key)
        outputs = model(x, **inputs)
        loss = self.kd_loss(outputs, labels)
        if return_outputs:
            wrapped = self.kd_loss.model
            return loss, {"logits": select_logits(outputs, getattr(wrapped, "output", None), wrapped.method)}
        return loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            output_dir = output_dir or self.args.output_dir
            torch.save(self.kd_loss.state_dict(), os.path.join(output_dir, LOSS_STATE_FILE))
            with open(os.path.join(output_dir, RUN_FILE), "w") as f:
                json.dump(_describe(self.kd_loss), f, indent=1)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # The Trainer loads the weights with strict=False: another run's checkpoint would load next to nothing, with
        # a logged warning, and training would go on from fresh weights. So the run file and the parameter names
        # are checked, the run file before the load (another method's tensors may not even fit), the names after it
        # (the wrapper's own load check, e.g. ONE's branches and split, names the settings to rebuild with).
        mine = _describe(self.kd_loss)
        theirs = _read_run_file(resume_from_checkpoint)
        keys = _checkpoint_keys(resume_from_checkpoint)
        differ = sorted(keys ^ set(unwrap(self.model).state_dict())) if keys is not None else []
        if theirs is not None and theirs != mine:
            raise self._foreign(resume_from_checkpoint, _wording(theirs))
        if theirs is None and differ:  # written before the run file existed
            raise self._foreign(resume_from_checkpoint, "another model", differ)
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if differ:
            raise self._foreign(resume_from_checkpoint, f"{_wording(theirs)} with other settings", differ)
        path = os.path.join(resume_from_checkpoint, LOSS_STATE_FILE)
        if not os.path.isfile(path):
            # Resuming without it would silently restart ONE's ramp-up or empty OSAKD's bank.
            raise FileNotFoundError(
                f"KDTrainer: the checkpoint {resume_from_checkpoint} holds no kdwrap loss state ({LOSS_STATE_FILE}), "
                "so it was not written by KDTrainer; resume from a KDTrainer checkpoint, or load the weights into "
                "the model yourself and call train() without resume_from_checkpoint"
            )
        self.kd_loss.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=True))

    def _foreign(self, checkpoint: str, what: str, differ: Sequence[str] = ()) -> CheckpointError:
        detail = f" ({len(differ)} parameter names differ, e.g. {', '.join(differ[:3])})" if differ else ""
        return CheckpointError(
            f"KDTrainer: the checkpoint {checkpoint} holds {what}{detail}, but this trainer trains "
            f"{_wording(_describe(self.kd_loss))}; resume from a checkpoint of this run, built with the same "
            "settings (give each run its own output_dir: resume_from_checkpoint=True takes the last checkpoint in "
            "it), or train without resume_from_checkpoint"
        )

    def save_exported(self, output_dir: str | None = None, **export_options: Any) -> nn.Module:
        """Export the deployable model (``kdwrap.export(self.model, **export_options)``), write it to
        ``output_dir`` (default ``args.output_dir``) and return it.

        An HF model (one with ``save_pretrained``) is written with ``save_pretrained``, so ``from_pretrained``
        loads it; any other model (timm, plain PyTorch) as its ``state_dict`` in :data:`DEPLOYED_FILE`, which
        loads into a fresh instance of its class (``timm.create_model(name, num_classes=...)``; kdwrap's own
        models need ``import kdwrap.models`` first). Only the main process writes; every process gets the model.
        """
        deployed = export(self.model, **export_options)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            if hasattr(deployed, "save_pretrained"):
                deployed.save_pretrained(output_dir)
            else:
                torch.save(deployed.state_dict(), os.path.join(output_dir, DEPLOYED_FILE))
        return deployed


def _user_network(model: KDModel) -> nn.Module | None:
    """The wrapped network, or None for a method registered from outside that does not name it."""
    try:
        return model.user_network
    except NotImplementedError:
        return None


def _describe(kd_loss: KDLoss) -> dict[str, str]:
    """What a checkpoint of this wrapper holds, as :data:`RUN_FILE` records it."""
    net = _user_network(kd_loss.model)
    return {"method": kd_loss.model.method, "network": type(net).__name__ if net is not None else "unknown",
            "loss": type(kd_loss).__name__}


def _read_run_file(folder: str) -> dict[str, Any] | None:
    path = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _wording(run: dict[str, Any]) -> str:
    return f"a kdwrap {run.get('method')} wrapper of a {run.get('network')} (loss {run.get('loss')})"


def _checkpoint_keys(folder: str) -> set[str] | None:
    """The parameter and buffer names of the model saved in a Trainer checkpoint folder; ``None`` where it is not
    saved as one file or an index (FSDP shards, adapters)."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    path = os.path.join(folder, SAFE_WEIGHTS_NAME)
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return set(f.keys())
    path = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(path):
        return set(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    for index in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        path = os.path.join(folder, index)
        if os.path.isfile(path):
            with open(path) as f:
                return set(json.load(f)["weight_map"])
    return None
