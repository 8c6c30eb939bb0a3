from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdwrap.knn import knn_search, knn_soft_labels, resolve_backend


def brute_force_soft_labels(q, y, c, k, bank=None, bank_y=None):
    """Reference: Python loops over an explicit distance list, self excluded by index."""
    ref = q if bank is None else torch.cat([bank, q])
    ref_y = y if bank is None else torch.cat([bank_y, y])
    off = 0 if bank is None else bank.shape[0]
    out = torch.zeros(q.shape[0], c)
    for i in range(q.shape[0]):
        d = [(float(((q[i] - ref[j]) ** 2).sum()), j) for j in range(ref.shape[0]) if j != off + i]
        d.sort()
        used = d[: min(k, len(d))]
        for _, j in used:
            out[i, int(ref_y[j])] += 1.0 / len(used)
    return out


def brute_force_neighbours(q, ref, k, self_offset=None):
    d = torch.cdist(q.double(), ref.double())
    if self_offset is not None:
        d[torch.arange(q.shape[0]), torch.arange(q.shape[0]) + self_offset] = float("inf")
    return d.topk(k, dim=1, largest=False).indices


# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_points_on_a_line(backend):
    if backend == "faiss":
        pytest.importorskip("faiss", reason="faiss is an optional extra: pip install 'kdwrap[faiss]'")
    pos = torch.tensor([[0.0], [1.0], [2.5], [10.0], [11.0], [12.5]])
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    s = knn_soft_labels(pos, y, 3, k=2, backend=backend)
    expected = torch.tensor(
        [
            [0.5, 0.5, 0.0],  # 0 -> 1 (label 0), 2.5 (label 1)
            [0.5, 0.5, 0.0],  # 1 -> 0, 2.5
            [1.0, 0.0, 0.0],  # 2.5 -> 1, 0
            [0.0, 0.5, 0.5],  # 10 -> 11, 12.5
            [0.0, 0.5, 0.5],  # 11 -> 10, 12.5
            [0.0, 1.0, 0.0],  # 12.5 -> 11, 10
        ]
    )
    torch.testing.assert_close(s, expected, rtol=0, atol=0)
    assert not s.requires_grad


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_points_on_a_line_with_bank(backend):
    if backend == "faiss":
        pytest.importorskip("faiss", reason="faiss is an optional extra: pip install 'kdwrap[faiss]'")
    pos = torch.tensor([[0.0], [10.0]])
    y = torch.tensor([0, 1])
    bank = torch.tensor([[0.4], [0.7], [9.0], [30.0]])
    bank_y = torch.tensor([2, 2, 0, 1])
    s = knn_soft_labels(pos, y, 3, k=3, bank=bank, bank_labels=bank_y, backend=backend)
    # 0 -> 0.4 (2), 0.7 (2), 9 (0); 10 -> 9 (0), 0.7 (2), 0.4 (2)  [30 is 20 away, 0 is the other query: 10 away]
    expected = torch.tensor([[1 / 3, 0.0, 2 / 3], [1 / 3, 0.0, 2 / 3]])
    torch.testing.assert_close(s, expected)
    torch.testing.assert_close(s, brute_force_soft_labels(pos, y, 3, 3, bank, bank_y))


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_self_is_never_a_neighbour_even_for_duplicates(backend):
    if backend == "faiss":
        pytest.importorskip("faiss", reason="faiss is an optional extra: pip install 'kdwrap[faiss]'")
    # Two identical points with different labels: each must get the *other's* label with k=1.
    q = torch.tensor([[0.3, 0.7], [0.3, 0.7], [0.9, 0.1]])
    y = torch.tensor([0, 1, 1])
    s = knn_soft_labels(q, y, 2, k=1, backend=backend)
    torch.testing.assert_close(s[:2], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    bank = torch.rand(50, 2)
    ref = torch.cat([bank, q])
    _, idx = knn_search(q, ref, 5, backend=backend, self_offset=50)
    own = torch.arange(3) + 50
    assert not (idx == own[:, None]).any()


def test_soft_labels_match_brute_force_random():
    g = torch.Generator().manual_seed(1)
    q = torch.rand(20, 5, generator=g)
    y = torch.randint(0, 5, (20,), generator=g)
    bank = torch.rand(30, 5, generator=g)
    bank_y = torch.randint(0, 5, (30,), generator=g)
    for k in (1, 4, 9):
        torch.testing.assert_close(knn_soft_labels(q, y, 5, k), brute_force_soft_labels(q, y, 5, k))
        torch.testing.assert_close(
            knn_soft_labels(q, y, 5, k, bank, bank_y, chunk_size=7), brute_force_soft_labels(q, y, 5, k, bank, bank_y)
        )


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 12),
    n=st.integers(0, 20),
    k=st.integers(1, 12),
    chunk=st.one_of(st.none(), st.integers(1, 9)),
    seed=st.integers(0, 2**16),
)
def test_soft_labels_property(b, n, k, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(b, 3, generator=g)
    y = torch.randint(0, 3, (b,), generator=g)
    bank = torch.rand(n, 3, generator=g)
    bank_y = torch.randint(0, 3, (n,), generator=g)
    s = knn_soft_labels(q, y, 3, k, bank, bank_y, chunk_size=chunk)
    if n + b - 1 == 0:
        torch.testing.assert_close(s, q)  # documented empty rule "self"
    else:
        torch.testing.assert_close(s, brute_force_soft_labels(q, y, 3, k, bank, bank_y))
        torch.testing.assert_close(s.sum(1), torch.ones(b))


def test_fewer_reference_points_than_k_uses_all():
    q = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    y = torch.tensor([0, 1, 1, 2])
    s = knn_soft_labels(q, y, 3, k=10)  # only 3 other points per query
    expected = torch.tensor([[0, 2, 1], [1, 1, 1], [1, 1, 1], [1, 2, 0]], dtype=torch.float32) / 3
    torch.testing.assert_close(s, expected)
    d, idx = knn_search(q, q, 10, self_offset=0)
    assert idx.shape == (4, 3) and d.shape == (4, 3)
    d, idx = knn_search(q, q, 10)
    assert idx.shape == (4, 4)


def test_no_reference_point_empty_rules():
    q = torch.tensor([[0.2, 0.5, 0.3]])
    y = torch.tensor([1])
    torch.testing.assert_close(knn_soft_labels(q, y, 3, k=4), q)  # default "self": distillation term vanishes
    torch.testing.assert_close(knn_soft_labels(q, y, 3, k=4, empty="onehot"), torch.tensor([[0.0, 1.0, 0.0]]))
    torch.testing.assert_close(knn_soft_labels(q, y, 3, k=4, empty="uniform"), torch.full((1, 3), 1 / 3))
    empty_bank = torch.empty(0, 3)
    torch.testing.assert_close(knn_soft_labels(q, y, 3, 4, empty_bank, torch.empty(0, dtype=torch.long)), q)
    with pytest.raises(ValueError, match="empty rule"):
        knn_soft_labels(q, y, 3, k=4, empty="nope")
    with pytest.raises(ValueError, match="num_classes"):
        knn_soft_labels(q, y, 5, k=4)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("self_offset", [None, 40])
def test_chunked_equals_unchunked(distance, self_offset):
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(100, 6, generator=g)
    q = ref[40:57] if self_offset is not None else torch.rand(17, 6, generator=g)
    d0, i0 = knn_search(q, ref, 9, distance=distance, self_offset=self_offset)
    for chunk in (1, 3, 7, 64):
        d1, i1 = knn_search(q, ref, 9, distance=distance, self_offset=self_offset, chunk_size=chunk)
        assert torch.equal(i0, i1)
        torch.testing.assert_close(d0, d1)
    # A tiny memory budget forces chunk_size = k.
    d2, i2 = knn_search(q, ref, 9, distance=distance, self_offset=self_offset, memory_budget=1)
    assert torch.equal(i0, i2)
    if distance == "l2":
        assert torch.equal(i0, brute_force_neighbours(q, ref, 9, self_offset))
        ref_d = torch.cdist(q.double(), ref.double()) ** 2
        torch.testing.assert_close(d0.double(), ref_d.gather(1, i0), atol=1e-5, rtol=1e-5)
    assert (d0[:, 1:] >= d0[:, :-1]).all()  # nearest first


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("self_offset", [None, 200])
def test_torch_and_faiss_agree(distance, self_offset):
    pytest.importorskip("faiss", reason="faiss is an optional extra: pip install 'kdwrap[faiss]'")
    g = torch.Generator().manual_seed(3)
    ref = (torch.randn(1000, 10, generator=g) * 3).softmax(1)
    q = ref[200:264] if self_offset is not None else (torch.randn(64, 10, generator=g) * 3).softmax(1)
    dt, it = knn_search(q, ref, 16, backend="torch", distance=distance, self_offset=self_offset)
    df, i_f = knn_search(q, ref, 16, backend="faiss", distance=distance, self_offset=self_offset)
    assert it.shape == i_f.shape == (64, 16)
    torch.testing.assert_close(dt, df, atol=1e-5, rtol=1e-4)
    # Same neighbour sets, up to exact ties at the boundary (none expected on random data).
    assert torch.equal(it.sort(1).values, i_f.sort(1).values)
    y = torch.randint(0, 10, (1000,), generator=g)
    bank, bank_y = ref[:200], y[:200]
    st = knn_soft_labels(q, y[200:264], 10, 8, bank, bank_y, backend="torch", distance=distance)
    sf = knn_soft_labels(q, y[200:264], 10, 8, bank, bank_y, backend="faiss", distance=distance)
    torch.testing.assert_close(st, sf)


def test_autocast_does_not_change_neighbours():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(300, 20, generator=g)
    q = torch.rand(30, 20, generator=g)
    d0, i0 = knn_search(q, ref, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d1, i1 = knn_search(q, ref, 5)
    assert d1.dtype == torch.float32
    assert torch.equal(i0, i1)


def test_argument_errors():
    q = torch.rand(4, 3)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        knn_search(q, q, 0)
    with pytest.raises(ValueError, match="valid backends: auto, torch, faiss"):
        knn_search(q, q, 1, backend="annoy")
    with pytest.raises(ValueError, match="valid distances: l2, cosine"):
        knn_search(q, q, 1, distance="manhattan")
    with pytest.raises(ValueError, match="self_offset"):
        knn_search(q, q, 1, self_offset=2)
    with pytest.raises(ValueError, match="queries"):
        knn_search(q, torch.rand(4, 5), 1)
    with pytest.raises(ValueError, match="chunk_size"):
        knn_search(q, q, 1, chunk_size=0)
    assert resolve_backend("auto") == "torch"


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r"pip install kdwrap\[faiss\]"):
        knn_search(torch.rand(3, 2), torch.rand(5, 2), 2, backend="faiss")
    assert knn_search(torch.rand(3, 2), torch.rand(5, 2), 2, backend="auto")[1].shape == (3, 2)


@pytest.mark.parametrize("n, k", [(2048, 8), (5003, 8), (9000, 16), (4100, 1)])
@pytest.mark.parametrize("self_offset", [None, 300])
def test_blocked_selection_on_wide_rows_matches_brute_force(n, k, self_offset):
    # Wide enough that the CPU search selects through group minima (kdwrap.knn.SELECTION_GROUP); a ragged
    # last group when n is not a multiple of the group width.
    g = torch.Generator().manual_seed(n + k)
    ref = (torch.randn(n, 10, generator=g) * 3).softmax(1)
    q = ref[300:364] if self_offset is not None else (torch.randn(64, 10, generator=g) * 3).softmax(1)
    d, i = knn_search(q, ref, k, self_offset=self_offset)
    assert torch.equal(i.sort(1).values, brute_force_neighbours(q, ref, k, self_offset).sort(1).values)
    ref_d = torch.cdist(q.double(), ref.double()) ** 2
    torch.testing.assert_close(d.double(), ref_d.gather(1, i), atol=1e-5, rtol=1e-5)
    assert (d[:, 1:] >= d[:, :-1]).all()


def test_soft_labels_with_a_large_bank_and_its_kept_norms_match_brute_force():
    from kdwrap.memory_bank import MemoryBank

    g = torch.Generator().manual_seed(7)
    bank = MemoryBank(3000)
    for _ in range(5):  # wraps around the ring: the kept norms follow every write
        bank.add((torch.randn(700, 5, generator=g) * 2).softmax(1), torch.randint(0, 5, (700,), generator=g))
    q, y = (torch.randn(48, 5, generator=g) * 2).softmax(1), torch.randint(0, 5, (48,), generator=g)
    vectors, labels = bank.get()
    torch.testing.assert_close(bank.squared_norms(), (vectors * vectors).sum(1))
    kept = knn_soft_labels(q, y, 5, 8, vectors, labels, bank_sq_norms=bank.squared_norms())
    torch.testing.assert_close(kept, knn_soft_labels(q, y, 5, 8, vectors, labels))
    torch.testing.assert_close(kept, brute_force_soft_labels(q, y, 5, 8, vectors, labels))
