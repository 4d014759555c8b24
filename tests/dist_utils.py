"""Run a test function in N gloo processes (CPU), the way torchrun would."""
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_workers(fn, *args, world_size=2):
    """Call fn(rank, world_size, *args) in `world_size` processes; an exception in any of them fails the test."""
    mp.spawn(_entry, args=(fn, world_size, _free_port(), args), nprocs=world_size, join=True)
