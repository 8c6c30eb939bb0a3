"""ONE (and OKDDip) at cuts crossed by several values: the trunk hands every crossing value to every branch, the gate
pools the main one (the largest tensor), fused execution falls back with the reason, export is unchanged."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import kdwrap
from kdwrap import FusionError


class TwoStream(nn.Module):
    """Two streams at two resolutions, joined at the head: a cut between the streams' stages is crossed by both."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a1 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.a2 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        s = self.stem(x)
        a, b = self.a1(s), self.b1(F.avg_pool2d(s, 2))
        a, b = self.a2(a), self.b2(b)
        return self.fc(torch.cat([a.mean((2, 3)), b.mean((2, 3))], 1))


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class TokensWithSizes(nn.Module):
    """A class token and a grid of patch tokens; after the blocks the grid is rebuilt from the spatial sizes the
    stem read, so the last blocks' cut is crossed by the tokens and by those sizes."""

    def __init__(self, num_classes=5, dim=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(4)])
        self.mix = nn.Conv2d(dim, dim, 3, padding=1)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x)
        b, c, h, w = x.shape
        t = torch.cat([self.cls_token.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], 1)
        t = self.blocks(t)
        grid = t[:, 1:].transpose(1, 2).reshape(b, c, h, w)
        return self.head(self.mix(grid).mean((2, 3)) + t[:, 0])


CASES = {
    "two streams": (TwoStream, "a2", 2),
    "class token and spatial sizes": (TokensWithSizes, None, 5),  # tokens, b, c, h, w
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["one", "okddip"])
def test_trains_and_exports_equal_outputs(case, method):
    make, split, values = CASES[case]
    net = make()
    keys = list(net.state_dict())
    model, loss_fn = kdwrap.wrap(net, method=method, branches=3, split=split, input_size=(3, 16, 16))
    assert model.cut_values == values
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    loss = loss_fn(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for b in model.branches for p in b.parameters())
    model.eval()
    deployed = kdwrap.export(model).eval()
    assert type(deployed) is make and list(deployed.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x))
    twin, _ = kdwrap.wrap(make(), method=method, branches=3, split=split, input_size=(3, 16, 16))
    twin.load_state_dict(model.state_dict())
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))


def test_the_gate_pools_the_largest_crossing_tensor_and_the_ensemble_exports():
    model, loss_fn = kdwrap.one(TwoStream(), split="a2", input_size=(3, 16, 16))
    assert model.gate.channels == 16 and model.trunk_channels_dim == 1  # stream a: 16 x 16 x 16, b: 8 x 8 x 8
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(kdwrap.export(model, ensemble=True).eval()(x), model.forward_ensemble(x))


def test_fused_execution_falls_back_with_the_reason():
    model, _ = kdwrap.one(TwoStream(), split="a2", input_size=(3, 16, 16))
    assert "crossed by 2 values" in model.fusion_error
    assert "cut: crossed by 2 values" in kdwrap.summary(model) and "the gate pools" in kdwrap.summary(model)
    with pytest.raises(FusionError, match="crossed by 2 values"):
        kdwrap.one(TwoStream(), split="a2", input_size=(3, 16, 16), execution="fused")


def test_a_split_inside_a_residual_block_hands_the_shortcut_to_every_branch():
    net = torchvision.models.resnet18(num_classes=4)
    model, loss_fn = kdwrap.one(net, split="layer4.0.conv2", input_size=(3, 32, 32))
    assert model.cut_values == 2  # the block's input (for its downsampling shortcut) and conv1's output
    x = torch.randn(2, 3, 32, 32)
    loss_fn(model(x), torch.tensor([0, 1])).backward()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(kdwrap.export(model).eval()(x), model(x))
