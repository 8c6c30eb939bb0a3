"""kdwrap.controls: the free controls (label smoothing, a weight average) against hand-written references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdwrap.controls import WeightAverage, label_smoothing_loss


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def _steps(net: nn.Module, average: WeightAverage, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` SGD steps with an update of the average after each; the live weights after each step."""
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    seen = []
    for step in range(n):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        average.update()
        seen.append({k: p.detach().clone() for k, p in net.named_parameters()})
    return seen


def test_the_average_follows_the_mean_teacher_rule_step_by_step() -> None:
    torch.manual_seed(0)
    net = BNNet()
    average = WeightAverage(net, decay=0.6)
    seen = _steps(net, average, 5)
    # Hand-written: a_n = min(decay, 1 - 1/(n+1)); the first update copies, the second takes the mean of two, ...
    expected = {k: torch.zeros_like(v) for k, v in seen[0].items()}
    for n, weights in enumerate(seen):
        a = min(0.6, 1 - 1 / (n + 1))
        expected = {k: a * expected[k] + (1 - a) * weights[k] for k in weights}
    for k, v in expected.items():
        torch.testing.assert_close(average.average.get_buffer(k), v, rtol=1e-6, atol=1e-7)
    assert int(average.updates) == 5
    # while warm (decay not yet reached) it is the plain mean of the weights seen
    torch.manual_seed(0)
    net2 = BNNet()
    warm = WeightAverage(net2, decay=0.999)
    seen2 = _steps(net2, warm, 3)
    torch.testing.assert_close(warm.average.get_buffer("fc.weight"),
                               sum(w["fc.weight"] for w in seen2) / 3, rtol=1e-6, atol=1e-7)


def test_no_gradient_or_optimizer_reaches_the_average_and_buffers_follow_the_live_net() -> None:
    torch.manual_seed(0)
    net = BNNet()
    average = WeightAverage(net)
    assert list(average.parameters()) == []  # nothing for an optimizer or autograd to touch
    assert not any(b.requires_grad for b in average.buffers())
    _steps(net, average, 2)
    # BatchNorm statistics are the live network's (copied, not averaged)
    torch.testing.assert_close(average.average.bn.running_mean, net.bn.running_mean)
    assert int(average.average.bn.num_batches_tracked) == int(net.bn.num_batches_tracked) == 2
    # the wrapper's state_dict holds the average alone, under the net's own keys
    keys = set(average.state_dict())
    assert {f"average.{k}" for k in net.state_dict()} | {"updates"} == keys


def test_export_is_the_users_class_with_the_averaged_weights_and_equal_outputs() -> None:
    torch.manual_seed(0)
    net = BNNet()
    average = WeightAverage(net, decay=0.5)
    _steps(net, average, 4)
    deployed = average.export()
    assert type(deployed) is BNNet and deployed is not net
    assert deployed.state_dict().keys() == net.state_dict().keys()
    assert all(p.grad is None for p in deployed.parameters())
    x = torch.randn(3, 3, 8, 8)
    deployed.eval()
    average.eval()
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), average(x))
        assert not torch.allclose(deployed(x), net.eval()(x))  # the average is not the live network


def test_the_average_resumes_from_its_state_dict() -> None:
    torch.manual_seed(0)
    net = BNNet()
    average = WeightAverage(net, decay=0.9)
    _steps(net, average, 3)
    restored = WeightAverage(net, decay=0.9)
    restored.load_state_dict(average.state_dict())
    assert int(restored.updates) == 3
    torch.testing.assert_close(restored.average.fc.weight, average.average.fc.weight)


@pytest.mark.parametrize("decay", [1.0, -0.1, True])
def test_a_bad_decay_is_a_clear_error(decay) -> None:
    with pytest.raises(ValueError, match=r"decay must be a float in \[0, 1\)"):
        WeightAverage(BNNet(), decay=decay)


def test_label_smoothing_equals_the_smoothed_target_cross_entropy() -> None:
    torch.manual_seed(0)
    z, y = torch.randn(7, 5), torch.randint(0, 5, (7,))
    eps = 0.1
    target = torch.full((7, 5), eps / 5).scatter_(1, y[:, None], 1 - eps + eps / 5)
    reference = -(target * z.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(label_smoothing_loss(eps)(z, y), reference)
    torch.testing.assert_close(label_smoothing_loss(0.0)(z, y), F.cross_entropy(z, y))
    with pytest.raises(ValueError, match="label smoothing must be in"):
        label_smoothing_loss(1.0)
