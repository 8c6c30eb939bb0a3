"""Tracing (kdwrap.graph): the errors of a model fx cannot trace and the options that fix them, optional inputs,
buffers read in forward, and the input kdwrap guesses for a model."""
import pytest
import torch
from torch import nn

import kdwrap
from conftest import TinyNet
from kdwrap import TraceError


class Untraceable(TinyNet):
    def forward(self, x):
        x = self.stage1(self.stem(x))
        if x.sum() > 0:  # data-dependent control flow
            x = x * 2
        return self.fc(self.pool(self.stage2(x)).flatten(1))


def test_untraceable_model_names_the_problem():
    with pytest.raises(TraceError, match="torch.fx cannot trace Untraceable.*leaf_modules"):
        kdwrap.one(Untraceable())


def test_leaf_modules_option_makes_a_model_traceable():
    class Odd(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    class Net(TinyNet):
        def __init__(self):
            super().__init__()
            self.odd = Odd()

        def forward(self, x):
            return self.fc(self.pool(self.stage2(self.odd(self.stage1(self.stem(x))))).flatten(1))

    with pytest.raises(TraceError, match="'odd'"):
        kdwrap.one(Net())
    model, loss_fn = kdwrap.one(Net(), leaf_modules=[Odd])
    loss_fn(model(torch.randn(2, 3, 16, 16)), torch.tensor([0, 1])).backward()


class MaskedNet(TinyNet):
    """Branches on an optional input, as timm Hiera does: fx sees a proxy, never None, and takes the masked path."""

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask.view(-1, 1, 1, 1)
        return super().forward(x)


def test_an_optional_input_the_forward_branches_on_is_traced_as_none():
    model, loss_fn = kdwrap.one(MaskedNet(), input_size=(3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    loss_fn(model(x), torch.randint(0, 5, (4,))).backward()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(kdwrap.export(model).eval()(x), model(x))


@pytest.mark.parametrize("execution", ["sequential", "fused"])
def test_buffers_read_in_forward_follow_load_state_dict(execution):
    """torchvision's FrozenBatchNorm2d computes with its buffers in forward: they must not be traced as constants."""
    import torchvision
    from torchvision.ops import FrozenBatchNorm2d

    net = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d, num_classes=4)
    model, _ = kdwrap.one(net, branches=2, execution=execution)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.load_state_dict({k: v + 1.0 if k.endswith("running_mean") else v for k, v in model.state_dict().items()})
        after = model(x)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(kdwrap.export(model).eval()(x), after, atol=1e-5, rtol=1e-5)


class LateStem(TinyNet):
    """Registers a 64-channel convolution before its stem, as timm CSATv2 does; says its input channels."""

    in_chans = 3

    def __init__(self):
        super().__init__()
        proj = nn.Conv2d(64, 32, 1)  # used after the stem in a real model; registered first here
        self._modules = {"proj": proj, **self._modules}


def test_guessed_input_takes_the_models_own_channels_over_its_first_convolution():
    from kdwrap.graph.inputs import _guess_input_size

    assert _guess_input_size(LateStem()) == (3, 224, 224)
    assert _guess_input_size(TinyNet()) == (3, 224, 224)  # no word from the model: its first convolution's
