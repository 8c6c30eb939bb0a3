"""OKDDip: Online Knowledge Distillation with Diverse Peers (Chen, Mei, Wang, Feng, Chen, AAAI 2020).

ONE's surgery (:class:`kdwrap.methods.branched.BranchedModel`) with ``m`` branches: branches ``0..m-2`` are peers,
branch ``m-1`` the group leader, which is what ``model(x)`` returns and :func:`kdwrap.export` keeps. Each peer ``i``
distils from its own target, an attention-weighted sum of the peers' logits; the leader distils from the peers'
mean. With ``h_i`` the input of branch ``i``'s classifier (its last ``nn.Linear``), shared bias-free projections
``q_i = W_q h_i``, ``k_i = W_k h_i`` (``d/8 x d``), per sample:

    a_ij = softmax_j(q_i . k_j)  (over the peers, self included, no sqrt(d) scaling)    t_i = sum_j a_ij z_j
    L = sum_i CE(z_i, y) + CE(z_L, y) + w(t) [sum_i KL_T(z_i <- t_i) + KL_T(z_L <- mean_i z_i)],  T = 3

with ``KL_T(s <- t) = T^2 mean_b sum_c p_T(t)_c (log p_T(t)_c - log p_T(s)_c)``. As in the reference code
(DefangChen/OKDDip) nothing is detached: ``W_q`` and ``W_k`` learn only through the targets.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..base import EVAL_CAPTURE, KDLoss, KDModel, KeepReachable, check_logits, count_parameters, route_options
from ..errors import SplitError
from ..fused.planner import check_execution
from ..graph import classifier_name, describe_split, with_classifier_input
from .branched import BranchedModel
from .losses import RampedLoss, cross_entropy_rows, softened_kl
from .pooling import global_pool
from .registry import entry_point

__all__ = ["okddip", "PeerAttention", "OKDDipModel", "OKDDipLoss", "build_okddip"]


class PeerAttention(nn.Module):
    """The peers' self-attention: bias-free ``W_q``, ``W_k`` (``features // reduction`` x ``features``) shared by
    the peers; returns each peer's target ``t_i = sum_j a_ij z_j`` and the weights ``a`` (``B x P x P``)."""

    def __init__(self, features: int, reduction: int = 8) -> None:
        super().__init__()
        inner = max(1, features // reduction)
        self.query = nn.Linear(features, inner, bias=False)
        self.key = nn.Linear(features, inner, bias=False)

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h``: peers' features ``P x B x d``; ``z``: their logits ``P x B x C``. Returns ``(t, a)``, ``t`` of
        ``z``'s shape."""
        q, k = self.query(h), self.key(h)
        a = torch.einsum("ibd,jbd->bij", q, k).softmax(-1)
        return torch.einsum("bij,jbc->ibc", a.to(z.dtype), z), a


class OKDDipModel(BranchedModel):
    """Trunk, ``m - 1`` peers and the group leader (branch ``m - 1``), and the peers' attention. ``forward``
    returns the leader's logits.

    In training mode every branch runs and the logits and the peers' attention targets are captured for
    :class:`OKDDipLoss`; in eval mode only the leader runs, so eval accuracy is the deployed model's accuracy.
    The branches run one after the other or fused, as ONE's do (``execution``).

    Args:
        branches: ``m`` (>= 3: at least two peers and the leader); the paper's default 4.
        classifier: the module of the tail whose input is ``h`` (default: the tail's last ``nn.Linear``).
        reduction: ``W_q``, ``W_k`` map ``d`` to ``d // reduction`` (the reference's 8).
        execution: ``"sequential"``, ``"fused"`` or ``"auto"`` (default), as for ONE (:mod:`kdwrap.fused.planner`);
            the fused graph returns each branch's classifier input with its logits.
        split, reinit_branches, input_size, leaf_modules, autowrap_functions, output: as for ONE
            (:class:`kdwrap.methods.branched.BranchedModel`).
    """

    method = "okddip"
    min_branches = 3
    why_min_branches = "at least two peers to attend over, and the group leader"

    def __init__(
        self,
        net: nn.Module,
        *,
        branches: int = 4,
        split: str | None = None,
        reinit_branches: bool = True,
        classifier: str | None = None,
        reduction: int = 8,
        input_size: Sequence[int] | None = None,
        leaf_modules: Sequence[type] = (),
        autowrap_functions: Sequence[Callable] = (),
        output: int | str | None = None,
        execution: str = "auto",
    ) -> None:
        check_execution(execution, "okddip")
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"kdwrap okddip: reduction must be an int >= 1, got {reduction!r}")
        super().__init__(
            net, branches=branches, split=split, reinit_branches=reinit_branches, input_size=input_size,
            leaf_modules=leaf_modules, autowrap_functions=autowrap_functions, output=output,
            gate_channels=1,  # no gate: skip the probe that counts the trunk's channels
        )
        tail = self.branches[0]
        self.classifier = classifier_name(tail, [tail.train_graph, tail.eval_graph], classifier, "okddip")
        head = self.branches[0].get_submodule(self.classifier)
        features = getattr(head, "in_features", None)
        if not isinstance(features, int):
            raise SplitError(
                f"kdwrap okddip: classifier={self.classifier!r} is a {type(head).__name__} with no in_features; name "
                "an nn.Linear (or a module with in_features) with classifier=<module name>"
            )
        self.branches = nn.ModuleList(with_classifier_input(b, self.classifier) for b in self.branches)
        self.attention = PeerAttention(features, reduction)
        self.leader = self.num_branches - 1
        self._follow_mode(net)
        self.plan_execution(execution)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Training: run every branch, capture the logits and the peers' targets, return the leader's logits.
        Eval: run only the leader (the deployed model's computation)."""
        self._note_input(x)
        f = self.trunk(x, *args, **kwargs)
        extra = self._tail_kwargs(args, kwargs)
        if not self.training:
            self.put_capture(EVAL_CAPTURE)
            return self.branches[self.leader](*self._branch_inputs(f), **extra)[0]
        outs = self._run_branches(f, extra)
        logits = [z for z, _ in outs]
        check_logits(logits[0], "okddip")
        h = torch.stack([global_pool(feat, -1) for _, feat in outs[:-1]])  # P x B x d
        targets, attention = self.attention(h, torch.stack(logits[:-1]))
        self.put_capture((logits, targets, attention.detach()))
        return KeepReachable.apply(logits[self.leader], targets, *logits[:-1])

    def export(self, branch: int | None = None) -> nn.Module:
        """The deployable model: the user's class holding the trunk and the leader (or ``branch``)."""
        return self._export_branch(self.leader if branch is None else branch)

    def summary(self, input_size: Sequence[int] | None = None, **kwargs: Any) -> str:
        """Split (the rule that chose it, and the nearest other cuts with their tails' FLOP shares, measured as
        :meth:`kdwrap.methods.one.ONEModel.summary` does), classifier, parameter counts (other options are accepted
        and ignored)."""
        trunk_p, branch_p = count_parameters([self.trunk]), count_parameters([self.branches[0]])
        return "\n".join([
            f"kdwrap OKDDip: {type(self.user_network).__name__} split at '{self.split}', {self.num_branches - 1} peers "
            f"+ the group leader (branch {self.leader}, what forward returns and export keeps); attention over the "
            f"input of '{self.classifier}' ({self.attention.query.in_features} -> {self.attention.query.out_features})",
            f"  parameters: trunk {trunk_p:,} | one branch {branch_p:,} | attention "
            f"{count_parameters([self.attention]):,} | wrapper {count_parameters([self]):,} | deployed "
            f"{trunk_p + branch_p:,}",
            *describe_split(self.split_record, input_size, self.first_input_size),
            "  execution: " + self.branch_execution.describe(),
        ])

    def extra_repr(self) -> str:
        return (f"split={self.split!r}, branches={self.num_branches}, classifier={self.classifier!r}, "
                f"execution={self.execution!r}")


class OKDDipLoss(RampedLoss):
    """``sum_i CE(z_i, y) + CE(z_L, y) + w(t) [sum_i KL_T(z_i <- t_i) + KL_T(z_L <- mean_i z_i)]`` over the
    peers ``i`` and the leader ``L``; nothing detached (the reference code's choice: the attention learns through
    the targets). After an eval-mode forward it returns plain cross-entropy. ``parts``: ``"loss"``, ``"ce"`` (per
    branch, leader last), ``"kl"`` (per peer, then the leader's), ``"attention"`` (the mean ``P x P`` weights),
    ``"ramp_weight"``.

    Args:
        temperature: ``T`` (the reference's 3).
        rampup_steps: optimizer steps of ONE's sigmoid ramp-up of ``w`` (0: full weight from the start; the
            reference ramps over 80 of its 300 epochs).
        accumulation_steps: loss calls per optimizer step under gradient accumulation (for the ramp clock).
        check_finite: stop with a ``FloatingPointError`` at the first NaN/Inf in the logits (one host sync).
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The OKDDip loss of the preceding training forward (``logits`` is what it returned); cross-entropy after
        an eval forward."""
        target, capture = self._take_checked_capture(logits, target)
        if capture is None:
            return self._eval_cross_entropy(logits, target)
        branch_logits, targets, attention = capture
        self._check_same_shape(logits, branch_logits[-1])
        with torch.autocast(device_type=logits.device.type, enabled=False):
            zs = list(branch_logits)
            zs[-1] = logits  # the given tensor stands for the leader: gradients pass what DDP/autocast did to it
            z = torch.stack(zs).float()  # m x B x C, leader last
            self._stop_if_not_finite(z, "branch logits")
            ce = cross_entropy_rows(z.log_softmax(-1), target)
            peers = z[:-1]
            kl = torch.cat([
                softened_kl(peers, targets.float(), self.temperature),  # P
                softened_kl(z[-1], peers.mean(0), self.temperature).unsqueeze(0),
            ])
            weight = self.ramp()
            loss = ce.sum() + weight * kl.sum()
        self.step += 1
        self.parts = {"loss": loss.detach(), "ce": ce.detach(), "kl": kl.detach(),
                      "attention": attention.float().mean(0), "ramp_weight": torch.tensor(weight)}
        return loss


def build_okddip(net: nn.Module, **options: Any) -> tuple[OKDDipModel, OKDDipLoss]:
    """Wrap ``net`` for OKDDip. Returns ``(model, loss_fn)``.

    Each option goes, unchanged, to the class that owns it: the surgery options (``branches``, ``split``,
    ``reinit_branches``, ``classifier``, ``reduction``, ``input_size``, ``leaf_modules``, ``autowrap_functions``,
    ``output``, ``execution``) to :class:`OKDDipModel`, the loss options (``temperature``, ``rampup_steps``,
    ``accumulation_steps``, ``check_finite``) to :class:`OKDDipLoss`. An unknown option raises
    :class:`kdwrap.OptionError` listing the valid ones.
    """
    model_options, loss_options = route_options("okddip", options, OKDDipModel, OKDDipLoss)
    model = OKDDipModel(net, **model_options)
    return model, OKDDipLoss(model, **loss_options)


@entry_point("okddip")
def okddip(net: nn.Module, branches: int = 4, **kwargs: Any) -> tuple[KDModel, KDLoss]:
    """Wrap ``net`` for OKDDip (Online KD with Diverse Peers): ONE's trunk/branch surgery, ``branches - 1`` peers
    that distil from attention-weighted targets and a group leader (the deployed branch) that distils from the
    peers' mean. Returns ``(model, loss_fn)``.

    Options (``split``, ``classifier``, ``temperature``, ``rampup_steps``, ...): see
    :class:`kdwrap.methods.okddip.OKDDipModel` and :class:`kdwrap.methods.okddip.OKDDipLoss`; an unknown one raises
    :class:`OptionError` listing the valid ones.
    """
    return build_okddip(net, branches=branches, **kwargs)
