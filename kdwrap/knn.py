"""Exact k-nearest-neighbour search and the k-NN class-posterior estimate (soft labels) used by OSAKD.

One interface, two backends:

* ``"torch"``: brute force on the tensors' own device (CPU or GPU). The reference set is visited in chunks whose
  size comes from a memory budget, keeping a running top-k, so neither a ``B x N x D`` tensor nor all ``B x N``
  distances of a large bank are ever held at once.
* ``"faiss"``: ``faiss.IndexFlatL2`` / ``IndexFlatIP`` on CPU tensors; faiss's GPU brute force when faiss was built
  with GPU support and the tensors are on CUDA (otherwise CUDA tensors are copied to the CPU). Imported lazily:
  ``pip install kdwrap[faiss]``.
* ``"auto"`` is ``"torch"``: on the CPUs measured it was faster than faiss or close to it for the banks OSAKD
  uses (figures in docs/osakd.md), and on GPU it runs on the device with no host copy. Pass ``backend="faiss"``
  explicitly to use faiss.

Distances: ``"l2"`` returns *squared* Euclidean distances (same neighbours as Euclidean, as faiss does);
``"cosine"`` returns ``1 - cos(q, r)``. Among exactly tied distances the two backends may pick different
neighbours.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "DISTANCES",
    "DEFAULT_MEMORY_BUDGET",
    "faiss_available",
    "resolve_backend",
    "knn_search",
    "knn_soft_labels",
]

BACKENDS = ("auto", "torch", "faiss")
DISTANCES = ("l2", "cosine")
EMPTY_RULES = ("self", "onehot", "uniform")

# Bytes of distance scratch per chunk for the torch backend. 256 MiB keeps one chunk for a 65,536-entry bank and
# 256 queries while bounding memory for ImageNet-size banks.
DEFAULT_MEMORY_BUDGET = 256 * 2**20

_FAISS_HINT = "pip install kdwrap[faiss]  (or faiss-gpu / conda's faiss-gpu for GPU indexes)"


def _import_faiss() -> Any:
    try:
        import faiss  # noqa: PLC0415 - optional dependency, imported on first use
    except ImportError as e:  # pragma: no cover - faiss is installed in CI
        raise ImportError(f"kdwrap: backend='faiss' needs the faiss package: {_FAISS_HINT}") from e
    return faiss


def faiss_available() -> bool:
    """Whether ``import faiss`` works."""
    try:
        _import_faiss()
    except ImportError:  # pragma: no cover
        return False
    return True


def _faiss_has_gpu(faiss: Any) -> bool:
    return hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def resolve_backend(backend: str) -> str:
    """The concrete backend (``"torch"`` or ``"faiss"``) that ``backend`` means; ``"auto"`` is always ``"torch"``
    (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-NN backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend == "faiss":
        _import_faiss()
        return "faiss"
    return "torch"


def _check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"unknown k-NN distance {distance!r}; valid distances: {', '.join(DISTANCES)}")


def _exclude_self(d: torch.Tensor, start: int, self_offset: int | None) -> None:
    """Set ``d[i, self_offset + i - start] = inf`` where that column falls inside this chunk."""
    if self_offset is None:
        return
    b, width = d.shape
    lo = max(0, start - self_offset)
    hi = min(b, start + width - self_offset)
    if lo < hi:
        rows = torch.arange(lo, hi, device=d.device)
        d[rows, rows + (self_offset - start)] = float("inf")


# Group width of the blocked selection, per device type; None: torch.topk. On the CPU, topk over a wide row costs
# several times the matmul that made it, while one min-reduction over groups plus a topk over k groups' members
# is near one pass over the row; CUDA's topk is already a single fast kernel.
SELECTION_GROUP: dict[str, int | None] = {"cpu": 64}


