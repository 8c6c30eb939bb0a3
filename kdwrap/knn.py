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


def _torch_search(
    queries: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    distance: str,
    self_offset: int | None,
    chunk_size: int | None,
    memory_budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, n = queries.shape[0], reference.shape[0]
    if distance == "cosine":
        queries, reference = F.normalize(queries, dim=1), F.normalize(reference, dim=1)
    if chunk_size is None:
        # Three B x chunk float32 temporaries live at once (product, top-k workspace, merge).
        chunk_size = max(k, memory_budget // max(1, 12 * b))
    best_d = queries.new_empty((b, 0))
    best_i = torch.empty((b, 0), dtype=torch.long, device=queries.device)
    for start in range(0, n, chunk_size):
        ref = reference[start : start + chunk_size]
        d = queries @ ref.T
        if distance == "l2":
            # ||q||^2 is the same for every reference of a query: added to the k winners only, at the end.
            d.mul_(-2).add_((ref * ref).sum(1))
        else:
            d.neg_()
        _exclude_self(d, start, self_offset)
        cd, ci = d.topk(min(k, d.shape[1]), dim=1, largest=False, sorted=False)
        if best_d.shape[1]:
            cd, ci = torch.cat([best_d, cd], 1), torch.cat([best_i, ci + start], 1)
            cd, sel = cd.topk(min(k, cd.shape[1]), dim=1, largest=False, sorted=False)
            ci = ci.gather(1, sel)
        else:
            ci = ci + start
        best_d, best_i = cd, ci
    best_d, order = best_d.sort(dim=1)
    best_i = best_i.gather(1, order)
    if distance == "l2":
        best_d = (best_d + (queries * queries).sum(1, keepdim=True)).clamp_min_(0)
    else:
        best_d = best_d + 1
    return best_d, best_i


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
        return _torch_search(queries, reference, k_eff, distance, self_offset, chunk_size, memory_budget)


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
) -> torch.Tensor:
    """k-NN estimate of the class posterior of each query (Duda & Hart): ``s_c = k_c / k'``.

    The reference set is ``bank`` (``N x D``, labels ``bank_labels``) followed by the queries themselves (labels
    ``labels``); a query is never its own neighbour. ``k' = min(k, N + B - 1)``: with fewer reference points than
    ``k``, all of them are used and the counts are divided by how many were used, so each row sums to 1.

    With no reference point at all (one query, empty bank) the row is, by ``empty``:
    ``"self"`` (default) the query vector itself, which for OSAKD's queries ``p`` makes the distillation term
    ``MSE(p, p)`` / ``KL(p || p)`` exactly zero with zero gradient (needs ``D == num_classes``); ``"onehot"`` the
    one-hot of the query's own label; ``"uniform"`` ``1 / num_classes``.

    Returns a float32 ``B x num_classes`` tensor with no gradient.
    """
    if empty not in EMPTY_RULES:
        raise ValueError(f"unknown empty rule {empty!r}; valid: {', '.join(EMPTY_RULES)}")
    if (bank is None) != (bank_labels is None):
        raise ValueError("pass both bank and bank_labels, or neither")
    queries = queries.detach()
    b = queries.shape[0]
    if bank is not None and bank.shape[0] > 0:
        reference = torch.cat([bank.to(queries.dtype), queries])
        ref_labels = torch.cat([bank_labels.to(labels.device, torch.long), labels.long()])
        offset = bank.shape[0]
    else:
        reference, ref_labels, offset = queries, labels.long(), 0
    _, idx = knn_search(
        queries,
        reference,
        k,
        backend=backend,
        distance=distance,
        self_offset=offset,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
    )
    used = idx.shape[1]
    if used == 0:
        if empty == "self":
            if queries.shape[1] != num_classes:
                raise ValueError(
                    f"empty='self' needs queries of dimension num_classes={num_classes}, got {queries.shape[1]}"
                )
            return queries.float().clone()
        if empty == "onehot":
            return F.one_hot(labels.long(), num_classes).float()
        return queries.new_full((b, num_classes), 1.0 / num_classes, dtype=torch.float32)
    neighbour_labels = ref_labels[idx]
    counts = torch.zeros((b, num_classes), dtype=torch.float32, device=queries.device)
    counts.scatter_add_(1, neighbour_labels, torch.ones_like(neighbour_labels, dtype=torch.float32))
    return counts / used
