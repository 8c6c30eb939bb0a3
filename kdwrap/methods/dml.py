"""DML: Deep Mutual Learning (Zhang, Xiang, Hospedales, Lu, CVPR 2018).

K full networks (peers) train together; each learns from the labels and from the other peers' predictions:

    L = sum_k [ CE(z_k, y) + 1/(K-1) * sum_{l != k} T^2 * KL( softmax_T(sg(z_l)) || softmax_T(z_k) ) ]

with T = 1 by default. The paper updates the peers alternately, recomputing the predictions after each peer's
step; kdwrap, like the common PyTorch re-implementations, updates them together from one forward per peer, each
peer's target being the others' detached output. See docs/methods.md.
"""
from __future__ import annotations

import copy
import numbers
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._deploy import deployable_copy
from ..base import (
    EVAL_CAPTURE, KDLoss, KDModel, KeepReachable, check_logits, check_output_option, count_parameters, route_options,
    select_logits,
)
from .branch_init import reinitialise_like
from .losses import check_temperature, softened_kl
from .registry import entry_point

__all__ = ["dml", "DMLModel", "DMLLoss", "build_dml"]



def _peer_count(peers: Any) -> int:
    if isinstance(peers, bool) or not isinstance(peers, numbers.Integral):
        raise TypeError(f"kdwrap dml: peers must be an int >= 2, got {type(peers).__name__} {peers!r}")
    if peers < 2:
        raise ValueError(
            f"kdwrap dml: peers={peers}, but mutual learning needs at least 2 peers (a peer learns from the others); "
            "use peers=2 (the paper's default) or more"
        )
    return int(peers)


