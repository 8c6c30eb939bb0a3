"""The network a comparison trains, by name: a timm model, a torchvision model, or the user's own constructor.

``--model`` takes, in this order of lookup:

========================  ==========================================================================================
``package.module:name``   ``name(num_classes=N)`` from an importable module (``in_chans=C`` too when it takes it)
timm model name           ``timm.create_model(name, pretrained=False, in_chans=C, num_classes=N)``; kdwrap's own
                          ``lenet5``, ``small_cnn`` and ``cifar_resnet*`` are registered with timm
torchvision model name    ``torchvision.models.get_model(name, weights=None, num_classes=N)`` (3 channels only)
========================  ==========================================================================================

Every network is untrained. The image size is recorded as timm's ``pretrained_cfg["input_size"]``, where kdwrap
reads the input shape it traces the model with (ONE, OKDDip and PCL cut the model by tracing it).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from torch import nn

__all__ = ["create_model", "model_source"]


def _user_constructor(name: str) -> Callable[..., Any]:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--model {name}: cannot import module {module_name!r} ({e}); make it importable (install "
                         "the package, or run from the folder that holds it)") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--model {name}: module {module_name!r} has no callable {attr!r}; name a function or "
                         "class that takes num_classes= and returns an nn.Module")
    return factory


def _create_user(name: str, in_chans: int, num_classes: int) -> nn.Module:
    factory = _user_constructor(name)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C extension: no signature to read, so no in_chans
        params = {}
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if "in_chans" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs["in_chans"] = in_chans
    net = factory(**kwargs)
    if not isinstance(net, nn.Module):
        raise ValueError(f"--model {name}: returned {type(net).__name__}, not a torch.nn.Module")
    return net


def _create_timm(name: str, in_chans: int, num_classes: int) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes)


def _torchvision_names() -> set[str]:
    try:
        from torchvision import models
    except ImportError:  # pragma: no cover - depends on the environment
        return set()
    return set(models.list_models())


def _create_torchvision(name: str, in_chans: int, num_classes: int) -> nn.Module:
    from torchvision import models

    if in_chans != 3:
        raise ValueError(f"--model {name}: torchvision's models take 3-channel images, these have {in_chans}; use "
                         "a timm model (they take in_chans) or a folder of colour images")
    return models.get_model(name, weights=None, num_classes=num_classes)


def model_source(name: str) -> str:
    """Which constructor ``name`` names: ``"user"``, ``"timm"`` or ``"torchvision"``; ``ValueError`` if none."""
    import timm

    from .. import models as _models  # noqa: F401  (registers kdwrap's models with timm)

    if ":" in name:
        return "user"
    if timm.is_model(name):
        return "timm"
    if name in _torchvision_names():
        return "torchvision"
    raise ValueError(
        f"unknown model {name!r}: expected a timm model name (see timm.list_models()) or one of kdwrap's "
        f"{', '.join(_models.TIMM_MODELS)}, a torchvision model name (torchvision.models.list_models()), or "
        "package.module:callable for your own model"
    )


# How each source builds a network; model_source picks the row.
_CONSTRUCTORS: dict[str, Callable[[str, int, int], nn.Module]] = {
    "user": _create_user,
    "timm": _create_timm,
    "torchvision": _create_torchvision,
}


def create_model(
    name: str, in_chans: int, num_classes: int, input_size: tuple[int, int, int] | None = None
) -> nn.Module:
    """An untrained network by name (see the module's table), with ``input_size`` (C, H, W) recorded as the size
    kdwrap traces it with."""
    net = _CONSTRUCTORS[model_source(name)](name, in_chans, num_classes)
    cfg = getattr(net, "pretrained_cfg", None)
    if input_size is not None:
        # kdwrap reads input_size to trace the model; make it the data's image size, not the model's usual one.
        net.pretrained_cfg = {**(cfg if isinstance(cfg, dict) else {}), "input_size": tuple(input_size)}
    return net
