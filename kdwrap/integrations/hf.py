"""A Hugging Face ``Trainer`` that trains a kdwrap model with its kdwrap loss (``pip install kdwrap[hf]``).

    model, loss_fn = kdwrap.osakd(net, output="logits")   # net: a timm model or an HF image classifier
    trainer = KDTrainer(model=model, kd_loss=loss_fn, args=TrainingArguments(...), train_dataset=dataset)
    trainer.train()
    deployed = trainer.save_exported("deployed")          # the user's class; HF models via save_pretrained

See docs/integrations.md for the complete recipe.
"""
from __future__ import annotations

import inspect
import os
from typing import Any

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
from ..base import KDLoss, select_logits, unwrap

__all__ = ["KDTrainer", "LOSS_STATE_FILE", "DEPLOYED_FILE"]

# Written into every checkpoint folder beside the Trainer's own files: ONE's ramp-up clock or OSAKD's memory bank,
# which live in the loss, not in the model the Trainer saves.
LOSS_STATE_FILE = "kdwrap_loss.pt"
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
    bank) in :data:`LOSS_STATE_FILE`, and ``train(resume_from_checkpoint=...)`` restores it. Evaluation reports
    the cross-entropy of the deployed model's logits (the loss's eval-mode value). :meth:`save_exported` writes the
    deployable model at the end.

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
            net = _user_net(self.kd_loss)
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
            path = os.path.join(output_dir or self.args.output_dir, LOSS_STATE_FILE)
            torch.save(self.kd_loss.state_dict(), path)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, LOSS_STATE_FILE)
        if not os.path.isfile(path):
            # Resuming without it would silently restart ONE's ramp-up or empty OSAKD's bank.
            raise FileNotFoundError(
                f"KDTrainer: the checkpoint {resume_from_checkpoint} holds no kdwrap loss state ({LOSS_STATE_FILE}), "
                "so it was not written by KDTrainer; resume from a KDTrainer checkpoint, or load the weights into "
                "the model yourself and call train() without resume_from_checkpoint"
            )
        self.kd_loss.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=True))

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


def _user_net(kd_loss: KDLoss) -> nn.Module | None:
    """The user's own net inside a kdwrap model: OSAKD keeps it as ``.model``; ONE keeps the original outside
    its module tree."""
    model = kd_loss.model
    net = model.__dict__.get("_original", getattr(model, "model", None))
    return net if isinstance(net, nn.Module) else None
