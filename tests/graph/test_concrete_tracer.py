"""ONE on models plain torch.fx cannot trace: Hugging Face image classifiers (decorated forwards with **kwargs, shape
checks) and user code that asks traced shapes questions. They are traced with values on an example input
(kdwrap.graph.concrete_tracer); the wrapper trains, exports the user's own class with equal outputs, and leaves the
model, its buffers and the global RNG as they were."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdwrap
from kdwrap import graph

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra: pip install 'kdwrap[hf]'")


def tiny_vit():
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4,
                                    num_attention_heads=2, intermediate_size=64, num_labels=10)
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config)


def tiny_swin():
    config = transformers.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1, 2, 1],
                                     num_heads=[1, 1, 2, 2], window_size=2, num_labels=10)
    torch.manual_seed(0)
    return transformers.SwinForImageClassification(config)


def tiny_convnext():
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1], num_labels=10)
    torch.manual_seed(0)
    return transformers.ConvNextForImageClassification(config)


class SquareTokens(nn.Module):
    """Hand-written: the forward reads the token grid's side as a Python number (``int(n ** 0.5)``) and checks
    the input's channels, two things plain fx cannot trace."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(4)])
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        if x.shape[1] != 3:
            raise ValueError("expected RGB")
        t = self.embed(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            t = t + block(t)
        side = int(math.sqrt(t.shape[1]))
        grid = t.transpose(1, 2).reshape(t.shape[0], 16, side, side)
        return self.head(F.relu(self.conv(grid)).mean((2, 3)))


class FrozenBatch(nn.Module):
    """Turns the batch size into a Python number: a graph traced on one batch size cannot serve another."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if x.shape[1] != 3:
            raise ValueError("expected RGB")
        f = self.conv(x).mean((2, 3))
        return self.fc(f) + torch.zeros(int(x.shape[0]), 4)


def logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("make, split, values", [
    (tiny_vit, "vit.layers.3", 1), (tiny_swin, "swin.encoder.layers.3", 3),
    (tiny_convnext, "convnext.encoder.stages.3", 1),
])
def test_hf_classifier_trains_with_one_and_exports_its_own_class(make, split, values):
    net = make()
    keys = set(net.state_dict())
    model, loss_fn = kdwrap.one(net, branches=3, output="logits")
    assert model.split == split and model.cut_values == values
    size = net.config.image_size if hasattr(net.config, "image_size") else 32
    x, y = torch.randn(3, 3, size, size), torch.tensor([0, 1, 2])
    loss = loss_fn(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():  # every trunk, branch and gate parameter learns
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    model.eval()
    deployed = kdwrap.export(model).eval()
    assert type(deployed) is type(net) and set(deployed.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(deployed(x).logits, model(x), rtol=1e-5, atol=1e-6)
        assert logits(deployed(torch.randn(7, 3, size, size))).shape == (7, 10)


def test_tracing_with_values_leaves_the_model_buffers_and_rng_as_they_were():
    net = tiny_swin()
    blocks = [m for m in net.modules() if hasattr(m, "window_size") and hasattr(m, "shift_size")]
    before = [(m.window_size, m.shift_size) for m in blocks]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(1)
    expected = torch.rand(3)
    net.eval()
    torch.manual_seed(1)
    traced = graph.trace(net, training=True)
    assert torch.equal(torch.rand(3), expected)  # dropout ran on the example without consuming the user's RNG
    assert traced.example is not None and not any(m.training for m in net.modules())
    assert [(m.window_size, m.shift_size) for m in blocks] == before  # no proxy left on a module
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_a_user_model_with_shape_questions_is_traced_with_values_and_keeps_the_plain_path_otherwise():
    net = SquareTokens()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(net)  # plain fx cannot: the forward asks x.shape[1] != 3
    model, loss_fn = kdwrap.one(net, branches=2, input_size=(3, 16, 16), split="conv")
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    loss_fn(model(x), y).backward()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(kdwrap.export(model).eval()(x), model(x))
    assert graph.trace(nn.Sequential(nn.Linear(4, 4)), training=False).example is None  # plain fx when it can


def test_a_batch_size_frozen_into_the_graph_is_a_trace_error_at_wrap_time():
    with pytest.raises(kdwrap.TraceError, match="turns a traced size into a Python number"):
        kdwrap.one(FrozenBatch(), branches=2, input_size=(3, 8, 8), split="fc")


def test_an_example_of_the_wrong_size_names_input_size_as_the_fix():
    net = SquareTokens()
    with pytest.raises(kdwrap.TraceError, match=r"input_size=\(C, H, W\)"):
        kdwrap.one(net, branches=2, input_size=(4, 16, 16), split="conv")