class DMLModel(KDModel):
    """``K`` peers (``self.peers``, a ``ModuleList``). ``forward`` returns the logits of peer ``self.peer``.

    In training mode every peer runs on the input (one forward each) and their logits are captured for
    :class:`DMLLoss`; in eval mode only the kept peer runs, so eval accuracy is the deployed model's accuracy.
    Every peer's parameters are in ``parameters()``: one optimizer trains them all.

    Args:
        peers: number of peers ``K`` (>= 2) when one network is given (default 2). With a list of networks,
            the list is the peers (``peers``, if given, must equal its length).
        reinit_peers: peers 1..K-1, built as copies of the given network, start from their own random
            initialisation, made the way the model initialises itself
            (:func:`kdwrap.methods.branch_init.reinitialise_like`; default). ``False``: they start as exact copies,
            the choice for fine-tuning a pretrained model. A list of networks is used as given.
        peer: the peer ``forward`` returns and :func:`kdwrap.export` keeps (default 0).
        output: index, key or field of the logits when the peers return a tuple, dict or namedtuple (an HF
            classifier's ``ImageClassifierOutput``: ``"logits"``). ``model(x)`` then returns the logits tensor;
            ``export`` returns the peer as it is, outputs and all.
    """

    method = "dml"

    def __init__(
        self,
        net: nn.Module | Sequence[nn.Module],
        *,
        peers: int | None = None,
        reinit_peers: bool = True,
        peer: int = 0,
        output: int | str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(net, nn.Module):
            count = _peer_count(2 if peers is None else peers)
            copies = [copy.deepcopy(net) for _ in range(count - 1)]
            if reinit_peers:
                reinitialise_like(net, copies)
            nets = [net, *copies]
        else:
            nets = list(net)
            if not all(isinstance(n, nn.Module) for n in nets):
                raise TypeError(
                    "kdwrap dml: expects a torch.nn.Module or a list of them, got a list holding "
                    + ", ".join(sorted({type(n).__name__ for n in nets if not isinstance(n, nn.Module)}))
                )
            _peer_count(len(nets))
            if peers is not None and peers != len(nets):
                raise ValueError(
                    f"kdwrap dml: peers={peers} but {len(nets)} networks were given; leave peers out when passing "
                    "a list (the list is the peers)"
                )
            if len({id(n) for n in nets}) < len(nets):
                raise ValueError(
                    "kdwrap dml: the same network appears twice in the list; pass separate networks (or one network "
                    "and peers=K, which makes independently initialised copies)"
                )
        if isinstance(peer, bool) or not isinstance(peer, numbers.Integral) or not 0 <= peer < len(nets):
            raise ValueError(f"kdwrap dml: peer must be an int in [0, {len(nets)}), got {peer!r}")
        self.peers = nn.ModuleList(nets)
        self.peer = int(peer)
        self.output = check_output_option("dml", output)
        # The loss's options, set by build_dml for summary(); not "config": HF's Trainer reads model.config.
        self.loss_options: dict[str, Any] = {}
        self._follow_mode(nets[0])

    @property
    def num_peers(self) -> int:
        return len(self.peers)

    @property
    def user_network(self) -> nn.Module:
        """The peer that is deployed (``self.peer``): the user's own network."""
        return self.peers[self.peer]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Training: run every peer, capture their logits for the loss, return peer ``peer``'s logits. Eval: run
        only that peer (the deployed model's computation)."""
        if not self.training:
            self.put_capture(EVAL_CAPTURE)
            return self._logits(self.peer, x, *args, **kwargs)
        logits = [
            check_logits(self._logits(i, x, *args, **kwargs), "dml", f"peer {i} returned",
                         "; DML needs classifiers that return them")
            for i in range(self.num_peers)
        ]
        classes = [z.shape[-1] for z in logits]
        if len(set(classes)) > 1:
            raise ValueError(
                "kdwrap dml: the peers predict different numbers of classes ("
                + ", ".join(f"peer {i}: {c}" for i, c in enumerate(classes))
                + "); every peer must be built for the same classes (same num_classes)"
            )
        self.put_capture(logits)
        others = [z for i, z in enumerate(logits) if i != self.peer]
        return KeepReachable.apply(logits[self.peer], *others)

    def _logits(self, i: int, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return select_logits(self.peers[i](x, *args, **kwargs), self.output, "dml", f"peer {i}")

    def export(self, peer: int | None = None) -> nn.Module:
        """Peer ``peer`` (default: the one ``model(x)`` returns) as a deep copy: the user's own class with its
        original ``state_dict`` keys. Keeps the wrapper's train/eval mode; gradients are dropped."""
        peer = self.peer if peer is None else peer
        if isinstance(peer, bool) or not isinstance(peer, numbers.Integral) or not 0 <= peer < self.num_peers:
            raise ValueError(f"kdwrap dml: peer must be an int in [0, {self.num_peers}), got {peer!r}")
        return deployable_copy(self.peers[peer])

    def summary(self, **kwargs: Any) -> str:
        """A description of the wrapper (options such as ``input_size`` are accepted and ignored: DML adds no
        layer to a peer, so the deployed model is the trained peer)."""
        lines = [f"kdwrap DML (Deep Mutual Learning): {self.num_peers} peers (forward returns peer {self.peer})"]
        for i, p in enumerate(self.peers):
            lines.append(f"  peer {i}: {type(p).__name__}, {count_parameters([p]):,} parameters")
        if self.output is not None:
            lines.append(f"  logits: element {self.output!r} of each peer's output")
        deployed = count_parameters([self.peers[self.peer]])
        lines.append(f"  parameters: wrapper {count_parameters([self]):,} | deployed {deployed:,}")
        if self.loss_options:
            lines.append(
                "  loss: sum_k [CE(z_k, y) + 1/(K-1) sum_{l != k} T^2 KL(softmax_T(sg(z_l)) || softmax_T(z_k))], "
                f"T = {self.loss_options['temperature']:g}; peers updated together from one forward each"
            )
        lines.append(
            "  cost: every peer's forward and backward per training step (measured step times: docs/methods.md)")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        output = "" if self.output is None else f", output={self.output!r}"
        return f"peers={self.num_peers}, peer={self.peer}{output}"


class DMLLoss(KDLoss):
    """``sum_k [CE(z_k, y) + 1/(K-1) sum_{l != k} T^2 KL(softmax_T(sg(z_l)) || softmax_T(z_k))]``.

    Each KL is summed over classes and averaged over the batch; its target ``z_l`` is detached, so peer ``k``'s
    KL term trains peer ``k`` only. Call it once per training forward with the forward's output and the labels;
    the other peers' logits come from that forward's capture. After an eval-mode forward it returns plain
    cross-entropy of the given logits. ``target``: int class indices ``(B,)`` or float soft targets ``(B, C)``.
    ``parts``: detached ``"loss"``, ``"ce"`` and ``"kl"`` (one value per peer; ``"kl"`` is the averaged mutual term
    of each peer, with its ``T^2``).

    Args:
        temperature: ``T`` of the softened softmax (default 1, the paper's: plain probabilities, ``T^2 = 1``).
        check_finite: stop with a ``FloatingPointError`` naming the step at the first NaN/Inf in any peer's
            logits (one host sync per step).
    """

    def __init__(self, model: DMLModel, *, temperature: float = 1.0, check_finite: bool = False) -> None:
        super().__init__(model, check_finite)
        self.temperature = check_temperature("dml", temperature)

    def config(self) -> dict[str, Any]:
        """The options in force, as ``summary()`` prints them."""
        return {"temperature": self.temperature}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, step={self.step}"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The DML loss of the preceding training forward (``logits`` is what it returned); cross-entropy after an
        eval forward."""
        target, capture = self._take_checked_capture(logits, target)
        if capture is None:
            return self._eval_cross_entropy(logits, target)
        kept = self.model.peer
        self._check_same_shape(logits, capture[kept])
        with torch.autocast(device_type=logits.device.type, enabled=False):
            # The given tensor stands for the kept peer so that gradients flow through whatever the caller (DDP,
            # autocast) did to it (same values as the captured logits).
            zs = list(capture)
            zs[kept] = logits
            z = torch.stack([z_k.float() for z_k in zs])  # K x B x C (peers of different types may differ in dtype)
            self._stop_if_not_finite(z, "peer logits")
            k = z.shape[0]
            ce = torch.stack([F.cross_entropy(z_k, target) for z_k in z])
            # pair[k, l] = T^2 KL(p_T(sg(z_l)) || p_T(z_k)): row k trains peer k towards every other peer.
            pair = softened_kl(z.unsqueeze(1), z.detach().unsqueeze(0), self.temperature)  # K x K
            off_diagonal = 1.0 - torch.eye(k, device=z.device)
            kl = (pair * off_diagonal).sum(1) / (k - 1)
            loss = (ce + kl).sum()
        self.step += 1
        self.parts = {"loss": loss.detach(), "ce": ce.detach(), "kl": kl.detach()}
        return loss


def build_dml(net: nn.Module | Sequence[nn.Module], **options: Any) -> tuple[DMLModel, DMLLoss]:
    """Wrap ``net`` (one network, copied into ``peers`` peers, or a list of networks) for DML. Returns
    ``(model, loss_fn)``; use ``loss = loss_fn(model(x), y)``.

    Each option goes, unchanged, to the class that owns it: ``peers``, ``reinit_peers``, ``peer`` and ``output`` to
    :class:`DMLModel`, ``temperature`` and ``check_finite`` to :class:`DMLLoss`; their docstrings document them.
    An unknown option raises :class:`kdwrap.OptionError` listing the valid ones.
    """
    model_options, loss_options = route_options("dml", options, DMLModel, DMLLoss)
    model = DMLModel(net, **model_options)
    loss_fn = DMLLoss(model, **loss_options)
    model.loss_options = loss_fn.config()
    return model, loss_fn


@entry_point("dml")
def dml(
    net: nn.Module | Sequence[nn.Module], peers: int | None = None, **kwargs: Any
) -> tuple[KDModel, KDLoss]:
    """Wrap ``net`` for DML (Deep Mutual Learning). Returns ``(model, loss_fn)``.

    ``net`` is one network, copied into ``peers`` independently initialised peers (default 2), or a list of
    networks (the peers, possibly of different architectures). Options (``reinit_peers``, ``peer``, ``output``,
    ``temperature``, ...): see :class:`kdwrap.methods.dml.DMLModel` and :class:`kdwrap.methods.dml.DMLLoss`; an
    unknown one raises :class:`OptionError` listing the valid ones.
    """
    return build_dml(net, peers=peers, **kwargs)
