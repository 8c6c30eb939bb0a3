"""ONE inside real training setups: DDP, autocast, torch.compile, accumulation, checkpoint and resume."""
import pytest
import torch
from torch import nn

import kdwrap
from kdwrap.fused import planner
from conftest import TinyNet
from dist_utils import run_two_ranks
from loop_utils import (
    assert_resume_is_bit_exact, assert_states_close, is_channels_last, lockstep_rank_states, reference_states,
    train_channels_last_beside_contiguous,
)

STEPS, BATCH = 3, 8


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 3, 16, 16, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def _make(bn_mode, execution="sequential"):
    torch.manual_seed(0)
    model, loss_fn = kdwrap.one(TinyNet(), branches=3, execution=execution)
    with torch.no_grad():
        for b in model.branches[1:]:
            for p in b.parameters():
                p.add_(0.1 * torch.randn_like(p))
    if bn_mode == "frozen":  # per-rank batch statistics would differ from the whole batch's: use running stats
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model, loss_fn


def _ddp_worker(rank, mode, states_path, out):
    execution = mode.split("-")[1] if "-" in mode else "sequential"
    if execution == "auto":  # time the executions on the CPU too: each rank measures inside DDP's forward
        planner.MEASURE_DEVICES = ("cpu",)
    model, loss_fn = _make("frozen", execution=execution)
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=mode.startswith("find_unused"))
    after = lockstep_rank_states(model, loss_fn, ddp, _batch, torch.load(states_path), rank)
    assert len(model.execution_timings) == (execution == "auto")
    if rank == 0:
        torch.save(after, out)


@pytest.mark.parametrize("mode", ["static", "find_unused", "find_unused-fused", "static-auto"])
def test_ddp_two_ranks_match_one_process_with_whole_batch(tmp_path, mode):
    """Three SGD steps in lockstep: each DDP step starts from the one-process run's state before that step (model,
    optimizer, loss), so each comparison is of one step at float tolerance: the all-reduced mean of two half-batch
    gradients sums in another order than the whole batch's, and compared after n free-running steps that rounding
    grows with each step (by how much depends on the CPU's kernels). After every step: the whole model state (every
    branch and the gate, all trained through DDP) and the loss's state (its step clock) agree."""
    model, loss_fn = _make("frozen")
    states = reference_states(model, loss_fn, _batch, STEPS)
    torch.save(states, tmp_path / "states.pt")
    out = tmp_path / "rank0.pt"
    run_two_ranks(_ddp_worker, mode, str(tmp_path / "states.pt"), str(out))
    after = torch.load(out)
    assert len(after) == STEPS
    for step, (got, want) in enumerate(zip(after, states[1:], strict=True)):
        assert_states_close(got["model"], want["model"], f"step {step}: model")
        assert_states_close(got["loss"], want["loss"], f"step {step}: loss")
        moved = [k for k, v in want["model"].items() if v.is_floating_point()
                 and not torch.equal(v, states[step]["model"][k])]
        assert any(k.startswith("branches.2.") for k in moved) and any(k.startswith("gate.") for k in moved), step


def test_sync_batchnorm_conversion_reaches_every_piece(tiny_net):
    """DDP accepts SyncBatchNorm only on GPU modules; here: conversion, a step, and export of the converted model."""
    model, loss_fn = kdwrap.one(tiny_net)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert not any(type(m) is nn.BatchNorm2d or type(m) is nn.BatchNorm1d for m in model.modules())
    assert isinstance(model.gate.bn, nn.SyncBatchNorm)
    x, y = _batch(0)
    loss_fn(model(x), y).backward()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(kdwrap.export(model).eval()(x), model(x), atol=1e-5)


def test_autocast_bf16_keeps_the_loss_in_float32(tiny_net):
    model, loss_fn = kdwrap.one(tiny_net)
    x, y = _batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = loss_fn(out, y)
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None for p in model.gate.parameters())


class _LayoutRecorder(torch.fx.Interpreter):
    """Runs the fused graph, recording whether each 4-D tensor it makes is channels_last."""

    def __init__(self, gm):
        super().__init__(gm)
        self.layouts = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[-2:] != (1, 1):  # 1x1 maps are both
            self.layouts[n.name] = is_channels_last(out)
        return out


