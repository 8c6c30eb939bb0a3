"""OSAKD: Online Self-Acquired Knowledge Distillation (Tzelepi & Tefas, arXiv 2108.11798).

No architecture change. Each training step, the soft label of a sample is the k-NN estimate of its class posterior
in the network's output space (softmax probabilities ``p``), with neighbours taken from a memory bank of recent
detached outputs plus the current batch (never the sample itself). See docs/osakd.md.

    L = alpha * CE(z, y) + (1 - alpha) * MSE(p, s)      # MSE summed over classes, averaged over the batch
"""
from __future__ import annotations

import numbers
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._deploy import deployable_copy
from .._timing import median_ms, timing_may_decide
from ..base import EVAL_CAPTURE, KDLoss, KDModel, check_output_option, check_target, route_options, select_logits
from ..knn import BACKENDS, DISTANCES, faiss_available, knn_soft_labels, resolve_backend
from ..memory_bank import MemoryBank
from .registry import entry_point

__all__ = ["osakd", "DEFAULT_ALPHA", "DISTILL", "OSAKDModel", "OSAKDLoss", "build_osakd", "distill_gradient_ratio",
           "soft_label_diagnostics"]

DISTILL = ("mse", "kl")
# The weight of CE, the paper's. A lower alpha looked like a gain on CIFAR-10, but plain training at the same
# lower CE weight (a smaller learning rate) gained as much: it scales the user's step size, not the distillation
# (docs/results.md, "OSAKD's alpha").
DEFAULT_ALPHA = 0.9

# Stored in the bank in place of a non-finite output (an fp16 overflow step GradScaler will skip): far from every
# probability vector in L2, and at cosine distance > 1 from every non-negative vector, so never a neighbour while
# k valid points exist.
_FAR = -1e4


class OSAKDModel(KDModel):
    """The user's net, unchanged (``self.model``). ``forward`` returns exactly what the net returns, and records a
    capture so the loss can check it is called once per forward (and whether that forward was in eval mode).

    Args:
        output: index or key of the logits when ``net`` returns a tuple/dict (e.g. Inception's aux outputs).
    """

    method = "osakd"

    def __init__(self, net: nn.Module, *, output: int | str | None = None) -> None:
        super().__init__()
        self.model = net
        self.output = check_output_option("osakd", output)
        # The loss's options, set by build_osakd for summary(); not "config": HF's Trainer reads model.config.
        self.loss_options: dict[str, Any] = {}
        self._follow_mode(net)

    @property
    def user_network(self) -> nn.Module:
        """The network the user wrapped, unchanged."""
        return self.model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Exactly what the wrapped net returns; it also records a capture for the loss."""
        out = self.model(*args, **kwargs)
        self.put_capture(tuple(select_logits(out, self.output, "osakd").shape) if self.training else EVAL_CAPTURE)
        return out

    def export(self, copy_model: bool = True, **kwargs: Any) -> nn.Module:
        """The original net, with no kdwrap hook or reference: a deep copy (``copy_model=False``: the net itself,
        sharing its parameters with this wrapper). Keeps the wrapper's train/eval mode; gradients are dropped."""
        if kwargs:
            raise TypeError(
                f"OSAKD export() got unexpected options {sorted(kwargs)}: OSAKD keeps one unchanged model, "
                "so there is no branch or ensemble to choose; valid options: copy_model"
            )
        return deployable_copy(self.model) if copy_model else self.model

    def summary(self, **kwargs: Any) -> str:
        """A description of the wrapper (options such as ``input_size`` are accepted and ignored: OSAKD adds no
        layer, so the deployed model is the trained one)."""
        n_params = sum(p.numel() for p in self.model.parameters())
        cfg = self.loss_options
        lines = [
            "kdwrap OSAKD (Online Self-Acquired Knowledge Distillation)",
            f"  model: {type(self.model).__name__}, {n_params:,} parameters, unchanged; export() returns it as is",
        ]
        if self.output is not None:
            lines.append(f"  logits: element {self.output!r} of the model's output")
        if cfg:
            distill = "MSE(p, s)" if cfg["distill"] == "mse" else "KL(s || p)"
            bank = (
                f"{cfg['bank_size']:,} most recent (p, label) pairs, in loss_fn.state_dict(); "
                f"batch alone until it holds {cfg['k']}"
                if cfg["bank_size"]
                else "none (in-batch mode: neighbours from the current batch only)"
            )
            lines += [
                f"  loss: {cfg['alpha']:g} * CE(z, y) + {1 - cfg['alpha']:g} * {distill}, p = softmax(z)",
                f"  soft labels s: {cfg['k']}-NN class posterior in output space ({cfg['distance']} distance), "
                f"backend {cfg['backend']} -> {cfg['resolved_backend']}",
                f"  bank: {bank}",
            ]
        lines.append("  cost: no extra forward/backward FLOPs; one k-NN search per training step")
        return "\n".join(lines)


