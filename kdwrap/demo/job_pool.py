"""The trainings of a comparison, run in-process or as parallel worker processes, under one progress bar.

On a CPU each training is its own process, one per core, each with one thread: no oversubscribed cores, and the
same result for a seed whether the jobs run one at a time or in parallel. On a GPU the trainings run one at a time
in-process.
"""
from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

from .training import train_job

__all__ = ["run_jobs"]


class _BarFeed:
    """The in-process stand-in of the workers' queue: ``put(n)`` advances the bar."""

    def __init__(self, bar: Any) -> None:
        self.put = bar.update


def run_jobs(jobs: list[dict[str, Any]], workers: int, total_epochs: int, progress: bool,
             on_result: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
             process_per_job: bool = False, measure_memory: bool = True,
             desc: str | None = None) -> list[dict[str, Any]]:
    """Every job, ``workers`` processes at a time (in-process for one worker, unless ``process_per_job``); a bar
    counts finished epochs. ``on_result(job, result)`` as each job finishes (in this process), so that finished
    trainings are kept when a later one fails. ``process_per_job``: a fresh process for each job, so that its peak
    resident memory is its own; ``measure_memory=False`` records no peak memory (in-process trainings share one
    process's peak)."""
    if not measure_memory:
        jobs = [dict(j, measure_memory=False) for j in jobs]
    from tqdm.auto import tqdm

    bar = tqdm(total=total_epochs, unit="epoch", desc=desc or f"{len(jobs)} trainings", dynamic_ncols=True,
               disable=None if progress else True)  # None: off when stderr is not a terminal
    results: list[dict[str, Any]] = []
    if workers <= 1 and not process_per_job:
        for job in jobs:
            results.append(train_job(job, _BarFeed(bar)))
            if on_result is not None:
                on_result(job, results[-1])
        bar.close()
        return results
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no fork of a process that may hold OpenMP or CUDA state
    per_child = {"max_tasks_per_child": 1} if process_per_job else {}
    with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=workers, mp_context=ctx, **per_child) as pool:
        queue = manager.Queue()
        futures = {pool.submit(train_job, j, queue): j for j in jobs}
        pending = set(futures)
        while pending:
            while not queue.empty():
                bar.update(queue.get())
            done = {f for f in pending if f.done()}
            for f in done:
                results.append(f.result())  # re-raises a worker's error here
                if on_result is not None:
                    on_result(futures[f], results[-1])
            pending -= done
            time.sleep(0.2)
        while not queue.empty():
            bar.update(queue.get())
    bar.close()
    return results
