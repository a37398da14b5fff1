"""torchrun + DistributedDataParallel, or nothing at all.

Without torchrun (no WORLD_SIZE in the environment) every helper here is a no-op and
torch.distributed is never initialised. Under torchrun the process group comes from the environment
(NCCL on CUDA, gloo on CPU); only rank 0 writes files; an error in the setup on any rank is raised on every
rank (`same_outcome`), and every collective has a timeout.
"""
from __future__ import annotations

import datetime
import gc
import logging
import os
import time
from contextlib import contextmanager

import torch

from fastdiff.errors import FastdiffError

log = logging.getLogger(__name__)

# Rank 0 alone evaluates a distillation round and scores a sweep's rows while the others wait at the next
# collective; at the cifar10 preset's 10k evaluation samples that outlasts NCCL's 10-minute default.
TIMEOUT_S = 2 * 3600.0


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
def init_from_env(device: str = "auto", timeout_s: float = TIMEOUT_S):
    """Initialise the process group when launched by torchrun; tear it down afterwards.

    `timeout_s` bounds every collective: a rank left waiting longer raises instead of hanging.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        yield
        return
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
        # Every rank reaches the teardown before any rank leaves it: a rank that destroys its group while another is
        # still in a collective or in its own teardown can make gloo abort the process ('terminate called without
        # an active exception').
        torch.distributed.barrier()
    finally:
        gc.collect()  # a DDP reducer still holding the group must let go before the group is destroyed
        torch.distributed.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """Under torchrun a CUDA device is this process's own GPU, cuda:LOCAL_RANK (which init_from_env made current)."""
    if device.type != "cuda" or not _active():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.index not in (None, local):
        raise FastdiffError(f"--device {device} under torchrun: each process uses its own GPU (cuda:LOCAL_RANK); "
                            "pass --device cuda or auto, and choose the GPUs with CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", local)


def local_batch_size(global_batch: int) -> int:
    """Per-rank batch that keeps the global batch equal to the single-process one."""
    n = world_size()
    if global_batch % n:
        raise FastdiffError(f"--batch-size {global_batch} does not divide by the world size {n}; pick a multiple of "
                            f"{n}")
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


def shard(items: range) -> range:
    """This rank's share of `items` (sample indices, batch starts): items[rank], items[rank + world], ..."""
    return items[rank()::world_size()]


def restore_rng(gen: torch.Generator, states: list, salt: int, step: int) -> None:
    """Set `gen` to this rank's entry of `states` (one generator state per rank, saved via gather_objects).

    A checkpoint written by another number of processes has no stream for this rank: the run goes on with the same
    global batch from fresh streams seeded by (salt, step, rank), so it no longer matches an uninterrupted run.
    """
    if len(states) == world_size():
        gen.set_state(states[rank()])
        return
    if is_main():
        log.warning("checkpoint written by %d process(es), resumed by %d: random streams re-seeded at step %d",
                    len(states), world_size(), step)
    gen.manual_seed(hash((salt, step, rank())))  # hash of a tuple of ints: the same in every process


def capture_streams(gen: torch.Generator, device: torch.device) -> dict:
    """Every random stream a resume must restore, one entry per rank: the data/noise generator `gen`, the global
    CPU generator (dropout on CPU) and, on CUDA, the device's generator (dropout on the GPU)."""
    state = {"data": gather_objects(gen.get_state()), "torch": gather_objects(torch.get_rng_state())}
    if device.type == "cuda":
        state["cuda"] = gather_objects(torch.cuda.get_rng_state(device))
    return state


def restore_streams(state: dict, gen: torch.Generator, device: torch.device, salt: int, step: int) -> None:
    """Inverse of capture_streams (see restore_rng for a checkpoint of another world size)."""
    restore_rng(gen, state["data"], salt, step)
    restore_rng(torch.default_generator, state["torch"], salt + 1, step)
    if device.type == "cuda" and "cuda" in state:
        if len(state["cuda"]) == world_size():
            torch.cuda.set_rng_state(state["cuda"][rank()], device)
        else:
            torch.cuda.manual_seed(hash((salt + 2, step, rank())) % 2**63)


def _cpu_times(stat_path: str) -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat (Linux), None elsewhere."""
    try:
        with open(stat_path) as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; user .. steal (guest time is inside user)


def busy_fraction(interval_s: float = 0.5, stat_path: str = "/proc/stat") -> float:
    """Share of the CPUs other processes keep busy right now: /proc/stat over `interval_s` while this one sleeps
    (hypervisor steal counts as busy); the 1-minute load average per core where /proc/stat is missing."""
    before = _cpu_times(stat_path)
    if before is not None:
        time.sleep(interval_s)
        after = _cpu_times(stat_path) or before
        idle, total = after[0] - before[0], after[1] - before[1]
        if total > 0:
            return min(1.0, max(0.0, 1 - idle / total))
    cores = os.cpu_count() or 1
    return min(1.0, os.getloadavg()[0] / cores) if hasattr(os, "getloadavg") else 0.0


def configure_cpu_threads() -> int:
    """Give torch's intra-op pool the cores nobody else is using; -> the number of threads.

    OMP_NUM_THREADS, when set, decides. Otherwise: the cores this process may run on times the share that is
    idle right now (`busy_fraction`), split between the torchrun processes of this node, rounded, at least 1 and
    at most torch's own default: OpenMP threads spin waiting for a core another process holds, so on a busy
    machine more threads than free cores is slower than fewer (measurements in the README). A job that starts
    later is not seen: set OMP_NUM_THREADS=1 on a machine that will be shared.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = busy_fraction()
    per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    threads = max(1, min(torch.get_num_threads(), round(cores * (1 - busy) / per_node)))
    torch.set_num_threads(threads)
    log.info("torch uses %d CPU thread(s): %d cores, %.0f%% busy, %d process(es) on this node "
             "(set OMP_NUM_THREADS to choose)", threads, cores, 100 * busy, per_node)
    return threads


@contextmanager
def same_outcome():
    """Run the block on every rank; if it fails on any rank, it fails on every rank.

    A check that fails on one rank only (rank 0's refused run dir, a teacher file one node lacks) would otherwise
    leave the others waiting at the next collective: an in-process caller forever, NCCL until its timeout. Here
    the failing rank raises its own error and every other rank a FastdiffError with the same text. The block
    must not communicate.
    """
    if not _active():
        yield
        return
    failure = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - any error must reach the other ranks before it propagates
        failure = err
    text = None
    if isinstance(failure, FastdiffError):
        text = str(failure)
    elif failure is not None:
        text = f"rank {rank()} failed: {type(failure).__name__}: {failure}"
    texts = [t for t in gather_objects(text) if t is not None]
    if failure is not None:
        raise failure
    if texts:
        raise FastdiffError(texts[0])


def on_main(fn, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0 only; its result (or its error, see same_outcome) on every rank."""
    box = [None]
    with same_outcome():
        if is_main():
            box[0] = fn(*args, **kwargs)
    if _active():
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