class OSAKDLoss(KDLoss):
    """``alpha * CE(z, y) + (1 - alpha) * D(p, s)`` with ``s`` the k-NN soft labels (a constant).

    After a training-mode forward: consumes that forward's capture, computes ``s`` from the bank (once it holds >= k
    entries) plus the batch, then adds the batch's detached ``p`` and labels to the bank. After an eval-mode
    forward: plain cross-entropy of the given logits, bank untouched.

    ``target``: int class indices ``(B,)`` in ``[0, C)``, or float soft targets ``(B, C)`` (mixup/cutmix): the CE
    term uses them as probabilities and the k-NN labels of the batch (and the bank) are their argmax.
    ``parts``: detached ``"loss"``, ``"ce"``, ``"distill"``, ``"bank_fill"``, the soft labels' distance from the
    hard ones, ``"soft_true_mass"`` and ``"soft_one_hot"`` (:func:`soft_label_diagnostics`), and how strongly they
    act, ``"distill_grad_ratio"`` (:func:`distill_gradient_ratio`); eval: ``"loss"``, ``"ce"`` and ``"bank_fill"``.
    ``soft_labels``: the ``B x C`` soft labels ``s`` of the last training step (detached), for inspection.

    Args:
        k: neighbours per soft label (paper: 8, or 16 for Tiny-ImageNet).
        alpha: weight of CE; ``1 - alpha`` weighs the distillation term (default 0.9, the paper's; 0.99 for 200
            classes). ``alpha=1`` is exactly cross-entropy. A lower alpha also lowers the effective learning rate
            of the CE term: compare it with plain training at ``alpha`` times the learning rate.
        bank_size: entries of the memory bank of recent outputs (0: the paper's in-batch mode; else >= k).
        backend: k-NN backend, ``"torch"``, ``"faiss"`` (see :mod:`kdwrap.knn`) or ``"auto"`` (default): torch,
            except on the CPU with faiss installed, where the faster of the two on the step's shapes is used, timed
            once when the bank is full (see :attr:`backend_timings`).
        distance: ``"l2"`` (Euclidean, the paper's) or ``"cosine"`` between probability vectors.
        distill: ``"mse"`` (summed over classes, batch mean) or ``"kl"`` (``KL(s || p)``, batchmean).
        check_finite: stop with a ``FloatingPointError`` naming the step at the first NaN/Inf logits (one host
            sync per step). Off: a non-finite output never enters the bank as a neighbour, and the loss is NaN.
    """

    def __init__(
        self,
        model: OSAKDModel,
        *,
        k: int = 8,
        alpha: float = DEFAULT_ALPHA,
        bank_size: int = 16384,
        backend: str = "auto",
        distance: str = "l2",
        distill: str = "mse",
        check_finite: bool = False,
    ) -> None:
        super().__init__(model, check_finite)
        k = _check_int("k", k, 1, "use k >= 1 neighbours (the paper uses 8 or 16)")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise TypeError(f"kdwrap osakd: alpha must be a float in [0, 1], got {type(alpha).__name__} {alpha!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(
                f"kdwrap osakd: alpha={alpha} is outside [0, 1]; it weighs CE against the distillation term "
                f"(default {DEFAULT_ALPHA}, the paper's)"
            )
        bank_size = _check_int(
            "bank_size", bank_size, 0, "use 0 for in-batch mode (no bank) or a positive size such as 16384"
        )
        if 0 < bank_size < k:
            raise ValueError(
                f"kdwrap osakd: bank_size={bank_size} is smaller than k={k}, so the bank could never supply k "
                f"neighbours; use bank_size=0 (in-batch mode) or bank_size >= {k}"
            )
        _check_choice("backend", backend, BACKENDS)
        _check_choice("distance", distance, DISTANCES)
        _check_choice("distill", distill, DISTILL)
        resolve_backend(backend)  # raises the install hint now, not at the first step
        self.resolved_backend = (
            "torch; on the CPU with faiss installed, the faster of torch and faiss, timed once the bank is full"
            if backend == "auto" else backend
        )
        self.k = k
        self.alpha = float(alpha)
        self.backend = backend
        self.distance = distance
        self.distill = distill
        self.chunk_size: int | None = None  # forwarded to the torch k-NN backend (None: from its memory budget)
        # backend="auto" on the CPU: (batch, classes, bank entries) -> median ms of each backend, timed once.
        self.backend_timings: dict[tuple[int, int, int], dict[str, float]] = {}
        self.bank = MemoryBank(bank_size)
        self.soft_labels: torch.Tensor | None = None

    def _step_backend(self, q: torch.Tensor, soft_labels: Callable[[str], torch.Tensor]) -> str:
        """The k-NN backend of this step. ``"auto"``: torch, except on the CPU with faiss installed, where the
        faster of the two on this step's shapes decides, timed once per (batch, classes) when the bank is full (a
        filling bank changes shape every step). Never timed under deterministic algorithms or torch.compile."""
        if self.backend != "auto":
            return self.backend
        if (
            q.device.type != "cpu" or not self.bank.is_full or not faiss_available() or not timing_may_decide()
            or torch.compiler.is_compiling()
        ):
            return "torch"
        key = (q.shape[0], q.shape[1], len(self.bank))
        if key not in self.backend_timings:
            self.backend_timings[key] = median_ms(
                {name: lambda name=name: soft_labels(name) for name in ("torch", "faiss")}, q.device
            )
        timing = self.backend_timings[key]
        return min(timing, key=timing.__getitem__)

    def config(self) -> dict[str, Any]:
        """The options in force (and the backend ``"auto"`` resolved to), as ``summary()`` prints them."""
        return {"k": self.k, "alpha": self.alpha, "bank_size": self.bank.size, "backend": self.backend,
                "resolved_backend": self.resolved_backend, "distance": self.distance, "distill": self.distill}

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, alpha={self.alpha}, backend={self.backend!r}, distance={self.distance!r}, "
            f"distill={self.distill!r}"
        )

    def forward(self, outputs: Any, target: torch.Tensor) -> torch.Tensor:
        """The OSAKD loss of the preceding training forward (soft labels from the bank and the batch, then the
        bank is updated); cross-entropy after an eval forward."""
        model = self.model
        logits = select_logits(outputs, model.output, "osakd")
        if logits.dim() != 2:
            raise ValueError(
                f"kdwrap osakd: expected logits of shape (B, C), got {tuple(logits.shape)}; OSAKD is for "
                "classifiers (flatten dense predictions before the loss)"
            )
        b, c = logits.shape
        ce_target, labels = check_target(target, b, c, "osakd")
        shape = model.take_capture()
        if shape is EVAL_CAPTURE:
            ce = self._eval_cross_entropy(logits, ce_target)
            self.parts.update(ce=self.parts["loss"], bank_fill=torch.tensor(len(self.bank)))
            return ce
        if shape != (b, c):
            raise RuntimeError(
                f"kdwrap osakd: loss_fn got logits of shape {(b, c)} but the last forward of the wrapped model "
                f"produced {shape}; call loss_fn(model(x), y) with the output of that forward"
            )
        self._stop_if_not_finite(logits)
        # float32 softmax/CE and k-NN distances even under autocast (fp16/bf16 distances would reorder neighbours).
        with torch.autocast(device_type=logits.device.type, enabled=False):
            z = logits.float()
            ce = F.cross_entropy(z, ce_target)
            p = z.softmax(1)
            q = p.detach()
            if self.bank.materialised and self.bank.vectors.device != q.device:
                # e.g. a checkpoint loaded into a loss_fn that was never moved to the GPU: follow the outputs.
                self.bank.to(q.device)
            use_bank = len(self.bank) >= self.k
            bank_v, bank_l = self.bank.get() if use_bank else (None, None)
            norms = self.bank.squared_norms() if use_bank else None

            def soft_labels(backend: str) -> torch.Tensor:
                return knn_soft_labels(q, labels, c, self.k, bank_v, bank_l, backend=backend,
                                       distance=self.distance, chunk_size=self.chunk_size, bank_sq_norms=norms)

            s = soft_labels(self._step_backend(q, soft_labels))
            self.soft_labels = s
            if self.distill == "mse":
                distill = F.mse_loss(p, s, reduction="sum") / b  # summed over classes, mean over the batch
            else:
                # kl_div treats 0 * log 0 as 0, so classes no neighbour voted for cost nothing.
                distill = F.kl_div(F.log_softmax(z, 1), s, reduction="batchmean")
            if self.alpha == 1.0:
                total = ce
            elif self.alpha == 0.0:
                total = distill
            else:
                total = torch.add(self.alpha * ce, distill, alpha=1.0 - self.alpha)
        if self.bank.size:
            # One op: a non-finite logit makes its whole softmax row NaN, so the whole row becomes _FAR.
            self.bank.add(torch.nan_to_num(q, nan=_FAR, posinf=_FAR, neginf=_FAR), labels)
        self.step += 1
        self.parts = {
            "loss": total.detach(),
            "ce": ce.detach(),
            "distill": distill.detach(),
            "bank_fill": torch.tensor(len(self.bank)),
            **soft_label_diagnostics(s, labels),
            "distill_grad_ratio": distill_gradient_ratio(p.detach(), s, ce_target, self.alpha, self.distill),
        }
        return total


