"""Run a function on 2 CPU processes (gloo) from a test."""
import os
import sys
import tempfile

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, store_file, fn, args):
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        fn(rank, *args)
        # Both ranks done before either tears the group down: a rank that destroys it while the other still
        # finishes (saving, freeing DDP's reducer) can abort the other's gloo threads.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: objects freed there (DDP's reducer, gloo's threads) can call
    # std::terminate ("terminate called without an active exception", SIGABRT) after the work is done and checked.
    # Reached only when fn returned: an exception above still reaches mp.spawn with its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_two_ranks(fn, *args) -> None:
    """Call ``fn(rank, *args)`` on ranks 0 and 1 of a fresh gloo process group.

    The ranks meet through a file store rather than a TCP port: a port picked free here can be taken before
    rank 0 binds it."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(os.path.join(tmp, "store"), fn, args), nprocs=2, join=True)
