"""The split (kdwrap.graph): which names mark a place in the model, the cuts that cannot work and their errors,
the logits among several outputs, and the default split of a model that downsamples in forward."""
import pytest
import torch
import torchvision
from torch import nn

import kdwrap
from conftest import FunctionalLeNet, TinyNet
from kdwrap import SplitError


def _x(b=4):
    return torch.randn(b, 3, 16, 16)


def test_unknown_split_lists_valid_names(tiny_net):
    with pytest.raises(SplitError) as info:
        kdwrap.one(tiny_net, split="stage3")
    msg = str(info.value)
    assert "'stage3' is not a module" in msg and "stage2" in msg and "stem" in msg


def test_split_at_first_module_leaves_no_trunk(tiny_net):
    with pytest.raises(SplitError, match="no trunk"):
        kdwrap.one(tiny_net, split="stem")


def test_split_leaving_no_parameters_in_tail():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
                        nn.Identity())
    with pytest.raises(SplitError, match="no parameters"):
        kdwrap.one(net, split="5")


def test_auto_split_of_a_model_that_downsamples_in_forward_comes_from_the_graph():
    """A hand-written LeNet (F.max_pool2d in forward): the start of its last resolution stage, read from a trial
    forward at input_size, as for kdwrap's module-built LeNet-5; without an input size that fits, a clear error."""
    model, loss_fn = kdwrap.one(FunctionalLeNet(), input_size=(3, 32, 32))
    assert model.split == "conv2"
    x = torch.randn(4, 3, 32, 32)
    loss_fn(model(x), torch.randint(0, 5, (4,))).backward()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(kdwrap.export(model).eval()(x), model(x))
    with pytest.raises(SplitError, match=r"could not choose a split.*input_size=\(C, H, W\)"):
        kdwrap.one(FunctionalLeNet())  # guessed 224 x 224: the fc layers do not fit, no shapes to read


class DictNet(nn.Module):
    """Returns a dict, as Hugging Face-style models do."""

    def __init__(self):
        super().__init__()
        self.net = TinyNet()

    def forward(self, x):
        return {"logits": self.net(x), "pooled": self.net.pool(x).flatten(1)}


def test_one_dict_output_needs_output_and_then_trains_and_exports():
    with pytest.raises(SplitError, match=r"returns a dict in training mode.*output='logits'"):
        kdwrap.one(DictNet(), split="net.stage2")
    with pytest.raises(SplitError, match=r"output='feats' does not name.*'logits', 'pooled'"):
        kdwrap.one(DictNet(), split="net.stage2", output="feats")
    net = DictNet()
    model, loss_fn = kdwrap.one(net, split="net.stage2", output="logits")
    x = _x()
    out = model(x)
    assert type(out) is torch.Tensor and out.shape == (4, 5)
    loss_fn(out, torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    exported = kdwrap.export(model).eval()
    assert type(exported) is DictNet and set(exported.state_dict()) == set(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(exported(x)["logits"], model(x), atol=1e-5, rtol=1e-5)


def test_one_refuses_to_drop_auxiliary_heads():
    """torchvision GoogLeNet returns (logits, aux2, aux1) in training: ONE would leave aux heads untrained."""
    net = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    with pytest.raises(SplitError, match=r"namedtuple GoogLeNetOutputs.*output=<index or key>"):
        kdwrap.one(net)
    with pytest.raises(SplitError, match=r"aux1.*aux_logits=False"):
        kdwrap.one(net, output="logits")
    net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    model, loss_fn = kdwrap.one(net, branches=2)
    loss_fn(model(torch.randn(2, 3, 64, 64)), torch.tensor([1, 2])).backward()


def test_ambiguous_split_of_a_module_called_twice():
    """torchvision's BasicBlock calls its `relu` twice: that name marks two places."""
    with pytest.raises(SplitError, match=r"ambiguous.*2 times.*layer1.0.relu, layer1.0.relu_1"):
        kdwrap.one(torchvision.models.resnet18(), split="layer1.0.relu")
