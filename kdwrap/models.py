"""Small reference classifiers used by kdwrap's demo, tests and benchmarks.

* :func:`cifar_resnet` - the CIFAR ResNet of He et al. (2016), the backbone of the ONE paper (ResNet-32/110).
* :func:`small_cnn` - the 2 conv + 2 fc network of the OSAKD paper's Fashion-MNIST experiments.
* :func:`lenet5` - the LeNet-5 layout of the OSAKD paper's CIFAR-10 experiments (2 conv + 3 fc).

Importing this module registers ``cifar_resnet20/32/44/56/110``, ``small_cnn`` and ``lenet5`` with timm, so
``timm.create_model("cifar_resnet32", num_classes=100)`` works (no pretrained weights exist for them).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "SmallCNN",
    "cifar_resnet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "small_cnn",
    "LeNet5",
    "lenet5",
    "CIFAR_RESNET_DEPTHS",
]

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)


def _cfg(input_size: tuple[int, int, int], num_classes: int, **extra: Any) -> dict[str, Any]:
    # Mirrors the keys of timm's pretrained_cfg that tools read (kdwrap reads input_size to trace shapes).
    return {
        "url": "",
        "num_classes": num_classes,
        "input_size": input_size,
        "pool_size": None,
        "mean": (0.5,) * input_size[0],
        "std": (0.5,) * input_size[0],
        "first_conv": "conv1",
        "classifier": "fc",
        **extra,
    }


class _CfgMixin:
    """timm convention: ``pretrained_cfg`` is a dict attribute and ``default_cfg`` an alias of it."""

    pretrained_cfg: dict[str, Any]

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

    def get_classifier(self) -> nn.Module:
        """The final linear layer (timm convention)."""
        return self.fc  # type: ignore[attr-defined]


def _check_sizes(num_classes: int, in_chans: int) -> None:
    if num_classes < 1 or in_chans < 1:
        raise ValueError(f"num_classes and in_chans must be >= 1, got {num_classes} and {in_chans}")


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection; a 1x1 conv + BN projection when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # Not in-place: ONE and user hooks may keep references to intermediate activations.
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two 3x3 conv-BN layers plus the shortcut, then ReLU."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(_CfgMixin, nn.Module):
    """CIFAR ResNet (He et al. 2016, section 4.2): a 3x3 stem, three stages of n BasicBlocks with 16/32/64
    channels (stride 1/2/2), global average pooling and a linear classifier; depth = 6n + 2."""

    def __init__(
        self, depth: int = 32, num_classes: int = 10, in_chans: int = 3, width: int = 16, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"CIFAR ResNet depth must be 6n+2 with n >= 1 (e.g. {', '.join(map(str, CIFAR_RESNET_DEPTHS))}), "
                f"got {depth!r}"
            )
        _check_sizes(num_classes, in_chans)
        n = (depth - 2) // 6
        self.depth = depth
        self.drop_rate = drop_rate
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = 4 * width
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(width, width, n, stride=1)
        self.layer2 = self._make_layer(width, 2 * width, n, stride=2)
        self.layer3 = self._make_layer(2 * width, 4 * width, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        self.pretrained_cfg = _cfg((in_chans, 32, 32), num_classes, architecture=f"cifar_resnet{depth}")
        self._init_weights()

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # He init with fan_out, as in the ONE reference code (normal(0, sqrt(2 / (k*k*out_channels)))).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before pooling: B x 64 x H/4 x W/4."""
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, 3, H, W)``."""
        x = torch.flatten(self.avgpool(self.forward_features(x)), 1)
        if self.drop_rate > 0:
            x = F.dropout(x, self.drop_rate, self.training)
        return self.fc(x)


class SmallCNN(_CfgMixin, nn.Module):
    """The OSAKD paper's Fashion-MNIST network: conv 32 3x3 -> ReLU -> max-pool, conv 64 3x3 -> ReLU -> max-pool,
    fc 128 -> ReLU -> (dropout) -> fc num_classes. Adaptive average pooling to ``pool_size`` x ``pool_size``
    before the first fc makes it accept any input of at least 4x4 pixels (8x8 digits, 28x28, 32x32)."""

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 10,
        hidden: int = 128,
        drop_rate: float = 0.0,
        pool_size: int = 4,
        input_size: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        _check_sizes(num_classes, in_chans)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = hidden
        self.conv1 = nn.Sequential(nn.Conv2d(in_chans, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.fc1 = nn.Sequential(nn.Flatten(1), nn.Linear(64 * pool_size * pool_size, hidden), nn.ReLU())
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(hidden, num_classes)
        self.pretrained_cfg = _cfg(input_size or (in_chans, 28, 28), num_classes, architecture="small_cnn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, C, H, W)``."""
        x = self.pool(self.conv2(self.conv1(x)))
        return self.fc(self.dropout(self.fc1(x)))