@pytest.mark.parametrize("execution", ["sequential", "fused", "auto"])
def test_channels_last(execution, monkeypatch):
    """``model.to(memory_format=torch.channels_last)`` (examples/train_cifar.py --channels-last) reaches the trunk
    and every branch; the trunk, the branches (sequential or fused) and the export run NHWC throughout; training
    and the exported model match the contiguous run; ``execution="auto"`` times channels_last inputs apart.

    The two runs train in lockstep: before each step the contiguous run takes the channels_last run's whole state,
    so each comparison is of one step at float tolerance (NHWC kernels sum in another order, and over n free-running
    steps that rounding grows, by how much depending on the CPU's kernels). The channels_last run itself trains
    uninterrupted: its weights and gradients are checked for NHWC after its own optimizer steps."""
    monkeypatch.setattr(planner, "MEASURE_DEVICES", ("cpu",))  # auto times on the CPU too
    (model, loss_fn, seen), (plain, _, plain_seen) = train_channels_last_beside_contiguous(
        lambda: _make("train", execution=execution), _batch, STEPS)
    convs = {n: p for n, p in model.named_parameters() if p.ndim == 4}
    assert {n.split(".")[1] for n in convs if n.startswith("branches.")} == {"0", "1", "2"}  # every branch's convs
    assert [n for n, p in convs.items() if not is_channels_last(p)] == []  # after optimizer steps too
    assert [n for n, p in convs.items() if not is_channels_last(p.grad)] == []
    assert seen and all(seen.values()), seen  # every conv module called saw an NHWC input
    assert plain_seen and not any(plain_seen.values())
    assert any(n.startswith("branches.") for n in seen) != (execution == "fused")  # fused: no module calls
    timings = model.execution_timings
    if execution == "auto":
        assert [k for k in timings if "channels_last" in k] == list(timings) != []
        assert not any("channels_last" in k for k in plain.execution_timings) and plain.execution_timings
    else:
        assert timings == {}
    plain.load_state_dict(model.state_dict())  # the same weights: the exports below compare one forward
    x, _ = _batch(STEPS)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    model.eval(), plain.eval()
    with torch.no_grad():
        for kwargs in ({}, {"branch": 2}, {"ensemble": True}):
            exported = kdwrap.export(model, **kwargs)
            assert [n for n, p in exported.named_parameters() if p.ndim == 4 and not is_channels_last(p)] == []
            out = exported(x_cl)
            torch.testing.assert_close(out, kdwrap.export(plain, **kwargs)(x), atol=1e-5, rtol=1e-4)
            if not kwargs:
                torch.testing.assert_close(out, model(x_cl), atol=0, rtol=0)
    model.train()  # last: these training forwards move BatchNorm statistics
    f = model.trunk(x_cl)
    assert is_channels_last(f)
    if execution == "fused":
        recorder = _LayoutRecorder(model.branch_execution.fused[True].graph_module)
        recorder.run(f)
        assert recorder.layouts and all(recorder.layouts.values()), recorder.layouts


def test_gradient_accumulation_matches_whole_batch_and_counts_optimizer_steps():
    whole, whole_loss = _make("frozen")
    acc, acc_loss = _make("frozen")
    acc_loss.accumulation_steps = 2
    acc_loss.rampup_steps = whole_loss.rampup_steps = 10  # the ramp weight must match: both at optimizer step 0
    x, y = _batch(0)
    whole_loss(whole(x), y).backward()
    for half in (slice(0, BATCH // 2), slice(BATCH // 2, BATCH)):
        (acc_loss(acc(x[half]), y[half]) / 2).backward()
    for (name, p), q in zip(whole.named_parameters(), acc.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert acc_loss.step == 2 and acc_loss.step // acc_loss.accumulation_steps == 1


def test_torch_compile_forward_has_no_graph_break(tiny_net):
    model, loss_fn = kdwrap.one(tiny_net)
    x, y = _batch(0)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    model.take_capture()
    compiled = torch.compile(model)
    eager_loss = None
    torch.manual_seed(3)
    loss = loss_fn(compiled(x), y)
    loss.backward()
    torch.manual_seed(3)
    eager_loss = loss_fn(model(x), y)
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)


def test_checkpoint_resume_in_a_fresh_process_is_bit_exact(tmp_path):
    build = "kdwrap.one(TinyNet(), branches=3, rampup_steps=10)"
    assert_resume_is_bit_exact(tmp_path, build, "test_one_setups", _batch, save_at=2, steps=4)


def test_loading_a_checkpoint_of_other_settings_is_a_clear_error(tiny_net):
    model, _ = kdwrap.one(tiny_net, branches=3)
    other, _ = kdwrap.one(TinyNet(), branches=2)
    with pytest.raises(ValueError, match="branches=3"):
        other.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="split='stage1'"):
        third, _ = kdwrap.one(TinyNet(), branches=3, split="stage1")
        model.load_state_dict(third.state_dict())
