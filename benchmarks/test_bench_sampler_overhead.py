"""Sampler overhead (everything but the network) relative to the network, for the digits teacher's U-Net.

(B=256, 1, 8, 8) through the network of the `digits` training preset (cosine schedule, v-prediction), on the CPU
and, where there is one, on the GPU. Each round times, interleaved, the network alone for `steps` forwards and the
full `ddim` (eta=0) and `ddpm` (per-sample Philox noise, fastdiff.noise) loops over a `steps`-step grid; medians over rounds.

The asserted overhead is measured where it is exact and robust on each device:
- CPU: inside the sampler runs themselves, (wall-clock - time spent in the network calls) / the latter, so the
  network's run-to-run noise on shared CPUs cancels (CPU calls are synchronous, so the split is exact);
- GPU: loop time / network-alone time - 1, since timing each network call would need a synchronisation that
  the sampler loop does not have (GPU timings are steady enough for the plain ratio).
The loop / network-alone ratio is recorded on both.
"""
import statistics
import time

import torch

from fastdiff.grids import make_grid
from fastdiff.samplers import SampleNoise, ddim, ddpm, initial_noise
from fastdiff.schedules import Schedule
from fastdiff.train import PRESETS, build_network

BATCH, ROUNDS = 256, 5
STEPS = {"cpu": 4, "cuda": 20}  # few network forwards on the shared CPUs; a typical sweep's count on the GPU
MAX_OVERHEAD = 0.05


class _TimedNet:
    """model(x, t) that adds the seconds spent inside the (synchronous, CPU) network to `.seconds`."""

    def __init__(self, net):
        self.net, self.seconds = net, 0.0

    def __call__(self, x, t):
        start = time.perf_counter()
        out = self.net(x, t)
        self.seconds += time.perf_counter() - start
        return out


def _overhead(benchmark, device: torch.device) -> dict:
    """Run the interleaved rounds on `device`; returns {sampler: overhead} and records everything in extra_info."""
    on_cpu = device.type == "cpu"
    sync = (lambda: None) if on_cpu else torch.cuda.synchronize
    torch.manual_seed(0)
    cfg = PRESETS["digits"]
    net = build_network(cfg).eval().to(device)
    schedule = Schedule(cfg.schedule, cfg.T)
    steps = STEPS[device.type]
    ts = make_grid("trailing", steps, schedule)
    x, _ = initial_noise(range(BATCH), (1, 8, 8), 0, device)
    t_net = [torch.full((BATCH,), float(t), device=device) for t in ts[:-1]]
    alone, runs = [], {"ddim": [], "ddpm": []}

    def sample(name, model):
        if name == "ddim":
            return ddim(model, x, ts, schedule=schedule, param=cfg.param)
        return ddpm(model, x, ts, schedule=schedule, param=cfg.param, generator=SampleNoise(0, range(BATCH), device))

    def one_round():
        sync()
        start = time.perf_counter()
        for t in t_net:
            net(x, t)
        sync()
        alone.append(time.perf_counter() - start)
        for name, rows in runs.items():
            timed = _TimedNet(net)
            start = time.perf_counter()
            out = sample(name, timed if on_cpu else net)
            sync()
            rows.append((time.perf_counter() - start, timed.seconds))
            assert out.nfe == steps

    with torch.inference_mode():
        net(x, t_net[0])
        for name in runs:  # compiles the sampler-step kernels on the GPU, at no network cost
            sample(name, lambda x, t: torch.zeros_like(x))
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)

    loop_ratio = {name: statistics.median(total / a for (total, _), a in zip(rows, alone))
                  for name, rows in runs.items()}
    if on_cpu:
        overhead = {name: statistics.median((total - inside) / inside for total, inside in rows)
                    for name, rows in runs.items()}
    else:
        overhead = {name: ratio - 1 for name, ratio in loop_ratio.items()}
    benchmark.extra_info.update(
        batch=BATCH, steps=steps, rounds=ROUNDS, threads=torch.get_num_threads(),
        device="cpu" if on_cpu else torch.cuda.get_device_name(device),
        overhead_measure="outside / inside network calls" if on_cpu else "loop / network alone - 1",
        network_ms_per_forward=1e3 * statistics.median(alone) / steps,
        overhead_ddim=overhead["ddim"], overhead_ddpm=overhead["ddpm"],
        loop_over_network_ddim=loop_ratio["ddim"], loop_over_network_ddpm=loop_ratio["ddpm"],
    )
    return overhead


def test_sampler_overhead_cpu(benchmark):
    # one intra-op thread, as in tests/conftest.py: on a shared 2-vCPU machine OpenMP hand-offs made this network
    # 8-15x slower and erratic (0.9-1.7 s a forward with 2 threads, 0.12 s with 1, measured here)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        overhead = _overhead(benchmark, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert overhead["ddim"] <= MAX_OVERHEAD, benchmark.extra_info


def test_sampler_overhead_cuda(benchmark, cuda):
    overhead = _overhead(benchmark, cuda)
    assert overhead["ddim"] <= MAX_OVERHEAD, benchmark.extra_info
