"""PCL's execution option: the peers and their mean teachers run as one fused graph each, every peer on the trunk's
output for its own view, with the values, gradients, BatchNorm statistics and temporal means of sequential
execution; ``"auto"`` falls back (and says why) where a tail cannot be fused."""
import copy

import pytest
import torch
from torch import nn

import kdwrap
from conftest import ConvHeadNet, TinyNet
from kdwrap import FusionError
from kdwrap.fused import planner
from fused_reference import ResLike


def _batch(step, b=8):
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 5, (b,), generator=g)


def _count_calls(model):
    """Wrap the fused graphs of the peers and of the mean teachers so that their calls are counted."""
    calls = {"peers": 0, "means": 0}

    def count(fused, key):
        forward = fused._forward

        def call(f, **extra):
            calls[key] += 1
            return forward(f, **extra)
        fused._forward = call

    count(model.branch_execution.fused[True], "peers")
    count(model.branch_execution.fused_companions["mean_branches"], "means")
    return calls


def _assert_close(actual, expected, name, scale=None):
    """Equal to float tolerance relative to ``scale`` (default: the tensor's own; sums run in another order when
    fused)."""
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), name
        return
    atol = 1e-4 * (expected.abs().max().item() if scale is None else scale) + 1e-7
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


def _train(execution, make_net, augment, steps=3):
    torch.manual_seed(0)
    model, loss_fn = kdwrap.pcl(make_net(), branches=3, augment=augment, execution=execution, rampup_steps=0,
                                mean_decay=0.5)
    calls = _count_calls(model) if execution == "fused" else None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)  # the same views in both runs
    losses, grads = [], []
    for step in range(steps):
        x, y = _batch(step)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        opt.step()
        losses.append(loss.detach())
    return model, losses, grads, calls


def _step(model, loss_fn, opt, step):
    """One SGD step on batch ``step``, with the views of seed ``step`` (the same in both executions); returns the loss
    and the gradients."""
    x, y = _batch(step)
    torch.manual_seed(1000 + step)
    loss = loss_fn(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("augment", [None, "crop_flip"])
@pytest.mark.parametrize("make_net", [TinyNet, ResLike, ConvHeadNet], ids=["tiny", "reslike", "conv_head"])
def test_fused_peers_and_mean_teachers_equal_sequential_execution(make_net, augment):
    """Three SGD steps in lockstep: before each step the fused model takes the sequential one's whole state, so each
    comparison is of one step at float tolerance. (Compared after n free-running steps instead, the rounding of
    sums taken in another order grows step by step with the learning rate, and by how much depends on the CPU's
    kernels: 1e-6 after one step, 3e-2 relative after three on an AVX-512 CPU.) Losses, every gradient, and the whole
    state (weights, BatchNorm statistics of the peers and of the mean teachers, the temporal means and their clock)
    agree after every step; the fused graphs did run at every step."""
    torch.manual_seed(0)
    seq, seq_loss_fn = kdwrap.pcl(make_net(), branches=3, augment=augment, execution="sequential", rampup_steps=0,
                                  mean_decay=0.5)
    torch.manual_seed(0)
    fused, fused_loss_fn = kdwrap.pcl(make_net(), branches=3, augment=augment, execution="fused", rampup_steps=0,
                                      mean_decay=0.5)
    calls = _count_calls(fused)
    assert fused.per_branch_input == (augment is not None)
    seq_opt, fused_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (seq, fused))
    for step in range(3):
        fused.load_state_dict(seq.state_dict())
        fused_loss_fn.load_state_dict(seq_loss_fn.state_dict())
        seq_loss, seq_grads = _step(seq, seq_loss_fn, seq_opt, step)
        fused_loss, fused_grads = _step(fused, fused_loss_fn, fused_opt, step)
        assert calls == {"peers": step + 1, "means": step + 1}
        torch.testing.assert_close(fused_loss, seq_loss, rtol=1e-5, atol=1e-6)
        assert seq_grads.keys() == fused_grads.keys() and any(k.startswith("branches.2.") for k in seq_grads)
        # A bias before a BatchNorm has no gradient but rounding noise: gradients compare at the model's scale.
        scale = max(g.abs().max().item() for g in seq_grads.values())
        for k in seq_grads:
            _assert_close(fused_grads[k], seq_grads[k], f"step {step}: {k}", scale)
        s_seq, s_fused = seq.state_dict(), fused.state_dict()
        assert s_seq.keys() == s_fused.keys()
        for k in s_seq:
            _assert_close(s_fused[k], s_seq[k], f"step {step}: {k}")
    # BatchNorm statistics moved (so the comparison above covers them), in the peers and in the mean teachers.
    fresh = kdwrap.pcl(make_net(), branches=3, augment=augment)[0].state_dict()
    moved = [k for k in s_seq if k.endswith("running_mean") and not torch.equal(s_seq[k], fresh[k])]
    assert any(k.startswith("branches.1.") for k in moved) and any(k.startswith("mean_branches.1.") for k in moved)
    fused.eval()
    x, _ = _batch(9)
    with torch.no_grad():
        torch.testing.assert_close(kdwrap.export(fused).eval()(x), fused(x), atol=1e-5, rtol=1e-5)


