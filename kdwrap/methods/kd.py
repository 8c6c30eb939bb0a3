"""KD: classic knowledge distillation from a frozen teacher (Hinton, Vinyals, Dean 2015).

Offline, not online: the teacher is trained beforehand and never changes. It is here because every comparison of
online methods has it as a baseline, and it fits the same two-line change of a training loop:

    L = (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL( softmax_T(sg(z_t)) || softmax_T(z_s) )

``alpha`` weighs the distillation term (Hinton's and RepDistiller's convention; torchdistill's ``KDLoss`` puts it
on the cross-entropy term instead, and OSAKD's ``alpha`` in kdwrap weighs cross-entropy too). See docs/methods.md.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._deploy import deployable_copy
from ..base import (
    EVAL_CAPTURE, KDLoss, KDModel, check_logits, check_output_option, count_parameters, route_options, select_logits,
)
from .losses import check_fraction, check_temperature, softened_kl
from .registry import check_net, entry_point

__all__ = ["kd", "HintonKDModel", "HintonKDLoss", "build_kd"]



def _logits(out: Any, who: str) -> torch.Tensor:
    hint = f"; KD needs classifiers that return them (wrap a {who} whose forward returns the logits tensor)"
    return check_logits(out, "kd", f"the {who} returned", hint)


def _declared_classes(net: nn.Module) -> int | None:
    n = getattr(net, "num_classes", None)  # timm models and many hand-written ones say it
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _class_mismatch(teacher: int, student: int) -> ValueError:
    return ValueError(
        f"kdwrap kd: the teacher predicts {teacher} classes but the student {student}; the teacher's soft labels "
        "must be over the student's classes: use a teacher trained on the same label set (same num_classes)"
    )


class HintonKDModel(KDModel):
    """The user's student (``self.student``) and a frozen teacher. ``forward`` returns the student's logits.

    In training mode the teacher runs too (under ``torch.no_grad``, in eval mode) and its logits are captured for
    :class:`HintonKDLoss`; in eval mode only the student runs, so eval accuracy is the deployed model's accuracy.

    The teacher is frozen in place (``requires_grad_(False)``, ``eval()``) and held outside the module tree: it is
    not in ``parameters()`` (so never in the optimizer), not in ``state_dict()`` (a checkpoint holds the student
    under ``student.*``; rebuild the wrapper with the same teacher to resume), ``train()`` leaves it in eval mode,
    and ``.to()`` / ``.cuda()`` / ``.half()`` move it with the student.

    Args:
        output: index, key or field of the logits when the student returns a tuple, dict or namedtuple (an HF
            classifier's ``ImageClassifierOutput``: ``"logits"``). ``model(x)`` then returns the logits tensor;
            ``export`` returns the student as it is, outputs and all.
        teacher_output: the same for the teacher (default: ``output``; a teacher that returns a tensor needs
            none).
    """

    method = "kd"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        output: int | str | None = None,
        teacher_output: int | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"kdwrap kd: the teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if teacher is student:
            raise ValueError(
                "kdwrap kd: the teacher is the student itself; pass a separately trained teacher model "
                "(for distillation without a teacher use kdwrap.one, kdwrap.osakd or kdwrap.dml)"
            )
        if isinstance(teacher, KDModel):
            raise ValueError(
                f"kdwrap kd: the teacher is a kdwrap {teacher.method} wrapper; pass the plain model: "
                "kdwrap.kd(student, kdwrap.export(teacher_wrapper))"
            )
        n_teacher, n_student = _declared_classes(teacher), _declared_classes(student)
        if n_teacher is not None and n_student is not None and n_teacher != n_student:
            raise _class_mismatch(n_teacher, n_student)
        self.student = student
        self.output = check_output_option("kd", output)
        self.teacher_output = check_output_option("kd", teacher_output, "teacher_output")
        if self.teacher_output is None:  # a teacher of the student's family returns the same container
            self.teacher_output = self.output
        teacher.requires_grad_(False)
        # Not a submodule: outside parameters() and state_dict(); _apply and train keep it moved and in eval mode.
        self.__dict__["_teacher"] = teacher.eval()
        # The loss's options, set by build_kd for summary(); not "config": HF's Trainer reads model.config.
        self.loss_options: dict[str, Any] = {}
        self._follow_mode(student)

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (eval mode, no gradients)."""
        return self.__dict__["_teacher"]

    def train(self, mode: bool = True) -> "HintonKDModel":
        """Set the student's mode; the teacher stays in eval mode (its BatchNorm statistics and dropout are part
        of what was trained)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> "HintonKDModel":
        # .to(), .cuda(), .half(), ... go through _apply: the teacher must follow the student's device and dtype.
        super()._apply(fn, recurse)
        self.teacher._apply(fn, recurse)
        return self

    @property
    def user_network(self) -> nn.Module:
        """The student: the network the user wrapped."""
        return self.student

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The student's logits. Training: the teacher's logits on the same input are captured for the loss."""
        z = select_logits(self.student(x, *args, **kwargs), self.output, "kd", "the student")
        if not self.training:
            self.put_capture(EVAL_CAPTURE)
            return z
        _logits(z, "student")
        with torch.no_grad():
            t = self.teacher(x, *args, **kwargs)
            t = _logits(select_logits(t, self.teacher_output, "kd", "the teacher", "teacher_output"), "teacher")
        if t.shape[-1] != z.shape[-1]:
            raise _class_mismatch(t.shape[-1], z.shape[-1])
        self.put_capture(t)
        return z

    def export(self, copy_model: bool = True, **kwargs: Any) -> nn.Module:
        """The student, the user's own class with its original ``state_dict`` keys: a deep copy
        (``copy_model=False``: the student itself, sharing its parameters with this wrapper). Keeps the
        wrapper's train/eval mode; gradients are dropped. The teacher is not part of it."""
        if kwargs:
            raise TypeError(
                f"KD export() got unexpected options {sorted(kwargs)}: KD deploys the student, so there is no "
                "branch or peer to choose; valid options: copy_model"
            )
        return deployable_copy(self.student) if copy_model else self.student

    def summary(self, **kwargs: Any) -> str:
        """A description of the wrapper (options such as ``input_size`` are accepted and ignored: KD adds no
        layer to the student, so the deployed model is the trained one)."""
        cfg = self.loss_options
        lines = [
            "kdwrap KD (knowledge distillation from a frozen teacher)",
            f"  student: {type(self.student).__name__}, {count_parameters([self.student]):,} parameters; "
            "export() returns it",
            f"  teacher: {type(self.teacher).__name__}, {count_parameters([self.teacher]):,} parameters, frozen "
            "(eval mode, no gradients; not in parameters() or state_dict())",
        ]
        if self.output is not None or self.teacher_output is not None:
            lines.append(f"  logits: element {self.output!r} of the student's output, {self.teacher_output!r} of "
                         "the teacher's")
        if cfg:
            alpha, T = cfg["alpha"], cfg["temperature"]
            lines.append(
                f"  loss: {1 - alpha:g} * CE(z_s, y) + {alpha:g} * T^2 * KL(softmax_T(z_t) || softmax_T(z_s)), "
                f"T = {T:g}"
            )
        lines.append(
            "  cost: one teacher forward (no backward) per training step (measured step times: docs/methods.md)")
        return "\n".join(lines)


class HintonKDLoss(KDLoss):
    """``(1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(softmax_T(z_t) || softmax_T(z_s))``, KL averaged over the batch.

    Call it once per training forward with the forward's output (the student's logits) and the labels; the
    teacher's logits come from that forward's capture. After an eval-mode forward it returns plain cross-entropy
    of the given logits, so validation loops that reuse the criterion keep working. ``target``: int class indices
    ``(B,)`` or float soft targets ``(B, C)`` (mixup/cutmix), which the CE term takes as probabilities.
    ``parts``: detached ``"loss"``, ``"ce"``, ``"kl"`` (the KL term with its ``T^2``, before ``alpha``).

    Args:
        temperature: ``T`` of the softened softmax (default 4, RepDistiller's CIFAR setting).
        alpha: weight of the distillation term; ``1 - alpha`` weighs cross-entropy (default 0.9). This is the
            Hinton / RepDistiller convention; torchdistill's ``KDLoss`` (and OSAKD's ``alpha``) weigh
            cross-entropy instead. ``alpha=0`` is plain cross-entropy.
        check_finite: stop with a ``FloatingPointError`` naming the step at the first NaN/Inf in the student's
            logits (one host sync per step).
    """

    def __init__(
        self, model: HintonKDModel, *, temperature: float = 4.0, alpha: float = 0.9, check_finite: bool = False
    ) -> None:
        super().__init__(model, check_finite)
        self.temperature = check_temperature("kd", temperature)
        self.alpha = check_fraction(
            "kd", "alpha", alpha, "it weighs the distillation term against cross-entropy (default 0.9)"
        )

    def config(self) -> dict[str, Any]:
        """The options in force, as ``summary()`` prints them."""
        return {"temperature": self.temperature, "alpha": self.alpha}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, step={self.step}"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The KD loss of the preceding training forward; cross-entropy after an eval forward."""
        target, capture = self._take_checked_capture(logits, target)
        if capture is None:
            return self._eval_cross_entropy(logits, target)
        self._check_same_shape(logits, capture)
        # float32 softmax and CE even under autocast.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            z = logits.float()
            ce = F.cross_entropy(z, target)
            self._stop_if_not_finite(z, "student logits")
            kl = softened_kl(z, capture.float(), self.temperature)
            loss = (1.0 - self.alpha) * ce + self.alpha * kl
        self.step += 1
        self.parts = {"loss": loss.detach(), "ce": ce.detach(), "kl": kl.detach()}
        return loss


def build_kd(student: nn.Module, teacher: nn.Module, **options: Any) -> tuple[HintonKDModel, HintonKDLoss]:
    """Wrap ``student`` for KD from ``teacher``. Returns ``(model, loss_fn)``; use ``loss = loss_fn(model(x), y)``.

    Each option goes, unchanged, to the class that owns it: ``temperature``, ``alpha`` and ``check_finite`` to
    :class:`HintonKDLoss`, ``output`` and ``teacher_output`` to :class:`HintonKDModel`; their docstrings document
    them. An unknown option raises :class:`kdwrap.OptionError` listing the valid ones.
    """
    loss_options, model_options = route_options("kd", options, HintonKDLoss, HintonKDModel)
    model = HintonKDModel(student, teacher, **model_options)
    loss_fn = HintonKDLoss(model, **loss_options)
    model.loss_options = loss_fn.config()
    return model, loss_fn


@entry_point("kd", check=False)
def kd(student: nn.Module, teacher: nn.Module | None = None, **kwargs: Any) -> tuple[KDModel, KDLoss]:
    """Wrap ``student`` for KD (Hinton et al.) from a trained, frozen ``teacher``. Returns ``(model, loss_fn)``.

    Options (``temperature``, ``alpha``, ``output``, ...): see :class:`kdwrap.methods.kd.HintonKDLoss` and
    :class:`kdwrap.methods.kd.HintonKDModel`; an unknown one raises :class:`OptionError` listing the valid ones.
    The teacher is not in ``model.parameters()`` nor in ``model.state_dict()``: to resume, rebuild the wrapper
    with the same teacher, then load the checkpoint.
    """
    if teacher is None:
        raise TypeError(
            "kdwrap kd needs a trained teacher: kdwrap.kd(student, teacher) or kdwrap.wrap(student, method='kd', "
            "teacher=teacher), the teacher loaded from its checkpoint"
        )
    check_net(student)
    return build_kd(student, teacher, **kwargs)
