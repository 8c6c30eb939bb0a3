"""The public entry points: wrap a model for a method, export the deployable model, summarise a wrapper."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

from .base import KDLoss, KDModel, unwrap

__all__ = [
    "METHODS", "register_method", "wrap", "one", "osakd", "kd", "dml", "okddip", "byot", "pcl", "export", "summary",
]

Wrapper = Callable[..., "tuple[KDModel, KDLoss]"]
# Method name -> its entry point (``kdwrap.one``, ...): what ``wrap(net, method=name)`` calls. Filled by
# register_method, so a method is declared once, where it is defined.
METHODS: dict[str, Wrapper] = {}


def register_method(name: str) -> Callable[[Wrapper], Wrapper]:
    """Register ``fn(net, **options) -> (model, loss_fn)`` as ``kdwrap.wrap(net, method=name)``."""
    def add(fn: Wrapper) -> Wrapper:
        if name in METHODS:
            raise ValueError(f"kdwrap method {name!r} is already registered (by {METHODS[name].__qualname__})")
        METHODS[name] = fn
        return fn

    return add


def _check_net(net: nn.Module) -> None:
    if not isinstance(net, nn.Module):
        raise TypeError(f"kdwrap expects a torch.nn.Module, got {type(net).__name__}")
    if isinstance(unwrap(net), KDModel):
        raise ValueError(
            f"this model is already wrapped by kdwrap ({unwrap(net).method}); wrap the original model once, "
            "or call kdwrap.export(model) first to get the plain model back"
        )
    if unwrap(net) is not net:
        raise ValueError(
            "wrap the bare model, then apply DistributedDataParallel / torch.compile to the kdwrap model: "
            "model, loss_fn = kdwrap.wrap(net, ...); model = DDP(model)"
        )


@register_method("one")
def one(net: nn.Module, branches: int = 3, **kwargs: Any) -> tuple[KDModel, KDLoss]:
    """Wrap ``net`` for ONE (On-the-fly Native Ensemble). Returns ``(model, loss_fn)``.

    Options (``split``, ``temperature``, ``rampup_steps``, ...): see :class:`kdwrap.methods.one.ONEModel` and
    :class:`kdwrap.methods.one.ONELoss`; an unknown one raises :class:`OptionError` listing the valid ones.
    """
    from .methods.one import build_one

    _check_net(net)
    return build_one(net, branches=branches, **kwargs)


@register_method("osakd")
def osakd(net: nn.Module, **kwargs: Any) -> tuple[KDModel, KDLoss]:
    """Wrap ``net`` for OSAKD (Online Self-Acquired KD). Returns ``(model, loss_fn)``.

    Options (``k``, ``alpha``, ``bank_size``, ``backend``, ...): see :class:`kdwrap.methods.osakd.OSAKDLoss`; an
    unknown one raises :class:`OptionError` listing the valid ones.
    """
    from .methods.osakd import build_osakd

    _check_net(net)
    return build_osakd(net, **kwargs)


@register_method("kd")
def kd(student: nn.Module, teacher: nn.Module | None = None, **kwargs: Any) -> tuple[KDModel, KDLoss]:
    """Wrap ``student`` for KD (Hinton et al.) from a trained, frozen ``teacher``. Returns ``(model, loss_fn)``.

    Options (``temperature``, ``alpha``, ``output``, ...): see :class:`kdwrap.methods.kd.HintonKDLoss` and
    :class:`kdwrap.methods.kd.HintonKDModel`; an unknown one raises :class:`OptionError` listing the valid ones.
    The teacher is not in ``model.parameters()`` nor in ``model.state_dict()``: to resume, rebuild the wrapper
    with the same teacher, then load the checkpoint.
    """
    from .methods.kd import build_kd

    if teacher is None:
        raise TypeError(
            "kdwrap kd needs a trained teacher: kdwrap.kd(student, teacher) or kdwrap.wrap(student, method='kd', "
            "teacher=teacher), the teacher loaded from its checkpoint"
        )
    _check_net(student)
    return build_kd(student, teacher, **kwargs)


@register_method("dml")
def dml(
    net: nn.Module | Sequence[nn.Module], peers: int | None = None, **kwargs: Any
) -> tuple[KDModel, KDLoss]:
    """Wrap ``net`` for DML (Deep Mutual Learning). Returns ``(model, loss_fn)``.

    ``net`` is one network, copied into ``peers`` independently initialised peers (default 2), or a list of
    networks (the peers, possibly of different architectures). Options (``reinit_peers``, ``peer``, ``output``,
    ``temperature``, ...): see :class:`kdwrap.methods.dml.DMLModel` and :class:`kdwrap.methods.dml.DMLLoss`; an
    unknown one raises :class:`OptionError` listing the valid ones.
    """
    from .methods.dml import build_dml

    for n in (net if isinstance(net, (list, tuple)) else [net]):
        _check_net(n)
    return build_dml(net, peers=peers, **kwargs)


@register_method("okddip")
def okddip(net: nn.Module, branches: int = 4, **kwargs: Any) -> tuple[KDModel, KDLoss]:
    """Wrap ``net`` for OKDDip (Online KD with Diverse Peers): ONE's trunk/branch surgery, ``branches - 1`` peers
    that distil from attention-weighted targets and a group leader (the deployed branch) that distils from the
    peers' mean. Returns ``(model, loss_fn)``.

    Options (``split``, ``classifier``, ``temperature``, ``rampup_steps``, ...): see
    :class:`kdwrap.methods.okddip.OKDDipModel` and :class:`kdwrap.methods.okddip.OKDDipLoss`; an unknown one raises
    :class:`OptionError` listing the valid ones.
    """
    from .methods.okddip import build_okddip

    _check_net(net)
    return build_okddip(net, branches=branches, **kwargs)


@register_method("byot")
def byot(net: nn.Module, **kwargs: Any) -> tuple[KDModel, KDLoss]:
    """Wrap ``net`` for BYOT (Be Your Own Teacher): exits at the ends of its stages learn from its own classifier.
    Returns ``(model, loss_fn)``; ``model(x)`` returns the network's own logits.

    Options (``stages``, ``classifier``, ``alpha``, ``temperature``, ``feature_weight``, ...): see
    :class:`kdwrap.methods.byot.BYOTModel` and :class:`kdwrap.methods.byot.BYOTLoss`; an unknown one raises
    :class:`OptionError` listing the valid ones.
    """
    from .methods.byot import build_byot

    _check_net(net)
    return build_byot(net, **kwargs)


@register_method("pcl")
def pcl(net: nn.Module, branches: int = 3, **kwargs: Any) -> tuple[KDModel, KDLoss]:
    """Wrap ``net`` for PCL (Peer Collaborative Learning): ONE's trunk/branch surgery, ``branches`` peers each
    trained on its own random view of the batch, a peer ensemble teacher (a classifier over the peers' concatenated
    features) and the peers' temporal means, which teach the other peers; the temporal mean of peer 0 is the
    deployed model. Returns ``(model, loss_fn)``.

    Options (``augment``, ``mean_decay``, ``split``, ``temperature``, ``rampup_steps``, ...): see
    :class:`kdwrap.methods.pcl.PCLModel` and :class:`kdwrap.methods.pcl.PCLLoss`; an unknown one raises
    :class:`OptionError` listing the valid ones.
    """
    from .methods.pcl import build_pcl

    _check_net(net)
    return build_pcl(net, branches=branches, **kwargs)


def wrap(net: nn.Module, method: str = "one", **kwargs: Any) -> tuple[KDModel, KDLoss]:
    """Wrap ``net`` for online KD with ``method`` (a name in :data:`METHODS`). Returns ``(model, loss_fn)``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[method](net, **kwargs)


