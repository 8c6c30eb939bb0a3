"""ONE's execution option: fused branches equal sequential ones inside the wrapper, and auto chooses by rule."""
import copy
import re

import pytest
import timm
import torch
from torch import nn

import kdwrap
import kdwrap.models  # noqa: F401  (registers cifar_resnet* with timm)
from conftest import TinyNet
from kdwrap import FusionError
from kdwrap.fused import planner
from kdwrap.fused.planner import FUSE_MAX_GFLOP
from fused_reference import ResLike


def _pair(make, **kwargs):
    """The same initial model wrapped twice: sequential and fused, branches perturbed identically."""
    torch.manual_seed(0)
    net = make()
    wrapped = []
    for execution in ("sequential", "fused"):
        torch.manual_seed(1)
        model, loss_fn = kdwrap.one(copy.deepcopy(net), branches=3, execution=execution, **kwargs)
        with torch.no_grad():
            for b in model.branches[1:]:
                for p in b.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        wrapped.append((model, loss_fn))
    return wrapped


@pytest.mark.parametrize("name", ["cifar_resnet20", "tiny"])
def test_fused_training_steps_equal_sequential(name):
    make = TinyNet if name == "tiny" else (lambda: timm.create_model(name, num_classes=5))
    (seq, seq_loss), (fused, fused_loss) = _pair(make)
    assert fused.execution_plan(8, "cpu") == "fused" and seq.execution_plan(8, "cuda") == "sequential"
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (seq, fused)]
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)
        losses = []
        for (model, loss_fn), opt in zip(((seq, seq_loss), (fused, fused_loss)), opts):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
        for (n, p), q in zip(seq.named_parameters(), fused.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda e, n=n: f"{n}: {e}")
        for opt in opts:
            opt.step()
        for (n, a), b in zip(seq.state_dict().items(), fused.state_dict().values(), strict=True):
            if torch.is_tensor(a):
                # BN running stats included
                torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=lambda e, n=n: f"{n}: {e}")
        # Rounding differences of one step must not compound: a freshly initialised net at lr 0.1 amplifies 1e-7
        # parameter differences into percent-level trunk gradient differences within a step (seen on an AVX-512
        # CPU). The next step starts both from the sequential state; the fused graph must read it live.
        fused.load_state_dict(seq.state_dict())
        fused_loss.load_state_dict(seq_loss.state_dict())
        opts[1].load_state_dict(copy.deepcopy(opts[0].state_dict()))  # a copy: loading aliases the buffers
    seq.eval(), fused.eval()
    with torch.no_grad():
        x = torch.randn(4, 3, 32, 32)
        torch.testing.assert_close(fused.forward_ensemble(x), seq.forward_ensemble(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kdwrap.export(fused).eval()(x), seq(x), atol=1e-5, rtol=1e-5)


def test_auto_runs_sequential_on_cpu_and_fuses_small_tails_on_cuda(monkeypatch):
    model, _ = kdwrap.one(timm.create_model("cifar_resnet32"), branches=3)
    per_sample = model.branch_execution.tail_gflop_per_sample
    assert 0.04 < per_sample < 0.05  # ResNet-32's layer3 at 32 px: ~45 MFLOP per sample
    limit = int(FUSE_MAX_GFLOP // per_sample)
    assert model.execution_plan(128, "cpu") == "sequential"
    assert model.execution_plan(limit, "cuda") == "fused"
    assert model.execution_plan(limit + 1, "cuda") == "sequential"
    assert model.execution_plan(8, "cpu") == "sequential"
    # summary() describes the plan of the machine it runs on: no CUDA rule where there is no CUDA device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    text = kdwrap.summary(model)
    assert "auto: sequential on this machine (no CUDA device" in text and "fused on CUDA for" not in text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert f"fused on CUDA for batch <= {limit:,}" in kdwrap.summary(model)


class Dense(nn.Module):
    """A DenseNet-style tail: channel concatenation of per-branch values cannot be fused."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self.stem(x)
        h = torch.cat([h, self.block(h)], 1)
        return self.fc(h.mean((2, 3)))


def test_unfusable_tail_falls_back_under_auto_and_is_an_error_when_fused_is_asked():
    model, loss_fn = kdwrap.one(Dense(), branches=2, split="block")
    assert model.execution_plan(8, "cuda") == "sequential"
    assert "cannot be fused" in kdwrap.summary(model) and "concatenation" in model.fusion_error
    loss_fn(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 0])).backward()
    with pytest.raises(FusionError, match=r"execution='fused' is not possible.*concatenation.*'sequential'"):
        kdwrap.one(Dense(), branches=2, split="block", execution="fused")


def test_unknown_execution_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown execution 'fast'; valid: 'auto', 'sequential', 'fused'"):
        kdwrap.one(TinyNet(), execution="fast")


def test_fused_wrapper_compiles_without_graph_breaks_and_deep_copies():
    model, loss_fn = kdwrap.one(TinyNet(), branches=3, execution="fused")
    x = torch.randn(4, 3, 16, 16)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    model.take_capture()
    twin = copy.deepcopy(model)  # its fused graphs must run the copy's branches, not the original's
    with torch.no_grad():
        for p in twin.branches[0].parameters():
            p.zero_()
    model.eval(), twin.eval()
    with torch.no_grad():
        logits, _ = twin.forward_all(x)
        assert torch.equal(logits[0], twin.branches[0](twin.trunk(x)))
        assert not torch.equal(model.forward_all(x)[0][0], logits[0])


@pytest.fixture
def timed_on_cpu(monkeypatch):
    """execution="auto" times the executions on the CPU as it does on CUDA."""
    monkeypatch.setattr(planner, "MEASURE_DEVICES", ("cpu", "cuda"))


def test_auto_times_both_executions_once_per_input_signature_and_the_step_is_unchanged(timed_on_cpu, monkeypatch):
    (seq, seq_loss), (auto, auto_loss) = _pair(lambda: timm.create_model("cifar_resnet20", num_classes=5))
    auto.execution = "auto"
    calls = []
    timer = auto.branch_execution.time_executions
    monkeypatch.setattr(auto.branch_execution, "time_executions",
                        lambda f, extra: calls.append(f.shape) or timer(f, extra))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)
    for model, loss_fn in ((seq, seq_loss), (auto, auto_loss)):
        loss_fn(model(x), y).backward()
    assert len(calls) == 1
    (sig, ms), = auto.execution_timings.items()
    assert sig == "cpu 8x32x16x16 float32" and set(ms) == {"sequential", "fused"} and min(ms.values()) > 0
    # The timing left no trace: gradients not accumulated, BN statistics (and their counters) as after one step.
    for (n, p), q in zip(seq.named_parameters(), auto.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda e, n=n: f"{n}: {e}")
    for (n, a), b in zip(seq.state_dict().items(), auto.state_dict().values(), strict=True):
        if torch.is_tensor(a):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=lambda e, n=n: f"{n}: {e}")
    auto_loss(auto(x), y)
    assert len(calls) == 1  # same signature: measured once
    auto_loss(auto(x[:6]), y[:6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_loss(auto(x), y)
    assert len(calls) == 3 and "cpu 8x32x16x16 bfloat16 autocast bfloat16" in auto.execution_timings
    with torch.no_grad():
        auto_loss(auto(x[:4]), y[:4])  # nothing to time without autograd: the rule decides
    auto.eval()
    auto_loss(auto(x[:5]), y[:5])
    assert len(calls) == 3
    assert re.search(r"cpu 6x32x16x16 float32: (fused|sequential) \(tail forward \+ backward: sequential [\d.]+ ms, "
                     r"fused [\d.]+ ms\)", kdwrap.summary(auto))


@pytest.mark.parametrize("faster", ["fused", "sequential"])
def test_auto_runs_the_execution_it_timed_faster(timed_on_cpu, faster):
    model, loss_fn = kdwrap.one(TinyNet(), branches=3)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    loss_fn(model(x), y)
    key, = model.branch_execution.timings
    model.branch_execution.timings[key] = {"sequential": 2.0, "fused": 1.0} if faster == "fused" else {"sequential": 1.0, "fused": 2.0}
    fused_calls = []
    graph = model.branch_execution.fused[True]
    model.branch_execution.fused[True] = lambda f, **extra: fused_calls.append(1) or graph(f, **extra)
    loss_fn(model(x), y)
    assert len(fused_calls) == (faster == "fused")


def test_timing_leaves_rng_buffers_and_grads_untouched(timed_on_cpu):
    model, _ = kdwrap.one(ResLike(drop=0.5), branches=3, split="layer2")
    f = model.trunk(torch.randn(6, 3, 16, 16)).detach().requires_grad_()
    buffers = {k: v.clone() for k, v in model.branches.state_dict().items()}
    rng = torch.get_rng_state()
    ms = model.branch_execution.time_executions(f, {})
    assert set(ms) == {"sequential", "fused"}
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.branches.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    assert f.grad is None and all(p.grad is None for p in model.parameters())


def test_auto_follows_the_rule_under_deterministic_algorithms_and_compile(timed_on_cpu):
    model, loss_fn = kdwrap.one(TinyNet(), branches=3)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    torch.use_deterministic_algorithms(True)
    try:
        loss_fn(model(x), y)
    finally:
        torch.use_deterministic_algorithms(False)
    assert model.execution_timings == {}
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert model.execution_timings == {}
