"""PCL: Peer Collaborative Learning for online knowledge distillation (Wu, Gong, AAAI 2021, arXiv 2006.04147).

ONE's surgery (:class:`kdwrap.methods.branched.BranchedModel`): a shared trunk and ``m`` peers (the replicated
tail). Each peer sees its own random augmentation of the batch (:mod:`kdwrap.methods.peer_views`). Two teachers:

* the **peer ensemble teacher**, an extra classifier ``W_e`` over the peers' concatenated features (the inputs ``h_i``
  of each peer's classifier): ``z_e = W_e [h_1; ...; h_m]``; where the tail has no classifier whose input is a
  flat feature vector (a 1x1-convolution head), over the peers' concatenated logits instead (kdwrap's choice,
  :data:`ENSEMBLE_INPUTS`);
* the **peer mean teachers**, the temporal mean (exponential moving average) of the trunk and of each peer
  (:mod:`kdwrap.methods.temporal_mean`); peer ``i`` learns from the mean teachers of the *other* peers.

    L = sum_i CE(z_i, y) + CE(z_e, y) + w(t) sum_i [KL_T(z_i <- sg(z_e)) + 1/(m-1) sum_{j != i} KL_T(z_i <- z'_j)]

``z'_j`` the logits of peer ``j``'s mean teacher on peer ``j``'s view (no gradient), ``T = 3``. The deployed model is
the mean teacher of peer 0: what eval-mode ``model(x)`` returns and :func:`kdwrap.export` keeps. docs/methods.md has
the maths and which choices are the paper's and which kdwrap's.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..base import EVAL_CAPTURE, KDLoss, KDModel, KeepReachable, check_logits, count_parameters, route_options
from ..errors import SplitError
from ..fused.planner import check_execution
from ..graph import (
    classifier_name, describe_split, found_classifier, run_trunk, trial_mode, with_classifier_input,
)
from .._deploy import rebuild_original
from .branched import BranchedModel
from .losses import RampedLoss, cross_entropy_rows, softened_kl
from .peer_views import check_augment, describe_views, peer_views
from .pooling import global_pool
from .registry import entry_point
from .temporal_mean import mean_copy, parameter_names, update_means

__all__ = ["pcl", "ENSEMBLE_INPUTS", "PCLModel", "PCLLoss", "build_pcl"]

# What the peer ensemble classifier reads of each peer, by what the tail's classifier is: a peer's tail output ->
# (its logits, its part of the ensemble classifier's input).
# "features": the paper's form, the input h of the classifier, an nn.Linear (token or position axes averaged, as
#     OKDDip does), when the tail has one to identify (kdwrap.graph.found_classifier) or classifier= names one;
# "logits": kdwrap's choice where the classifier's input is not a flat feature vector (a 1x1-convolution head,
#     SqueezeNet's or timm's conv classifiers): the peers' logits, concatenated, into a Linear m*C -> C.
ENSEMBLE_INPUTS: dict[str, Callable[[Any], tuple[Any, torch.Tensor]]] = {
    "features": lambda out: (out[0], global_pool(out[1], -1)),
    "logits": lambda out: (out, out),
}


class PCLModel(BranchedModel):
    """Trunk, ``m`` peers, the peer ensemble classifier, and the temporal means of the trunk and of every peer.

    Training-mode ``forward``: first the temporal means take the current weights in (one update per optimizer step,
    see ``accumulation_steps``), then every peer runs on its own view, the ensemble classifier on their features,
    and the mean teachers on the same views (no gradient); the logits are captured for :class:`PCLLoss` and peer
    ``branch``'s logits are returned. Eval-mode ``forward``: the mean teacher of peer ``branch`` on the batch as
    given (the deployed model's computation).

    Args:
        branches: number of peers ``m`` (>= 2; the paper's 3).
        augment: how each peer gets its own view of the batch in training: ``"crop_flip"`` (default: a random crop
            of the zero-padded image, padding ``H // 8``, and a horizontal flip, per sample and peer, made on the
            batch's device), ``"views"`` (training batches come as ``(B, m, C, H, W)``, peer ``i``'s view at
            ``[:, i]``, stacked by your data loader), ``None`` (every peer sees the batch as given) or a callable
            ``augment(x) -> x`` called once per peer.
        mean_decay: the temporal means' decay ``a`` (the paper's 0.999), after the mean-teacher warm-up
            ``min(a, 1 - 1/(t+1))``.
        accumulation_steps: forwards per optimizer step under gradient accumulation: the means take the weights in
            at the first forward of each optimizer step only.
        branch: the peer whose temporal mean eval-mode ``forward`` returns and :func:`kdwrap.export` keeps.
        classifier: the module of the tail whose input is a peer's feature vector ``h`` (default: the tail's last
            ``nn.Linear``, where it is the classifier: called once, nothing with weights after it; where there is
            none, the ensemble classifier takes the peers' logits, see :data:`ENSEMBLE_INPUTS`).
        execution: how a training forward runs the peers and their mean teachers: ``"sequential"`` (one after the
            other), ``"fused"`` (each set as one graph of ``m``-times wider layers, every peer on its own view's
            trunk output: same values and gradients; an error if the tail cannot be fused) or ``"auto"`` (default:
            the faster of the two, timed on CUDA at the first training step of each input signature, as ONE's
            ``execution``; sequential on the CPU). See :mod:`kdwrap.fused.planner`.
        split, reinit_branches, input_size, leaf_modules, autowrap_functions, output: as for ONE
            (:class:`kdwrap.methods.branched.BranchedModel`).
    """

    method = "pcl"
    why_min_branches = "peers need other peers to learn from"

    def __init__(
        self,
        net: nn.Module,
        *,
        branches: int = 3,
        augment: Any = "crop_flip",
        mean_decay: float = 0.999,
        accumulation_steps: int = 1,
        branch: int = 0,
        split: str | None = None,
        reinit_branches: bool = True,
        classifier: str | None = None,
        input_size: Sequence[int] | None = None,
        leaf_modules: Sequence[type] = (),
        autowrap_functions: Sequence[Callable] = (),
        output: int | str | None = None,
        execution: str = "auto",
    ) -> None:
        check_execution(execution, "pcl")
        self.augment = check_augment(augment)
        if isinstance(mean_decay, bool) or not isinstance(mean_decay, numbers.Real) or not 0.0 <= mean_decay < 1.0:
            raise ValueError(
                f"kdwrap pcl: mean_decay must be a float in [0, 1), got {mean_decay!r}; it is the weight the temporal "
                "means keep at each step (the paper's 0.999; 0 makes them copies of the peers)"
            )
        if (isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, numbers.Integral)
                or accumulation_steps < 1):
            raise ValueError(f"kdwrap pcl: accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        super().__init__(
            net, branches=branches, split=split, reinit_branches=reinit_branches, input_size=input_size,
            leaf_modules=leaf_modules, autowrap_functions=autowrap_functions, output=output,
            gate_channels=1,  # no gate: skip the probe that counts the trunk's channels
        )
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < branches:
            raise ValueError(f"kdwrap pcl: branch must be an int in [0, {branches}), got {branch!r}")
        self.branch, self.mean_decay, self.accumulation_steps = branch, float(mean_decay), int(accumulation_steps)
        tail = self.branches[0]
        graphs = [tail.train_graph, tail.eval_graph]
        # A classifier named by the user must serve as the paper's form; the default falls back to the logits.
        self.classifier, self.ensemble_why = (
            (classifier_name(tail, graphs, classifier, "pcl"), "") if classifier is not None
            else found_classifier(tail, graphs))
        self.ensemble_input = "logits" if self.classifier is None else "features"
        if self.classifier is not None:
            head = tail.get_submodule(self.classifier)
            features, classes = getattr(head, "in_features", None), getattr(head, "out_features", None)
            if not isinstance(features, int) or not isinstance(classes, int):
                raise SplitError(
                    f"kdwrap pcl: classifier={self.classifier!r} is a {type(head).__name__} with no in_features and "
                    "out_features; name an nn.Linear (or a module with both) with classifier=<module name>, or "
                    "leave classifier unset for the ensemble classifier over the peers' logits"
                )
        else:
            features = classes = self._count_classes(net, input_size)
        # The temporal means copy the pieces that return logits alone; the peers also return their features.
        self.mean_trunk = mean_copy(self.trunk)
        self.mean_branches = nn.ModuleList(mean_copy(b) for b in self.branches)
        if self.classifier is not None:
            self.branches = nn.ModuleList(with_classifier_input(b, self.classifier) for b in self.branches)
        self.ensemble = nn.Linear(branches * features, classes)
        # Training forwards so far: the means' clock (their step count is state, saved with them).
        self.register_buffer("mean_forwards", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mean_updates", torch.zeros((), dtype=torch.int64))
        self._follow_mode(net)
        # The mean teachers' tails run as the peers do, each peer on its own view when there are views.
        self.plan_execution(execution, per_branch_input=self.per_branch_input, companions=("mean_branches",))

    @property
    def per_branch_input(self) -> bool:
        """With their own views the peers read the trunk's output on their own view: one input per peer."""
        return self.augment is not None

    def _count_classes(self, net: nn.Module, input_size: Sequence[int] | None) -> int:
        """The number of classes, from a trial forward of the trunk and a tail (for the ensemble classifier over
        the peers' logits, where no classifier module says it)."""
        f = run_trunk(net, self.trunk, input_size, "the number of classes for the ensemble classifier over the "
                       "peers' logits")
        tail = self.branches[0]
        with trial_mode(tail):
            z = tail(*self._branch_inputs(f))
        return int(check_logits(z, "pcl").shape[-1])

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Training: update the means, run the peers on their views, the ensemble classifier and the mean
        teachers; capture their logits; return peer ``branch``'s logits. Eval: the mean teacher of peer
        ``branch`` on ``x`` (the deployed model)."""
        extra = self._tail_kwargs(args, kwargs)
        if not self.training:
            self._note_input(x)
            self.put_capture(EVAL_CAPTURE)
            f = self.mean_trunk(x, *args, **kwargs)
            out = self.mean_branches[self.branch](*self._branch_inputs(f), **extra)
            # The deployed mean has no gradient. A loop that trains a wrapper left in eval mode then gets the
            # family's warning from the loss (and a backward that changes nothing), not an autograd error.
            return KeepReachable.apply(out, self.ensemble.weight) if torch.is_grad_enabled() else out
        self._update_means()
        known = self.input_size if self.input_size is not None else getattr(self, "first_input_size", None)
        views = peer_views(self.augment, x, self.num_branches, None if known is None else len(known))
        if views is not None and (args or kwargs):
            raise ValueError(
                "kdwrap pcl: the peers' own views take the image batch alone, and this forward got other inputs "
                f"({len(args)} positional, {sorted(kwargs)}); pass augment=None so that every peer sees them as given"
            )
        read = ENSEMBLE_INPUTS[self.ensemble_input]
        try:
            trunk_outputs = self._trunk_outputs(self.trunk, x, args, kwargs, views)
        except RuntimeError as e:
            if self.augment != "views":
                raise
            # No input_size and no earlier batch: the batch's rank could not be checked before the network ran.
            raise ValueError(
                f"kdwrap pcl: the network failed on the peers' views of a batch of shape {tuple(x.shape)}; "
                f"augment='views' takes batches (B, {self.num_branches}, ...) holding peer i's view of each sample at "
                "[:, i] (a (B, C, H, W) batch whose C equals the number of peers looks like one); stack the views in "
                f"your dataset, or use augment='crop_flip'. The network's error: {e}"
            ) from e
        # after the trunk ran: a batch the network refused does not set the sample's shape the checks above read
        self._note_input(x if views is None or self.augment != "views" else x[:, 0])
        outs = [read(out) for out in self._run_branches(trunk_outputs, extra)]
        logits = [z for z, _ in outs]
        check_logits(logits[0], "pcl")
        ensemble = self.ensemble(torch.cat([h for _, h in outs], dim=-1))
        with torch.no_grad():
            mean_logits = torch.stack(self._run_branches(
                self._trunk_outputs(self.mean_trunk, x, args, kwargs, views), extra, "mean_branches"))
        self.put_capture((logits, ensemble, mean_logits))
        others = [z for i, z in enumerate(logits) if i != self.branch]
        return KeepReachable.apply(logits[self.branch], ensemble, *others)

    def _trunk_outputs(self, trunk: nn.Module, x: Any, args: tuple, kwargs: dict,
                       views: torch.Tensor | None) -> Any:
        """What the peers' tails read: the trunk's output on the batch, shared, when the peers see it as given;
        else the list of the trunk's outputs on each peer's view, run by itself, as the unofficial reproduction does. One run
        per view keeps every value crossing the cut that view's alone, whichever axis holds the batch (TNT folds it
        into its pixel tokens, CrossViT splits it over two branches), and the trunk's BatchNorm normalises one view
        at a time."""
        if views is None:
            return trunk(x, *args, **kwargs)
        return [trunk(view) for view in views.chunk(self.num_branches)]

    def _update_means(self) -> None:
        """Take the current weights into the temporal means at the first forward of each optimizer step: after
        the previous step's ``optimizer.step()``, the lag a two-line loop allows. Every rank holds the same weights
        under DDP, so every rank computes the same means."""
        take = None
        if self.accumulation_steps > 1:
            take = self.mean_forwards % self.accumulation_steps == 0
        self.mean_forwards.add_(1)
        pairs = [(self.trunk, self.mean_trunk, parameter_names(self.trunk))]
        pairs += [(b, mb, parameter_names(b)) for b, mb in zip(self.branches, self.mean_branches)]
        update_means(pairs, self.mean_updates, self.mean_decay, take)

    # ------------------------------------------------------------------------------------------------ deployment
    def export(self, branch: int | None = None, mean: bool = True) -> nn.Module:
        """The deployable model: the user's class holding the temporal mean of the trunk and of peer ``branch``
        (default: :attr:`branch`, what eval-mode ``forward`` returns); ``mean=False``: the live peer instead."""
        branch = self.branch if branch is None else branch
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < self.num_branches:
            raise ValueError(f"kdwrap pcl: branch must be an int in [0, {self.num_branches}), got {branch!r}")
        if not mean:
            return self._export_branch(branch)
        net = rebuild_original(self.user_network, [self.mean_trunk, self.mean_branches[branch]])
        device = next((t.device for t in self.mean_trunk.buffers()), None)
        return (net.to(device) if device is not None else net).train(self.training)

    def summary(self, input_size: Sequence[int] | None = None, **kwargs: Any) -> str:
        """Split (the rule that chose it and the nearest other cuts, measured as
        :meth:`kdwrap.methods.one.ONEModel.summary` does), the peers' views, what is deployed, parameter counts
        and the step's cost in trunk and tail passes (other options are accepted and ignored)."""
        m = self.num_branches
        trunk_p, branch_p = count_parameters([self.trunk]), count_parameters([self.branches[0]])
        mean_t = sum(t.numel() for t in [*self.mean_trunk.buffers(), *self.mean_branches.buffers()])
        trunk_passes = "1 trunk pass" if self.augment is None else f"the trunk on {m} views ({m} x the trunk's work)"
        return "\n".join([
            f"kdwrap PCL: {type(self.user_network).__name__} split at '{self.split}', {m} peers; deployed: the temporal "
            f"mean of peer {self.branch} (what eval-mode forward returns and export keeps)",
            f"  peer ensemble teacher: {self._describe_ensemble()}",
            f"  peer mean teachers: the temporal means of the trunk and of each peer, decay {self.mean_decay:g}, "
            "updated at the first training forward of each optimizer step",
            f"  views: {describe_views(self.augment)}",
            f"  parameters: trunk {trunk_p:,} | one peer {branch_p:,} | ensemble classifier "
            f"{count_parameters([self.ensemble]):,} | wrapper {count_parameters([self]):,} | deployed "
            f"{trunk_p + branch_p:,}; temporal means {mean_t:,} tensor elements (buffers, no gradient)",
            *describe_split(self.split_record, input_size, self.first_input_size),
            f"  work per training step: {trunk_passes} and {m} tails with gradients, the same again without "
            "gradients for the mean teachers",
            "  execution: " + self.branch_execution.describe(),
        ])

    def _describe_ensemble(self) -> str:
        sizes = f"({self.ensemble.in_features} -> {self.ensemble.out_features})"
        m = self.num_branches
        if self.ensemble_input == "features":
            return f"a Linear over the {m} peers' inputs of '{self.classifier}' {sizes}"
        classes = self.ensemble.out_features
        return (f"ensemble classifier over the peers' logits, a Linear ({m} x {classes} -> {classes}): the "
                f"classifier input of {type(self.user_network).__name__} is not a flat feature vector "
                f"({self.ensemble_why})")

    def extra_repr(self) -> str:
        return (f"split={self.split!r}, branches={self.num_branches}, branch={self.branch}, "
                f"augment={self.augment!r}, mean_decay={self.mean_decay}, execution={self.execution!r}")