def _smallest(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest entries of each row of ``d`` and their columns, in no particular order.

    Blocked selection where it pays: the columns in groups of ``G``; the ``k`` groups with the smallest minima
    hold every one of the ``k`` smallest entries (an entry outside them has ``k`` smaller group minima, hence
    ``k`` smaller entries), so a topk over those ``k * G`` candidates is exact, ties aside."""
    b, n = d.shape
    group = SELECTION_GROUP.get(d.device.type)
    if group is None or n < 4 * k * group:
        return d.topk(k, dim=1, largest=False, sorted=False)
    whole = n // group * group
    blocks = d[:, :whole].view(b, whole // group, group)
    _, best_groups = blocks.amin(2).topk(k, dim=1, largest=False, sorted=False)
    cand = blocks[torch.arange(b, device=d.device).unsqueeze(1), best_groups].view(b, k * group)
    cols = (best_groups.unsqueeze(2) * group + torch.arange(group, device=d.device)).view(b, k * group)
    if whole < n:  # the ragged last group joins the candidates whole
        cand = torch.cat([cand, d[:, whole:]], 1)
        cols = torch.cat([cols, torch.arange(whole, n, device=d.device).expand(b, -1)], 1)
    vals, sel = cand.topk(k, dim=1, largest=False, sorted=False)
    return vals, cols.gather(1, sel)


def _partial_distances(queries: torch.Tensor, ref: torch.Tensor, distance: str,
                       ref_sq_norms: torch.Tensor | None) -> torch.Tensor:
    """``B x N`` partial distances (see :func:`_torch_candidates`): for l2, ``||r||^2 - 2 q.r`` in one matmul
    call (``||q||^2`` is the same for every reference of a query, so it is added to the k winners only)."""
    if distance == "l2":
        return torch.addmm(ref_sq_norms, queries, ref.T, alpha=-2)
    return (queries @ ref.T).neg_()


def _torch_candidates(
    queries: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    distance: str,
    self_offset: int | None,
    chunk_size: int | None,
    memory_budget: int,
    reference_sq_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest reference rows of each query, unsorted, with *partial* distances: ``||r||^2 - 2 q.r``
    for l2 (the query's own ``||q||^2`` left out: it ranks nothing), ``-cos`` for cosine. Queries and reference
    are expected normalised already for cosine."""
    b, n = queries.shape[0], reference.shape[0]
    if distance == "l2" and reference_sq_norms is None:
        reference_sq_norms = (reference * reference).sum(1)
    if chunk_size is None:
        # Three B x chunk float32 temporaries live at once (product, selection workspace, merge).
        chunk_size = max(k, memory_budget // max(1, 12 * b))
    best_d = queries.new_empty((b, 0))
    best_i = torch.empty((b, 0), dtype=torch.long, device=queries.device)
    for start in range(0, n, chunk_size):
        norms = None if reference_sq_norms is None else reference_sq_norms[start : start + chunk_size]
        d = _partial_distances(queries, reference[start : start + chunk_size], distance, norms)
        _exclude_self(d, start, self_offset)
        cd, ci = _smallest(d, min(k, d.shape[1]))
        if best_d.shape[1]:
            cd, ci = torch.cat([best_d, cd], 1), torch.cat([best_i, ci + start], 1)
            cd, sel = cd.topk(min(k, cd.shape[1]), dim=1, largest=False, sorted=False)
            ci = ci.gather(1, sel)
        else:
            ci = ci + start
        best_d, best_i = cd, ci
    return best_d, best_i


def _complete(partial: torch.Tensor, queries: torch.Tensor, distance: str) -> torch.Tensor:
    """Partial distances (see :func:`_torch_candidates`) made whole: squared l2, or ``1 - cos``."""
    if distance == "l2":
        return (partial + (queries * queries).sum(1, keepdim=True)).clamp_min_(0)
    return partial + 1


_GPU_RESOURCES: dict[int, Any] = {}


def _faiss_search(
    queries: torch.Tensor, reference: torch.Tensor, k: int, distance: str, self_offset: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    faiss = _import_faiss()
    device = queries.device
    b, dim = queries.shape
    if distance == "cosine":
        queries, reference = F.normalize(queries, dim=1), F.normalize(reference, dim=1)
    metric = faiss.METRIC_L2 if distance == "l2" else faiss.METRIC_INNER_PRODUCT
    k_search = min(k + (self_offset is not None), reference.shape[0])
    if device.type == "cuda" and _faiss_has_gpu(faiss):  # pragma: no cover - needs a faiss GPU build
        import faiss.contrib.torch_utils  # noqa: F401, PLC0415 - lets faiss take torch CUDA tensors

        dev = device.index if device.index is not None else torch.cuda.current_device()
        res = _GPU_RESOURCES.setdefault(dev, faiss.StandardGpuResources())
        d, i = faiss.knn_gpu(res, queries.contiguous(), reference.contiguous(), k_search, metric=metric, device=dev)
        d, i = d.to(device), i.to(device=device, dtype=torch.long)
    else:
        index = faiss.IndexFlatL2(dim) if distance == "l2" else faiss.IndexFlatIP(dim)
        index.add(reference.detach().cpu().contiguous().numpy())
        d_np, i_np = index.search(queries.detach().cpu().contiguous().numpy(), k_search)
        d = torch.from_numpy(d_np).to(device)
        i = torch.from_numpy(i_np).to(device=device, dtype=torch.long)
    if distance == "cosine":
        d = 1 - d
    if self_offset is not None:
        # Drop the query's own index; where it was not among the k+1 found, drop the farthest instead.
        own = torch.arange(b, device=device) + self_offset
        keep = i != own[:, None]
        keep[:, -1] &= ~keep.all(1)
        width = k_search - 1
        d, i = d[keep].view(b, width), i[keep].view(b, width)
    return d[:, :k], i[:, :k]


@torch.no_grad()
def knn_search(
    queries: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    *,
    backend: str = "auto",
    distance: str = "l2",
    self_offset: int | None = None,
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    reference_sq_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest reference points of each query: ``(distances, indices)``, each ``B x k'``, nearest first.

    Args:
        queries: ``B x D``. reference: ``N x D`` (same device). Computed in float32, autocast off.
        k: neighbours wanted. ``k' = min(k, N - (self_offset is not None))``: with fewer reference points than
            ``k`` every available point is returned.
        distance: ``"l2"`` (squared Euclidean distances returned) or ``"cosine"`` (``1 - cos``).
        self_offset: when the queries are themselves rows ``self_offset .. self_offset + B - 1`` of
            ``reference``, query ``i`` never gets reference row ``self_offset + i`` as a neighbour.
        chunk_size: reference rows per chunk for the torch backend (default: from ``memory_budget`` bytes).
        reference_sq_norms: ``(reference ** 2).sum(1)`` when the caller keeps it up to date (a memory bank does),
            so the torch backend's l2 search does not recompute it.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    _check_distance(distance)
    if queries.dim() != 2 or reference.dim() != 2 or queries.shape[1] != reference.shape[1]:
        raise ValueError(
            f"knn_search expects queries (B, D) and reference (N, D), got {tuple(queries.shape)} and "
            f"{tuple(reference.shape)}"
        )
    b, n = queries.shape[0], reference.shape[0]
    if self_offset is not None and not 0 <= self_offset <= n - b:
        raise ValueError(f"self_offset={self_offset} does not place {b} queries inside {n} reference rows")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    k_eff = min(k, n - (self_offset is not None))
    if k_eff <= 0 or b == 0:
        return queries.new_empty((b, 0), dtype=torch.float32), torch.empty(
            (b, 0), dtype=torch.long, device=queries.device
        )
    with torch.autocast(device_type=queries.device.type, enabled=False):
        queries, reference = queries.float(), reference.float()
        if resolve_backend(backend) == "faiss":
            return _faiss_search(queries, reference, k_eff, distance, self_offset)
        norms = None if reference_sq_norms is None else reference_sq_norms.float()
        if distance == "cosine":
            queries, reference = F.normalize(queries, dim=1), F.normalize(reference, dim=1)
        d, i = _torch_candidates(queries, reference, k_eff, distance, self_offset, chunk_size, memory_budget, norms)
        d, order = d.sort(dim=1)
        return _complete(d, queries, distance), i.gather(1, order)


@torch.no_grad()
def knn_soft_labels(
    queries: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    k: int,
    bank: torch.Tensor | None = None,
    bank_labels: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    distance: str = "l2",
    empty: str = "self",
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    bank_sq_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """k-NN estimate of the class posterior of each query (Duda & Hart): ``s_c = k_c / k'``.

    The reference set is ``bank`` (``N x D``, labels ``bank_labels``) followed by the queries themselves (labels
    ``labels``); a query is never its own neighbour. ``k' = min(k, N + B - 1)``: with fewer reference points than
    ``k``, all of them are used and the counts are divided by how many were used, so each row sums to 1.

    With no reference point at all (one query, empty bank) the row is, by ``empty``:
    ``"self"`` (default) the query vector itself, which for OSAKD's queries ``p`` makes the distillation term
    ``MSE(p, p)`` / ``KL(p || p)`` exactly zero with zero gradient (needs ``D == num_classes``); ``"onehot"`` the
    one-hot of the query's own label; ``"uniform"`` ``1 / num_classes``. ``bank_sq_norms``: the bank rows'
    squared norms, when the caller keeps them (:meth:`kdwrap.memory_bank.MemoryBank.squared_norms`).

    Returns a float32 ``B x num_classes`` tensor with no gradient.
    """
    if empty not in EMPTY_RULES:
        raise ValueError(f"unknown empty rule {empty!r}; valid: {', '.join(EMPTY_RULES)}")
    if (bank is None) != (bank_labels is None):
        raise ValueError("pass both bank and bank_labels, or neither")
    queries = queries.detach().float()
    b = queries.shape[0]
    n = 0 if bank is None else bank.shape[0]
    used = min(k, n + b - 1)
    if b == 0:
        return queries.new_zeros((0, num_classes))
    if used <= 0:
        return _empty_soft_labels(queries, labels, num_classes, empty)
    with torch.autocast(device_type=queries.device.type, enabled=False):
        d, neighbour_labels = _reference_candidates(
            queries, labels, k, bank, bank_labels, bank_sq_norms, backend, distance, chunk_size, memory_budget
        )
    pick = d.topk(used, dim=1, largest=False, sorted=False).indices
    votes = neighbour_labels.gather(1, pick)
    # scatter_add rather than one_hot: one_hot reads the labels' range on the host, a sync on a GPU.
    counts = queries.new_zeros((b, num_classes)).scatter_add_(1, votes, queries.new_ones(()).expand(votes.shape))
    return counts.div_(used)


def _reference_candidates(
    queries: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    bank: torch.Tensor | None,
    bank_labels: torch.Tensor | None,
    bank_sq_norms: torch.Tensor | None,
    backend: str,
    distance: str,
    chunk_size: int | None,
    memory_budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate neighbours of each query, as (distances, labels), ``B x (k' + B)``: the bank's ``k`` nearest
    (searched where the bank lies, never joined to the batch by a copy) and every other query of the batch (a
    ``B x B`` block; a query's own entry is +inf). The ``k`` smallest of a row are its ``k`` nearest neighbours."""
    labels = labels.long()
    if distance == "cosine":
        queries = F.normalize(queries, dim=1)
    # Partial distances (the query's own ||q||^2 left out, as in the torch search) within the batch.
    batch_d = _partial_distances(queries, queries, distance, (queries * queries).sum(1) if distance == "l2" else None)
    batch_d.fill_diagonal_(float("inf"))
    batch_labels = labels.expand(queries.shape[0], -1)
    if bank is None or bank.shape[0] == 0:
        return batch_d, batch_labels
    bank = bank.float()
    if resolve_backend(backend) == "faiss":
        d_bank, i_bank = _faiss_search(queries, bank, min(k, bank.shape[0]), distance, None)
        batch_d = _complete(batch_d, queries, distance)  # faiss's distances are whole
    else:
        if distance == "cosine":
            bank = F.normalize(bank, dim=1)
        d_bank, i_bank = _torch_candidates(queries, bank, min(k, bank.shape[0]), distance, None, chunk_size,
                                           memory_budget, bank_sq_norms)
    return torch.cat([d_bank, batch_d], 1), torch.cat([bank_labels.to(labels.device).long()[i_bank], batch_labels], 1)


def _empty_soft_labels(queries: torch.Tensor, labels: torch.Tensor, num_classes: int, empty: str) -> torch.Tensor:
    """The soft labels of queries with no reference point at all (see :func:`knn_soft_labels`'s ``empty``)."""
    if empty == "self":
        if queries.shape[1] != num_classes:
            raise ValueError(
                f"empty='self' needs queries of dimension num_classes={num_classes}, got {queries.shape[1]}"
            )
        return queries.float().clone()
    if empty == "onehot":
        return F.one_hot(labels.long(), num_classes).float()
    return queries.new_full((queries.shape[0], num_classes), 1.0 / num_classes, dtype=torch.float32)
