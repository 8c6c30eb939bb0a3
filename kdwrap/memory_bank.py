"""A ring buffer of the most recent (vector, label) pairs, kept in buffers so it is saved and resumed with the loss.

In the style of lightly's ``MemoryBankModule`` and pytorch-metric-learning's ``CrossBatchMemory``: the storage is
created lazily on the device and dtype of the first vectors added, entries are detached, and under
``torch.distributed`` every rank adds the entries of all ranks so all ranks hold identical banks.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["MemoryBank"]


class MemoryBank(nn.Module):
    """Ring buffer of the ``size`` most recent detached vectors (``N x D``) and their int64 labels.

    Args:
        size: number of entries kept; ``0`` means no bank (``add`` does nothing, ``len(bank) == 0``).
        gather_distributed: when ``torch.distributed`` is initialised with world size > 1, ``add`` all-gathers the
            entries of every rank (rank 0's first) so every rank holds the same bank. ``add`` is then a collective:
            every rank must call it at every step, in the same order.
        process_group: the group to gather over (default: the world).

    Buffers (all in ``state_dict``): ``vectors`` (``size x D``), ``labels`` (``size``), ``ptr`` (next slot to
    write) and ``count`` (filled slots). ``vectors``/``labels`` are empty until the first ``add``; loading a
    state dict into an empty bank materialises it from the checkpoint's shapes. :meth:`squared_norms` keeps each
    entry's squared norm (a k-NN search's ``||r||^2`` term) up to date as entries are added, so a search does not
    recompute it over the whole bank at every step; it is derived state, outside ``state_dict``.
    """

    vectors: torch.Tensor
    labels: torch.Tensor
    ptr: torch.Tensor
    count: torch.Tensor

    def __init__(self, size: int, *, gather_distributed: bool = True, process_group: Any = None) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"MemoryBank size must be an int >= 0 (0 = no bank), got {size!r}")
        self.size = size
        self.gather_distributed = gather_distributed
        self.process_group = process_group
        self.register_buffer("vectors", torch.empty(0))
        self.register_buffer("labels", torch.empty(0, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("sq_norms", torch.empty(0), persistent=False)
        # Host-side mirrors of ptr/count: reading the buffers would force a device sync at every step.
        self._ptr = 0
        self._count = 0
        self._norms_version = -1  # vectors._version when sq_norms was last in step with it

    # ----------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:  # an empty bank is still a module, not a falsy container
        return True

    @property
    def materialised(self) -> bool:
        return self.vectors.dim() == 2

    @property
    def dim(self) -> int | None:
        """Dimension of the stored vectors, or ``None`` before the first ``add``."""
        return int(self.vectors.shape[1]) if self.materialised else None

    @property
    def is_full(self) -> bool:
        return self.size > 0 and self._count == self.size

    def extra_repr(self) -> str:
        return f"size={self.size}, filled={self._count}, dim={self.dim}"

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled entries ``(vectors[:n], labels[:n])`` with ``n = len(self)``, in slot order (not by age)."""
        if not self.materialised:
            return self.vectors.new_empty((0, 0)), self.labels.new_empty((0,))
        return self.vectors[: self._count], self.labels[: self._count]

    def squared_norms(self) -> torch.Tensor:
        """``(vectors[:n] ** 2).sum(1)`` in float32 for the filled entries, kept up to date by :meth:`add`
        (recomputed once after a ``load_state_dict`` or a direct write to ``vectors``)."""
        if not self.materialised:
            return self.vectors.new_empty((0,), dtype=torch.float32)
        if self.sq_norms.shape != self.vectors.shape[:1] or self._norms_version != self.vectors._version:
            self.sq_norms = self.vectors.float().pow(2).sum(1)
            self._norms_version = self.vectors._version
        return self.sq_norms[: self._count]

    def reset(self) -> None:
        """Forget every entry (storage is kept)."""
        self._set_pointers(0, 0)

    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, vectors: torch.Tensor, labels: torch.Tensor) -> None:
        """Store ``vectors`` (``B x D``) and ``labels`` (``B``), overwriting the oldest entries when full.

        Under distributed training this gathers every rank's entries first (unequal ``B`` across ranks is fine).
        A batch larger than the bank keeps its last ``size`` entries.
        """
        if self.size == 0:
            return
        if vectors.dim() != 2:
            raise ValueError(f"MemoryBank.add expects vectors of shape (B, D), got {tuple(vectors.shape)}")
        if labels.shape != vectors.shape[:1]:
            raise ValueError(
                f"MemoryBank.add expects labels of shape ({vectors.shape[0]},) to match the vectors, "
                f"got {tuple(labels.shape)}"
            )
        vectors = vectors.detach()
        labels = labels.detach().long()
        if self._distributed():
            vectors, labels = self._all_gather(vectors, labels)
        if not self.materialised:
            self.vectors = vectors.new_zeros((self.size, vectors.shape[1]))
            self.labels = labels.new_zeros((self.size,))
        elif vectors.shape[1] != self.vectors.shape[1]:
            raise ValueError(
                f"MemoryBank holds vectors of dimension {self.vectors.shape[1]}, got {vectors.shape[1]}; "
                "a bank stores one kind of vector: build a new bank for another dimension"
            )
        vectors = vectors.to(device=self.vectors.device, dtype=self.vectors.dtype)
        labels = labels.to(self.labels.device)
        n = vectors.shape[0]
        if n == 0:
            return
        in_step = self.sq_norms.shape == self.vectors.shape[:1] and self._norms_version == self.vectors._version
        if n >= self.size:
            self.vectors.copy_(vectors[-self.size :])
            self.labels.copy_(labels[-self.size :])
            self._set_pointers(0, self.size)
        else:
            # Slice copies (at most two) rather than index_copy_ with a modulo index: no index tensor per step.
            first = min(n, self.size - self._ptr)
            self.vectors[self._ptr : self._ptr + first] = vectors[:first]
            self.labels[self._ptr : self._ptr + first] = labels[:first]
            if first < n:
                self.vectors[: n - first] = vectors[first:]
                self.labels[: n - first] = labels[first:]
            if in_step:  # the new entries' norms only: B x D work instead of size x D
                norms = vectors.float().pow(2).sum(1)
                self.sq_norms[self._ptr : self._ptr + first] = norms[:first]
                if first < n:
                    self.sq_norms[: n - first] = norms[first:]
                self._norms_version = self.vectors._version
            self._set_pointers((self._ptr + n) % self.size, min(self._count + n, self.size))

    # ----------------------------------------------------------------------------------------------------------
    def _set_pointers(self, ptr: int, count: int) -> None:
        self._ptr, self._count = ptr, count
        self.ptr.fill_(ptr)
        self.count.fill_(count)

    def _distributed(self) -> bool:
        return (
            self.gather_distributed
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def _all_gather(self, vectors: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        group = self.process_group
        world = dist.get_world_size(group)
        n = torch.tensor([vectors.shape[0]], device=vectors.device, dtype=torch.long)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n, group=group)
        counts = [int(s) for s in torch.cat(sizes).tolist()]
        # all_gather needs equal shapes: pad to the largest batch (e.g. a short last batch on one rank), then trim.
        m = max(counts)
        pad = m - vectors.shape[0]
        if pad:
            vectors = torch.cat([vectors, vectors.new_zeros((pad, vectors.shape[1]))])
            labels = torch.cat([labels, labels.new_zeros((pad,))])
        vectors, labels = vectors.contiguous(), labels.contiguous()
        all_v = [torch.empty_like(vectors) for _ in range(world)]
        all_l = [torch.empty_like(labels) for _ in range(world)]
        dist.all_gather(all_v, vectors, group=group)
        dist.all_gather(all_l, labels, group=group)
        return (
            torch.cat([v[:c] for v, c in zip(all_v, counts)]),
            torch.cat([lab[:c] for lab, c in zip(all_l, counts)]),
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        vkey, lkey = prefix + "vectors", prefix + "labels"
        if vkey in state_dict and lkey in state_dict:
            v_in, l_in = state_dict[vkey], state_dict[lkey]
            if v_in.dim() == 2 and v_in.shape[0] != self.size:
                error_msgs.append(
                    f"MemoryBank {prefix!r}: the checkpoint's bank has {v_in.shape[0]} entries but this one was "
                    f"built with bank_size={self.size}; build it with bank_size={v_in.shape[0]} to resume"
                )
                return
            if v_in.shape != self.vectors.shape:
                if self.materialised and v_in.dim() == 2:
                    error_msgs.append(
                        f"MemoryBank {prefix!r}: the checkpoint stores vectors of dimension {v_in.shape[1]}, this "
                        f"bank holds dimension {self.vectors.shape[1]}; load it into a freshly built loss"
                    )
                    return
                # Materialise (or un-materialise) from the checkpoint's shapes, on this bank's device.
                device = self.vectors.device
                self.vectors = torch.empty(v_in.shape, dtype=v_in.dtype, device=device)
                self.labels = torch.empty(l_in.shape, dtype=torch.long, device=device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # The sync happens once per load, not per step.
        self._ptr, self._count = int(self.ptr), int(self.count)
        if self._count > (self.vectors.shape[0] if self.materialised else 0) or self._ptr >= max(self.size, 1):
            error_msgs.append(
                f"MemoryBank {prefix!r}: inconsistent checkpoint (ptr={self._ptr}, count={self._count}, "
                f"size={self.size})"
            )
            self._set_pointers(0, 0)
