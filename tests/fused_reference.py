"""Reference networks and checks shared by the fused-execution tests: a CIFAR-ResNet-like network with option-A
shortcuts, and the comparison of fused against sequential branch execution (outputs, gradients, one SGD step)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from kdwrap.fused import fuse_branches


class OptionABlock(nn.Module):
    """CIFAR ResNet basic block with the option-A shortcut (subsample, zero-pad the channels) or identity."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad, self.stride = (cout - cin) // 2, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1 or self.pad:
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


class ResLike(nn.Module):
    """Identity shortcuts, option-A shortcuts (on the trunk output and inside the tail), `view(size(0), -1)` and
    an MLP head with BatchNorm1d and dropout."""

    def __init__(self, num_classes: int = 5, drop: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(OptionABlock(8, 8, 1), OptionABlock(8, 16, 2))
        self.layer2 = nn.Sequential(OptionABlock(16, 32, 2), OptionABlock(32, 32, 1))
        self.head = nn.Sequential(
            nn.Linear(32, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Dropout(drop), nn.Linear(24, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.head(x.view(x.size(0), -1))


def perturb_branches(model: nn.Module) -> None:
    """Make the branches differ, and give BN buffers non-trivial (and per-branch different) values."""
    with torch.no_grad():
        for i, b in enumerate(model.branches):
            for p in b.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            for mod in b.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                    mod.running_mean.normal_(0, 0.2)
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.num_batches_tracked.fill_(3 + i)


def branch_state(branches: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in branches.state_dict().items()}


def assert_fused_equals_sequential(
    model: nn.Module, x: torch.Tensor, training: bool, rtol: float = 1e-4, conv_mode: str = "auto"
) -> None:
    """Fused vs sequential: outputs, gradients of every branch parameter and of the trunk output, and parameters
    and buffers after an SGD step."""
    model.train(training)
    with torch.no_grad():
        f0 = model.trunk(x)
    # Sequential runs on an exact copy. (GraphModule.__deepcopy__ re-runs __init__, which resets the copy to
    # training mode: set the mode again.)
    ref = copy.deepcopy(model.branches).train(training)
    fused = fuse_branches(model.branches, training, conv_mode)
    f_fused = f0.clone().requires_grad_()
    f_ref = f0.clone().requires_grad_()
    outs = fused(f_fused)
    refs = [b(f_ref) for b in ref]
    assert len(outs) == len(refs) == len(model.branches)
    scale = max(r.abs().max().item() for r in refs)
    for o, r in zip(outs, refs, strict=True):
        assert o.shape == r.shape and o.dtype == r.dtype
        torch.testing.assert_close(o, r, rtol=rtol, atol=rtol * scale)
    grads = [torch.randn_like(r) for r in refs]
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(refs, grads)
    named_f = dict(model.branches.named_parameters())
    named_r = dict(ref.named_parameters())
    gscale = max(p.grad.abs().max().item() for p in named_r.values() if p.grad is not None)
    for name, p in named_r.items():
        q = named_f[name]
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), name
            continue
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=rtol * gscale, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(f_fused.grad, f_ref.grad, rtol=rtol, atol=rtol * f_ref.grad.abs().max().item())
    for params in (model.branches.parameters(), ref.parameters()):
        torch.optim.SGD(params, lr=0.1).step()
    s_f, s_r = branch_state(model.branches), branch_state(ref)
    assert s_f.keys() == s_r.keys()
    for k in s_r:
        torch.testing.assert_close(s_f[k], s_r[k], rtol=rtol, atol=rtol, msg=lambda m: f"{k}: {m}")