class LeNet5(_CfgMixin, nn.Module):
    """The OSAKD paper's CIFAR-10 network, LeNet-5's layout with ReLU: conv 6 5x5 -> ReLU -> max-pool 2,
    conv 16 5x5 -> ReLU -> max-pool 2, fc 120 -> ReLU -> fc 84 -> ReLU -> fc num_classes. On a 32x32 input the
    second pooling leaves 16 x 5 x 5; other sizes of at least 16x16 are pooled adaptively to 5x5."""

    def __init__(
        self, in_chans: int = 3, num_classes: int = 10, input_size: tuple[int, int, int] | None = None
    ) -> None:
        super().__init__()
        _check_sizes(num_classes, in_chans)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = 84
        self.conv1 = nn.Sequential(nn.Conv2d(in_chans, 6, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
        # An identity on 32x32 inputs (the paper's size); other sizes from 16x16 up are brought to 5x5.
        self.pool = nn.AdaptiveMaxPool2d(5)
        self.fc1 = nn.Sequential(nn.Flatten(1), nn.Linear(16 * 5 * 5, 120), nn.ReLU())
        self.fc2 = nn.Sequential(nn.Linear(120, 84), nn.ReLU())
        self.fc = nn.Linear(84, num_classes)
        self.pretrained_cfg = _cfg(input_size or (in_chans, 32, 32), num_classes, architecture="lenet5")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, C, H, W)``."""
        x = self.pool(self.conv2(self.conv1(x)))
        return self.fc(self.fc2(self.fc1(x)))


def cifar_resnet(depth: int, num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet of ``depth`` = 6n+2 layers (20, 32, 44, 56, 110, ...).

    ``kwargs``: ``in_chans`` (3), ``width`` (16: stage widths 16/32/64), ``drop_rate`` (0: dropout before ``fc``).
    """
    return CifarResNet(depth=depth, num_classes=num_classes, **kwargs)


def small_cnn(in_chans: int = 1, num_classes: int = 10, **kwargs: Any) -> SmallCNN:
    """The OSAKD paper's 2 conv + 2 fc Fashion-MNIST CNN. ``kwargs``: ``hidden``, ``drop_rate``, ``pool_size``."""
    return SmallCNN(in_chans=in_chans, num_classes=num_classes, **kwargs)


def lenet5(in_chans: int = 3, num_classes: int = 10, **kwargs: Any) -> LeNet5:
    """The OSAKD paper's CIFAR-10 network (LeNet-5 layout, ReLU; 62k parameters for 10 classes)."""
    return LeNet5(in_chans=in_chans, num_classes=num_classes, **kwargs)


# --- timm registry -------------------------------------------------------------------------------------------------

# Keys timm.create_model passes to every entrypoint; these models have no pretrained weights, so they are dropped.
_TIMM_KEYS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only", "out_indices")


def _timm_entry(name: str, build: Callable[..., nn.Module], num_classes: int, pretrained: bool,
                kwargs: dict[str, Any]) -> nn.Module:
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; create it with pretrained=False")
    for key in _TIMM_KEYS:
        kwargs.pop(key, None)
    device = kwargs.pop("device", None)
    dtype = kwargs.pop("dtype", None)
    kwargs.pop("drop_path_rate", None)  # no stochastic depth in these models; ignore timm's generic option
    model = build(num_classes=num_classes, **kwargs)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


def cifar_resnet20(num_classes: int = 10, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-20 (0.27M parameters for 10 classes)."""
    return _timm_entry("cifar_resnet20", lambda **kw: cifar_resnet(20, **kw), num_classes, pretrained, kwargs)


def cifar_resnet32(num_classes: int = 10, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-32 (0.47M parameters for 10 classes), the ONE paper's main model."""
    return _timm_entry("cifar_resnet32", lambda **kw: cifar_resnet(32, **kw), num_classes, pretrained, kwargs)


def cifar_resnet44(num_classes: int = 10, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-44 (0.66M parameters for 10 classes)."""
    return _timm_entry("cifar_resnet44", lambda **kw: cifar_resnet(44, **kw), num_classes, pretrained, kwargs)


def cifar_resnet56(num_classes: int = 10, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-56 (0.86M parameters for 10 classes)."""
    return _timm_entry("cifar_resnet56", lambda **kw: cifar_resnet(56, **kw), num_classes, pretrained, kwargs)


def cifar_resnet110(num_classes: int = 10, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-110 (1.7M parameters for 10 classes), the ONE paper's larger model."""
    return _timm_entry("cifar_resnet110", lambda **kw: cifar_resnet(110, **kw), num_classes, pretrained, kwargs)


def _timm_small_cnn(num_classes: int = 10, pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    return _timm_entry("small_cnn", small_cnn, num_classes, pretrained, kwargs)


_timm_small_cnn.__name__ = "small_cnn"  # timm registers an entrypoint under its function name
_timm_small_cnn.__qualname__ = "small_cnn"


def _timm_lenet5(num_classes: int = 10, pretrained: bool = False, **kwargs: Any) -> LeNet5:
    return _timm_entry("lenet5", lenet5, num_classes, pretrained, kwargs)


_timm_lenet5.__name__ = "lenet5"
_timm_lenet5.__qualname__ = "lenet5"

TIMM_MODELS = ("cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "cifar_resnet110", "small_cnn",
               "lenet5")


def _register_with_timm() -> bool:
    """Register this module's models with timm; returns False if this timm version has no usable registry."""
    try:
        from timm.models import register_model
        from timm.models._registry import is_model
    except Exception:  # pragma: no cover - timm is a dependency, but keep kdwrap.models importable without it
        return False
    for fn in (cifar_resnet20, cifar_resnet32, cifar_resnet44, cifar_resnet56, cifar_resnet110, _timm_small_cnn,
               _timm_lenet5):
        if not is_model(fn.__name__):  # re-import (e.g. importlib.reload) must not warn about overwriting
            register_model(fn)
    return True


TIMM_REGISTERED = _register_with_timm()