class PCLLoss(RampedLoss):
    """``sum_i CE(z_i, y) + CE(z_e, y) + w(t) sum_i [KL_T(z_i <- sg(z_e)) + mean_{j != i} KL_T(z_i <- z'_j)]``.

    ``KL_T(s <- t) = T^2 mean_b sum_c p_T(t)_c (log p_T(t)_c - log p_T(s)_c)``. After an eval-mode forward it returns
    plain cross-entropy. ``parts``: ``"loss"``, ``"ce"`` (per peer), ``"ce_ensemble"``, ``"kl_ensemble"`` and
    ``"kl_mean"`` (per peer), ``"ramp_weight"``.

    Args:
        temperature: ``T`` (the paper's 3).
        rampup_steps: optimizer steps of ONE's sigmoid ramp-up of ``w`` (0, the default: full weight from the start).
            The unofficial reproduction's formula, ``lambd * exp(-5 (1 - epoch / lambd)^2)`` with ``lambd = 1``
            until epoch 80, gives weight 1 at epoch 1 and about 0 from epoch 2 to 80, not a ramp (docs/methods.md).
        accumulation_steps: loss calls per optimizer step under gradient accumulation (for the ramp clock).
        check_finite: stop with a ``FloatingPointError`` at the first NaN/Inf in the logits (one host sync).
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The PCL loss of the preceding training forward (``logits`` is what it returned); cross-entropy after an
        eval forward."""
        target, capture = self._take_checked_capture(logits, target)
        if capture is None:
            return self._eval_cross_entropy(logits, target)
        peer_logits, ensemble, mean_logits = capture
        b = self.model.branch
        self._check_same_shape(logits, peer_logits[b])
        with torch.autocast(device_type=logits.device.type, enabled=False):
            zs = list(peer_logits)
            zs[b] = logits  # the given tensor stands for the returned peer: gradients pass what DDP/autocast did
            z = torch.stack(zs).float()  # m x B x C
            z_e = ensemble.float()
            self._stop_if_not_finite(torch.cat([z, z_e.unsqueeze(0)]), "peer and ensemble logits")
            ce = cross_entropy_rows(torch.cat([z, z_e.unsqueeze(0)]).log_softmax(-1), target)  # m + 1
            T = self.temperature
            kl_ensemble = softened_kl(z, z_e.detach(), T)  # m
            m = z.shape[0]
            pairs = softened_kl(z.unsqueeze(1), mean_logits.float().unsqueeze(0), T)  # m x m: peer i <- mean j
            others = ~torch.eye(m, dtype=torch.bool, device=z.device)
            kl_mean = (pairs * others).sum(1) / (m - 1)
            weight = self.ramp()
            loss = ce.sum() + weight * (kl_ensemble.sum() + kl_mean.sum())
        self.step += 1
        ce = ce.detach()
        self.parts = {
            "loss": loss.detach(), "ce": ce[:-1], "ce_ensemble": ce[-1], "kl_ensemble": kl_ensemble.detach(),
            "kl_mean": kl_mean.detach(), "ramp_weight": torch.tensor(weight),
        }
        return loss


