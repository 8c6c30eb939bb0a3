"""Property-based: random small conv nets and MLPs, random split points; wrap, step and export keep ONE's invariants."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kdwrap
from kdwrap import SplitError


@st.composite
def nets(draw):
    """An nn.Sequential classifier (conv or MLP) and its input shape."""
    classes = draw(st.integers(2, 6))
    if draw(st.booleans()):
        layers, c = [], 3
        for _ in range(draw(st.integers(1, 4))):
            out = draw(st.sampled_from([4, 8]))
            stride = draw(st.sampled_from([1, 2]))
            layers += [nn.Conv2d(c, out, 3, stride=stride, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            c = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
        return nn.Sequential(*layers), (3, 8, 8)
    layers, d = [nn.Flatten()], 12
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.sampled_from([6, 10]))
        layers += [nn.Linear(d, out), nn.ReLU()]
        d = out
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers), (12,)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_random_models_and_splits(data):
    net, shape = data.draw(nets())
    index = data.draw(st.integers(0, len(net) - 1))
    branches = data.draw(st.integers(2, 4))
    tail_has_params = any(p.numel() for m in list(net)[index:] for p in m.parameters())
    if index == 0 or not tail_has_params:
        with pytest.raises(SplitError):
            kdwrap.one(net, branches=branches, split=str(index))
        return
    keys = set(net.state_dict())
    n_plain = sum(p.numel() for p in net.parameters())
    model, loss_fn = kdwrap.one(net, branches=branches, split=str(index))
    x = torch.randn(4, *shape)
    y = torch.randint(0, net[-1].out_features, (4,))
    loss = loss_fn(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    trunk = sum(p.numel() for p in model.trunk.parameters())
    branch = sum(p.numel() for p in model.branches[0].parameters())
    assert trunk + branch == n_plain
    assert sum(p.numel() for p in model.parameters()) == trunk + branches * branch + sum(
        p.numel() for p in model.gate.parameters()
    )
    model.eval()
    exported = kdwrap.export(model).eval()
    assert type(exported) is nn.Sequential and set(exported.state_dict()) == keys
    with torch.no_grad():
        assert torch.allclose(exported(x), model(x), atol=1e-5)
