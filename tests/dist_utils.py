"""Run a test function in N gloo processes (CPU), the way torchrun would."""
import gc
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, init, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS=1: N ranks x N threads would oversubscribe the cores
    if not init:  # fn sets torch.distributed up itself, as train.main does under torchrun
        return fn(rank, world_size, *args)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    ok = False
    try:
        fn(rank, world_size, *args)
        ok = True
    finally:  # as train.close_distributed: a gloo thread still at work when Python shuts down aborts the process
        if ok:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def run_workers(fn, *args, world_size=2, init=True):
    """Call fn(rank, world_size, *args) in `world_size` processes; an exception in any of them fails the test.
    init=False: the environment of torchrun, but no process group made for fn."""
    mp.spawn(_entry, args=(fn, world_size, _free_port(), init, args), nprocs=world_size, join=True)