def test_auto_stays_sequential_on_the_cpu_and_the_summary_says_so():
    model, loss_fn = kdwrap.pcl(TinyNet(), branches=3)
    assert model.execution == "auto" and model.branch_execution.fused and model.fusion_error is None
    calls = _count_calls(model)
    x, y = _batch(0)
    loss_fn(model(x), y).backward()
    assert calls == {"peers": 0, "means": 0}
    assert model.execution_plan(batch=8, device="cuda") == "fused"
    assert model.execution_plan(batch=8, device="cpu") == "sequential"
    assert "execution: auto: sequential on this machine" in kdwrap.summary(model) or torch.cuda.is_available()


def test_auto_times_both_executions_where_it_measures_and_trains_as_the_faster(monkeypatch):
    """With the CPU among the devices auto measures on: one timing per input signature, taken on the peers' own
    views at the first training step, then the losses of the execution that timed faster, step for step. (Compared
    with the other execution over three free-running steps, they would differ by float noise that grows with each
    step, by how much depending on the CPU.)"""
    monkeypatch.setattr(planner, "MEASURE_DEVICES", ("cpu",))
    auto, auto_losses, _, _ = _train("auto", TinyNet, "crop_flip")
    (signature, ms), = auto.execution_timings.items()
    assert signature == "cpu 8x16x8x8 float32" and set(ms) == {"sequential", "fused"}
    faster = min(ms, key=ms.__getitem__)
    _, faster_losses, _, _ = _train(faster, TinyNet, "crop_flip")
    torch.testing.assert_close(torch.stack(auto_losses), torch.stack(faster_losses), rtol=1e-6, atol=1e-7)


class LayerNormTail(TinyNet):
    """A tail with a LayerNorm over channels, which fusion has no rule for."""

    def __init__(self, num_classes=5):
        super().__init__(num_classes)
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        return self.fc(self.norm(self.pool(self.stage2(self.stage1(self.stem(x)))).flatten(1)))


def test_a_tail_that_cannot_be_fused_fails_clearly_with_fused_and_falls_back_with_auto():
    with pytest.raises(FusionError, match="LayerNorm.*Use execution='sequential'"):
        kdwrap.pcl(LayerNormTail(), branches=3, execution="fused")
    model, loss_fn = kdwrap.pcl(LayerNormTail(), branches=3)
    assert not model.branch_execution.fused and not model.branch_execution.fused_companions and "LayerNorm" in model.fusion_error
    assert "sequential: the tail cannot be fused" in kdwrap.summary(model)
    x, y = _batch(0)
    loss = loss_fn(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)


def test_a_deep_copy_runs_its_own_fused_graphs():
    """timm's EMA and ONE-E deep-copy the wrapper: the copy's fused graphs read the copy's peers."""
    model, loss_fn = kdwrap.pcl(TinyNet(), branches=3, execution="fused", augment=None)
    twin = copy.deepcopy(model)
    assert twin.branch_execution.fused[True].branches[1] is twin.branches[1]
    assert twin.branch_execution.fused_companions["mean_branches"].branches[1] is twin.mean_branches[1]
    x, y = _batch(0)
    torch.manual_seed(3)
    out = model(x)
    torch.manual_seed(3)
    torch.testing.assert_close(twin(x), out)


def test_bad_execution_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown execution 'fast'; valid: 'auto', 'sequential', 'fused'"):
        kdwrap.pcl(TinyNet(), execution="fast")


def test_torch_compile_of_the_fused_peers_on_their_own_views_has_no_graph_break():
    model, _ = kdwrap.pcl(TinyNet(), branches=3, execution="fused")
    explained = torch._dynamo.explain(model)(_batch(0)[0])
    assert explained.graph_break_count == 0, explained.break_reasons