def _kd_model(model: nn.Module) -> KDModel:
    inner = unwrap(model)
    if not isinstance(inner, KDModel):
        raise TypeError(
            f"expected a model returned by kdwrap.wrap/{'/'.join(METHODS)} (possibly inside DDP or torch.compile), "
            f"got {type(inner).__name__}"
        )
    return inner


def export(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Return the deployable plain model of a kdwrap model (the original class, original ``state_dict`` keys).

    ONE: ``branch=i`` picks the branch kept (default: the one ``model(x)`` returns); ``ensemble=True`` returns the
    gated ensemble (ONE-E) as a module with a plain Tensor output. OSAKD: the original model, with no hook. KD: the
    student (never the teacher). DML: ``peer=i`` picks the peer kept (default: the one ``model(x)`` returns). OKDDip: the group leader (or
    ``branch=i``). BYOT: the network without its exits, or ``exits=True`` for a multi-exit model returning every
    exit's logits. PCL: the temporal mean of peer 0 (or ``branch=i``; ``mean=False`` for the live peer).
    """
    return _kd_model(model).export(**kwargs)


def summary(model: nn.Module, **kwargs: Any) -> str:
    """A human-readable description of a kdwrap model: method, split, parameter counts, FLOP shares."""
    return _kd_model(model).summary(**kwargs)
