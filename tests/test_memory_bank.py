from __future__ import annotations

import os
import socket
from collections import deque

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from kdwrap.memory_bank import MemoryBank


def entries(start: int, n: int, dim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors whose first coordinate is their id, labels equal to their id."""
    ids = torch.arange(start, start + n)
    return ids[:, None].float().expand(n, dim).clone(), ids


def bank_ids(bank: MemoryBank) -> list[int]:
    v, lab = bank.get()
    assert torch.equal(v[:, 0].long(), lab)  # vectors and labels stay paired
    return sorted(lab.tolist())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_empty_bank():
    bank = MemoryBank(8)
    assert len(bank) == 0 and bool(bank) and not bank.materialised and bank.dim is None
    v, lab = bank.get()
    assert v.shape[0] == 0 and lab.shape == (0,)
    assert set(bank.state_dict()) == {"vectors", "labels", "ptr", "count"}


def test_lazy_materialisation_keeps_dtype_and_detaches():
    bank = MemoryBank(4)
    v = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    bank.add(v * 2, torch.tensor([1, 2], dtype=torch.int32))
    assert bank.vectors.shape == (4, 5) and bank.vectors.dtype == torch.float64
    assert bank.labels.dtype == torch.int64 and not bank.vectors.requires_grad
    assert len(bank) == 2 and bank.dim == 5
    torch.testing.assert_close(bank.get()[0], (v * 2).detach())


def test_fill_level_and_wrap_around():
    bank = MemoryBank(5)
    bank.add(*entries(0, 3))
    assert len(bank) == 3 and not bank.is_full and int(bank.ptr) == 3 and bank_ids(bank) == [0, 1, 2]
    bank.add(*entries(3, 3))  # wraps: slot 0 gets id 5
    assert len(bank) == 5 and bank.is_full and int(bank.ptr) == 1 and int(bank.count) == 5
    assert bank.labels.tolist() == [5, 1, 2, 3, 4]
    bank.add(*entries(6, 4))  # slots 1..4
    assert bank.labels.tolist() == [5, 6, 7, 8, 9] and int(bank.ptr) == 0
    bank.add(*entries(10, 0))  # an empty batch changes nothing
    assert bank.labels.tolist() == [5, 6, 7, 8, 9] and len(bank) == 5


def test_batch_larger_than_bank_keeps_the_most_recent():
    bank = MemoryBank(4)
    bank.add(*entries(0, 2))
    bank.add(*entries(2, 10))
    assert len(bank) == 4 and bank_ids(bank) == [8, 9, 10, 11]
    bank.add(*entries(12, 4))  # exactly the size
    assert bank_ids(bank) == [12, 13, 14, 15]


def test_size_zero_is_no_bank():
    bank = MemoryBank(0)
    bank.add(*entries(0, 5))
    assert len(bank) == 0 and not bank.materialised and bank.get()[0].shape[0] == 0


def test_errors():
    with pytest.raises(ValueError, match="int >= 0"):
        MemoryBank(-1)
    bank = MemoryBank(4)
    with pytest.raises(ValueError, match="labels of shape"):
        bank.add(torch.rand(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(B, D\)"):
        bank.add(torch.rand(3), torch.zeros(3, dtype=torch.long))
    bank.add(torch.rand(3, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="dimension 2"):
        bank.add(torch.rand(3, 4), torch.zeros(3, dtype=torch.long))


def test_reset():
    bank = MemoryBank(4)
    bank.add(*entries(0, 3))
    bank.reset()
    assert len(bank) == 0 and int(bank.ptr) == 0
    bank.add(*entries(7, 1))
    assert bank_ids(bank) == [7]


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 9), batches=st.lists(st.integers(0, 14), max_size=8))
def test_holds_exactly_the_most_recent_entries(size, batches):
    bank, recent, nxt = MemoryBank(size), deque(maxlen=size), 0
    for n in batches:
        bank.add(*entries(nxt, n))
        recent.extend(range(nxt, nxt + n))
        nxt += n
        assert len(bank) == len(recent)
        if len(recent):
            assert bank_ids(bank) == sorted(recent)


def test_state_dict_round_trip_into_a_fresh_bank():
    bank = MemoryBank(6)
    bank.add(*entries(0, 4))
    bank.add(*entries(4, 4))  # wrapped, ptr = 2
    fresh = MemoryBank(6)
    fresh.load_state_dict(bank.state_dict())
    assert len(fresh) == 6 and int(fresh.ptr) == 2 and fresh.materialised
    assert torch.equal(fresh.vectors, bank.vectors) and torch.equal(fresh.labels, bank.labels)
    # Resumes where it left off.
    bank.add(*entries(8, 3))
    fresh.add(*entries(8, 3))
    assert torch.equal(fresh.labels, bank.labels) and len(fresh) == len(bank)

    partial = MemoryBank(6)
    partial.add(*entries(0, 2))
    fresh2 = MemoryBank(6)
    fresh2.load_state_dict(partial.state_dict())
    assert len(fresh2) == 2 and bank_ids(fresh2) == [0, 1]


def test_loading_an_empty_bank_empties_it_and_size_mismatch_is_clear():
    full = MemoryBank(4)
    full.add(*entries(0, 4))
    full.load_state_dict(MemoryBank(4).state_dict())
    assert len(full) == 0 and not full.materialised
    other = MemoryBank(8)
    other.add(*entries(0, 3))
    with pytest.raises(RuntimeError, match="bank_size=8"):
        MemoryBank(4).load_state_dict(other.state_dict())
    wide = MemoryBank(4)
    wide.add(torch.rand(1, 7), torch.zeros(1, dtype=torch.long))
    dim3 = MemoryBank(4)
    dim3.add(*entries(0, 1))
    with pytest.raises(RuntimeError, match="dimension 7"):
        dim3.load_state_dict(wide.state_dict())


# ---------------------------------------------------------------------------------------------------- distributed
BATCHES = {0: [3, 5, 2, 4], 1: [4, 1, 0, 6]}  # unequal across ranks, one empty


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        bank = MemoryBank(12)
        for step, n in enumerate(BATCHES[rank]):
            ids = torch.arange(n) + 1000 * rank + 100 * step
            bank.add(ids[:, None].float().expand(n, 3).clone(), ids)
        torch.save(bank.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_banks_are_identical_and_hold_all_ranks(tmp_path):
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
    # Expected: per step, rank 0's entries then rank 1's, in a 12-slot ring.
    recent: deque[int] = deque(maxlen=12)
    for step in range(4):
        for rank in (0, 1):
            recent.extend(1000 * rank + 100 * step + i for i in range(BATCHES[rank][step]))
    bank = MemoryBank(12)
    bank.load_state_dict(s0)
    assert len(bank) == 12 and bank_ids(bank) == sorted(recent)
    assert {i // 1000 for i in recent} == {0, 1}


def test_squared_norms_follow_adds_loads_and_direct_writes():
    bank = MemoryBank(10)
    assert bank.squared_norms().shape == (0,)
    g = torch.Generator().manual_seed(0)
    for n in (4, 3, 6, 12, 5):  # partial fills, a wrap-around, a batch larger than the bank
        bank.add(torch.randn(n, 3, generator=g), torch.zeros(n, dtype=torch.long))
        v, _ = bank.get()
        torch.testing.assert_close(bank.squared_norms(), (v * v).sum(1))
    fresh = MemoryBank(10)
    fresh.load_state_dict(bank.state_dict())
    assert "sq_norms" not in bank.state_dict()  # derived state: checkpoints keep their keys
    torch.testing.assert_close(fresh.squared_norms(), bank.squared_norms())
    with torch.no_grad():
        fresh.vectors[0] = 10.0
    assert fresh.squared_norms()[0].item() == pytest.approx(300.0)