def build_pcl(net: nn.Module, **options: Any) -> tuple[PCLModel, PCLLoss]:
    """Wrap ``net`` for PCL. Returns ``(model, loss_fn)``.

    Each option goes, unchanged, to the class that owns it: the surgery, view, temporal-mean and execution options
    (``branches``, ``augment``, ``mean_decay``, ``branch``, ``split``, ``reinit_branches``, ``classifier``,
    ``input_size``, ``leaf_modules``, ``autowrap_functions``, ``output``, ``execution``) to :class:`PCLModel`, the
    loss options (``temperature``, ``rampup_steps``, ``check_finite``) to :class:`PCLLoss`; ``accumulation_steps`` to
    both (the means and the ramp count optimizer steps). An unknown option raises :class:`kdwrap.OptionError`
    listing the valid ones.
    """
    model_options, loss_options = route_options("pcl", options, PCLModel, PCLLoss)
    model = PCLModel(net, **model_options)
    return model, PCLLoss(model, **loss_options)


@entry_point("pcl")
def pcl(net: nn.Module, branches: int = 3, **kwargs: Any) -> tuple[KDModel, KDLoss]:
    """Wrap ``net`` for PCL (Peer Collaborative Learning): ONE's trunk/branch surgery, ``branches`` peers each
    trained on its own random view of the batch, a peer ensemble teacher (a classifier over the peers' concatenated
    features) and the peers' temporal means, which teach the other peers; the temporal mean of peer 0 is the
    deployed model. Returns ``(model, loss_fn)``.

    Options (``augment``, ``mean_decay``, ``split``, ``temperature``, ``rampup_steps``, ...): see
    :class:`kdwrap.methods.pcl.PCLModel` and :class:`kdwrap.methods.pcl.PCLLoss`; an unknown one raises
    :class:`OptionError` listing the valid ones.
    """
    return build_pcl(net, branches=branches, **kwargs)
