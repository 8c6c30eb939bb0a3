"""Wall time of a piece of work on a device: CUDA events on GPUs (no host timer around asynchronous launches),
``perf_counter`` elsewhere. Used by the choices made by timing (ONE's ``execution="auto"``, OSAKD's
``backend="auto"``) and by the benchmarks."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["elapsed_ms", "median_ms", "timing_may_decide"]


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


def median_ms(runs: dict[str, Callable[[], object]], device: torch.device | str, repeats: int = 3) -> dict[str, float]:
    """Median milliseconds of each of ``runs`` over ``repeats`` timed rounds after one untimed one (allocation,
    autotuning); the runs alternate within a round, so a change of load or clocks hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(repeats + 1):
        for name, run in runs.items():
            ms = elapsed_ms(run, device)
            if rep:
                times[name].append(ms)
    return {name: statistics.median(t) for name, t in times.items()}


def timing_may_decide() -> bool:
    """Whether a choice between equivalent computations may be made by timing them. Not when deterministic
    algorithms are asked for: a timed choice may differ between runs, and the computations agree to float tolerance
    (or up to ties), not bit for bit."""
    return not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
