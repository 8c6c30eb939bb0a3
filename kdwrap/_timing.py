"""Wall time of a piece of work on a device: CUDA events on GPUs (no host timer around asynchronous launches),
``perf_counter`` elsewhere. Used by ``execution="auto"`` and by the benchmarks."""
from __future__ import annotations

import time
from typing import Callable

import torch

__all__ = ["elapsed_ms"]


def elapsed_ms(fn: Callable[[], object], device: torch.device | str) -> float:
    """Milliseconds that ``fn()`` takes on ``device``, waiting for its kernels to finish."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3
