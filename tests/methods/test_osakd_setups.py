"""OSAKD inside real training setups: DDP (find_unused off/on), SyncBN, autocast, compile, accumulation, resume."""
import pytest
import torch
from torch import nn

import kdwrap
from conftest import TinyNet
from dist_utils import run_two_ranks
from loop_utils import (
    assert_compiles_without_graph_break, assert_resume_is_bit_exact, is_channels_last,
    train_channels_last_beside_contiguous, train_steps,
)

STEPS, BATCH, BANK = 3, 8, 64


def _batch(step):
    g = torch.Generator().manual_seed(2000 + step)
    return torch.randn(BATCH, 3, 16, 16, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def _make(**kwargs):
    torch.manual_seed(0)
    return kdwrap.osakd(TinyNet(), k=3, bank_size=BANK, **kwargs)


def _train(model, loss_fn, forward, steps=STEPS, rank=None):
    return train_steps(model, loss_fn, forward, _batch, steps, rank)


def _ddp_worker(rank, find_unused, out):
    model, loss_fn = _make()
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
    _train(model, loss_fn, ddp, rank=rank)
    torch.save({"model": model.state_dict(), "loss": loss_fn.state_dict()}, f"{out}.{rank}")


@pytest.mark.parametrize("find_unused", [False, True], ids=["static", "find_unused"])
def test_ddp_ranks_share_one_bank_holding_every_rank(tmp_path, find_unused):
    out = str(tmp_path / "state")
    run_two_ranks(_ddp_worker, find_unused, out)
    r0, r1 = (torch.load(f"{out}.{r}") for r in (0, 1))
    for part in ("model", "loss"):
        for key in r0[part]:
            if "running_" in key:  # BatchNorm statistics are per rank (DDP broadcasts rank 0's at each forward)
                continue
            a, b = r0[part][key], r1[part][key]
            assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), f"{part}: {key} differs between ranks"
    assert int(r0["loss"]["bank.count"]) == STEPS * BATCH  # both halves of every step
    # Labels in the bank: per step rank 0's half, then rank 1's, i.e. the whole batch in order.
    expected = torch.cat([_batch(s)[1] for s in range(STEPS)])
    assert torch.equal(r0["loss"]["bank.labels"][: STEPS * BATCH], expected)


def test_sync_batchnorm_conversion_trains_and_exports():
    model, loss_fn = _make()
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    _train(model, loss_fn, model, steps=1)
    model.eval()
    x = _batch(0)[0]
    with torch.no_grad():
        assert torch.equal(kdwrap.export(model).eval()(x), model(x))


def test_autocast_bf16_computes_the_loss_in_float32_and_fills_the_bank_in_float32():
    model, loss_fn = _make()
    x, y = _batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = loss_fn(out, y)
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert loss_fn.bank.vectors.dtype == torch.float32
    loss.backward()


def test_channels_last():
    """OSAKD leaves the net unchanged: after ``.to(memory_format=torch.channels_last)`` every conv runs NHWC, the
    weights stay NHWC through optimizer steps and export, and losses, weights and bank match the contiguous run.

    The two runs train in lockstep: before each step the contiguous run takes the channels_last run's whole state
    (weights, optimizer, bank), so each comparison is of one step at float tolerance (NHWC kernels sum in another
    order, and over n free-running steps that rounding grows, by how much depending on the CPU's kernels). The
    channels_last run itself trains uninterrupted: its weights and gradients are checked for NHWC after its own
    optimizer steps, its bank holds every step's batch."""
    def bank_holds_every_batch(step, loss_fn):
        assert len(loss_fn.bank) == (step + 1) * BATCH

    (model, loss_fn, seen), (plain, _, plain_seen) = train_channels_last_beside_contiguous(
        _make, _batch, STEPS, bank_holds_every_batch)
    convs = {n: p for n, p in model.named_parameters() if p.ndim == 4}
    assert len(convs) == 3
    assert [n for n, p in convs.items() if not is_channels_last(p) or not is_channels_last(p.grad)] == []
    assert len(seen) == 3 and all(seen.values()) and not any(plain_seen.values()), (seen, plain_seen)
    assert len(plain_seen) == 3
    plain.load_state_dict(model.state_dict())  # the same weights: the exports below compare one forward
    x, _ = _batch(STEPS)
    model.eval(), plain.eval()
    with torch.no_grad():
        exported = kdwrap.export(model)
        assert [n for n, p in exported.named_parameters() if p.ndim == 4 and not is_channels_last(p)] == []
        out = exported(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(out, kdwrap.export(plain)(x), atol=1e-5, rtol=1e-4)


def test_gradient_accumulation_fills_the_bank_with_every_micro_batch_and_counts_steps():
    """Each micro-batch's soft labels use the bank plus that micro-batch (documented); gradients accumulate."""
    model, loss_fn = _make()
    x, y = _batch(0)
    halves = (slice(0, BATCH // 2), slice(BATCH // 2, BATCH))
    grads = []
    for half in halves:
        (loss_fn(model(x[half]), y[half]) / 2).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert loss_fn.step == 2 and len(loss_fn.bank) == BATCH
    assert torch.equal(loss_fn.bank.get()[1], y)
    assert any(not torch.equal(a, b) for a, b in zip(*grads))  # the second micro-batch added to the first's


def test_torch_compile_forward_has_no_graph_break():
    assert_compiles_without_graph_break(_make, _batch)


def test_checkpoint_resume_in_a_fresh_process_is_bit_exact(tmp_path):
    build = f"kdwrap.osakd(TinyNet(), k=3, bank_size={BANK})"  # at step 3 the bank holds 24 >= k entries
    assert_resume_is_bit_exact(tmp_path, build, "test_osakd_setups", _batch, save_at=3, steps=6)


def test_loading_a_checkpoint_of_another_bank_size_is_a_clear_error():
    model, loss_fn = _make()
    _train(model, loss_fn, model, steps=1)
    _, other = kdwrap.osakd(TinyNet(), k=3, bank_size=2 * BANK)
    with pytest.raises(RuntimeError, match=f"built with bank_size={2 * BANK}.*bank_size={BANK} to resume"):
        other.load_state_dict(loss_fn.state_dict())
