"""Run a function on 2 CPU processes (gloo) from a test."""
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, port, fn, args):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_two_ranks(fn, *args) -> None:
    """Call ``fn(rank, *args)`` on ranks 0 and 1 of a fresh gloo process group on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(port, fn, args), nprocs=2, join=True)
