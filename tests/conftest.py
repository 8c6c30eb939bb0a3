import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _keeps_torch_thread_count():
    """A test that changes torch's global thread count must give it back: later tests compare losses bit for bit
    with fresh processes, which start with torch's default."""
    threads = torch.get_num_threads()
    yield
    assert torch.get_num_threads() == threads, f"the test left torch's thread count at {torch.get_num_threads()}"


class TinyNet(nn.Module):
    """A small CNN with a stem, two stages and a head: the ONE split lands at `stage2`."""

    def __init__(self, num_classes: int = 5, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stage2(self.stage1(self.stem(x)))).flatten(1))


class ConvHeadNet(TinyNet):
    """TinyNet with SqueezeNet's head: a 1x1 convolution makes the logits, then ReLU and global pooling."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__(num_classes)
        del self.fc, self.pool
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(32, num_classes, 1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.stage2(self.stage1(self.stem(x)))).flatten(1)


@pytest.fixture
def tiny_net() -> TinyNet:
    return TinyNet()


class FunctionalLeNet(nn.Module):
    """LeNet-5 written as a newcomer writes it: its downsampling is F.max_pool2d in forward, not a module."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(nn.functional.relu(self.fc2(nn.functional.relu(self.fc1(x)))))


class DictTinyNet(TinyNet):
    """TinyNet whose forward returns ``{"logits": ...}``: a container output, with no ``output=`` to name it."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": super().forward(x)}


def tiny_hf_vit(seed: int = 0) -> nn.Module:
    """A tiny Hugging Face ``ViTForImageClassification`` (10 classes, 32x32 inputs), which returns an
    ``ImageClassifierOutput``; skips the test where transformers is not installed."""
    transformers = pytest.importorskip(
        "transformers", reason="transformers is an optional extra: pip install 'kdwrap[hf]'"
    )
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=10)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.ViTForImageClassification(config)


def vit_batch(seed: int = 0, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
