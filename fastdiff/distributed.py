"""torchrun + DistributedDataParallel, or nothing at all.

Without torchrun (no WORLD_SIZE in the environment) every helper here is a no-op and
torch.distributed is never initialised. Under torchrun the process group comes from the environment
(NCCL on CUDA, gloo on CPU); only rank 0 writes files.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from fastdiff.errors import FastdiffError


def _active() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if _active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _active():
        torch.distributed.barrier()


@contextmanager
def init_from_env(device: str = "auto"):
    """Initialise the process group when launched by torchrun; tear it down afterwards."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        yield
        return
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def local_batch_size(global_batch: int) -> int:
    """Per-rank batch that keeps the global batch equal to the single-process one."""
    n = world_size()
    if global_batch % n:
        raise FastdiffError(f"--batch-size {global_batch} does not divide by the world size {n}; pick a multiple of {n}")
    return global_batch // n


def wrap_ddp(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP-wrap `net` under torchrun; return it unchanged otherwise."""
    if not _active():
        return net
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without torchrun)."""
    if not _active():
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def shard(indices: range) -> range:
    """This rank's share of sample indices: rank, rank + world, ... (strided, so all ranks stay busy)."""
    return indices[rank()::world_size()]


def configure_cpu_threads() -> None:
    """Use half the cores for torch's intra-op threads unless OMP_NUM_THREADS says otherwise.

    On a small shared machine a full set of OpenMP threads collapses as soon as anything else runs: the
    digits teacher trained at 0.3 it/s with 2 threads on 2 busy vCPUs and at 5.5 it/s with 1 (measured here).
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // 2))


def on_main(fn, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0, its result (or its FastdiffError) on every rank.

    Without this, a check that fails on rank 0 only (a refused run dir) would leave the other ranks waiting
    at the next collective forever; here every rank raises the same error.
    """
    if not _active():
        return fn(*args, **kwargs)
    box = [None, None]
    if is_main():
        try:
            box = [fn(*args, **kwargs), None]
        except FastdiffError as err:
            box = [None, str(err)]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise FastdiffError(box[1])
    return box[0]