def soft_label_diagnostics(soft_labels: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far the soft labels are from the hard ones, as 0-dim tensors (no host sync):

    - ``soft_true_mass``: the mean mass on the true class (1.0: every soft label equals its one-hot label);
    - ``soft_one_hot``: the share of soft labels with all their mass on one class (all k neighbours agree), whichever
      class that is.

    Where both are near 1, the distillation term's gradient is near zero: OSAKD then trains as plain cross-entropy
    (docs/osakd.md, "When the soft labels act").
    """
    s = soft_labels.detach()
    true_mass = s.gather(1, labels.view(-1, 1)).mean()
    one_hot = (s.amax(1) >= 1.0 - 1e-6).float().mean()
    return {"soft_true_mass": true_mass, "soft_one_hot": one_hot}


def distill_gradient_ratio(
    p: torch.Tensor, soft_labels: torch.Tensor, target: torch.Tensor, alpha: float, distill: str
) -> torch.Tensor:
    """``||(1 - alpha) dD/dz|| / ||alpha dCE/dz||``: how strongly the distillation term pulls on the logits ``z``
    against cross-entropy, each weighted as in the loss (Frobenius norms over the batch), in closed form (no
    autograd). Near 0 the soft labels barely act: OSAKD then trains almost as plain cross-entropy.

    ``dCE/dz = (p - t) / B`` (``t`` the one-hot or soft target); ``dKL(s || p)/dz = (p - s) / B``;
    ``dMSE(p, s)/dz_j = 2 p_j ((p_j - s_j) - sum_c (p_c - s_c) p_c) / B``.
    """
    b, c = p.shape
    t = F.one_hot(target, c).to(p.dtype) if target.dim() == 1 else target.to(p.dtype)
    ce = alpha * (p - t)
    r = p - soft_labels
    d = r if distill == "kl" else 2 * p * (r - (r * p).sum(1, keepdim=True))
    # the common 1 / B cancels; a batch whose CE gradient vanishes gives inf, never a division error
    return ((1.0 - alpha) * d).norm() / ce.norm()


def _check_int(name: str, value: Any, low: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"kdwrap osakd: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"kdwrap osakd: {name}={value} is invalid: {fix}")
    return int(value)


def _check_choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"kdwrap osakd: unknown {name} {value!r}; valid {name}s: {', '.join(valid)}")


def build_osakd(net: nn.Module, **options: Any) -> tuple[OSAKDModel, OSAKDLoss]:
    """Wrap ``net`` for OSAKD. Returns ``(model, loss_fn)``; use ``loss = loss_fn(model(x), y)``.

    Each option goes, unchanged, to the class that owns it: ``k``, ``alpha``, ``bank_size``, ``backend``,
    ``distance``, ``distill`` and ``check_finite`` to :class:`OSAKDLoss`, ``output`` to :class:`OSAKDModel`; their
    docstrings document them. An unknown option raises :class:`kdwrap.OptionError` listing the valid ones.
    """
    loss_options, model_options = route_options("osakd", options, OSAKDLoss, OSAKDModel)
    model = OSAKDModel(net, **model_options)
    loss_fn = OSAKDLoss(model, **loss_options)
    model.loss_options = loss_fn.config()
    return model, loss_fn


@entry_point("osakd")
def osakd(net: nn.Module, **kwargs: Any) -> tuple[KDModel, KDLoss]:
    """Wrap ``net`` for OSAKD (Online Self-Acquired KD). Returns ``(model, loss_fn)``.

    Options (``k``, ``alpha``, ``bank_size``, ``backend``, ...): see :class:`kdwrap.methods.osakd.OSAKDLoss`; an
    unknown one raises :class:`OptionError` listing the valid ones.
    """
    return build_osakd(net, **kwargs)
