"""Benchmark fixtures: GPU kernels are timed with triton.testing.do_bench (L2 flushed between runs, median of
repeats after warm-up) and the figures land in `benchmark.extra_info`; pytest-benchmark's own rounds time the
same call on the host, synchronised, so its statistics include launch overhead.

With FASTDIFF_BENCH_LOG=FILE each GPU figure is also appended to FILE as one JSON line the moment it is
measured, so a run cut short (gpu.sh's time limits) keeps what it measured.
"""
import json
import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """`pytest --benchmark-only` keeps the benchmarks, a plain run (--benchmark-skip, see pyproject.toml) the tests:
    the other kind is deselected rather than listed as hundreds of skips. GPU benchmarks (those using the `cuda`
    fixture) are skipped, with the reason, on a machine without CUDA."""
    def is_benchmark(item):
        return "benchmark" in getattr(item, "fixturenames", ())

    if config.getoption("benchmark_only") or config.getoption("benchmark_skip"):
        keep = config.getoption("benchmark_only")
        deselected = [item for item in items if is_benchmark(item) != keep]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if is_benchmark(item) == keep]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU benchmark: no CUDA device")
    for item in items:
        if "cuda" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


@pytest.fixture
def cpu_threads(benchmark):
    """CPU benchmarks run on one torch thread: on a small shared machine two threads under load run up to ~10x
    slower and vary far more. Restores the thread count afterwards and records it in extra_info."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    benchmark.extra_info["torch_threads"] = 1
    yield 1
    torch.set_num_threads(before)


@pytest.fixture
def cuda():
    return torch.device("cuda")


def _log_line(info: dict) -> None:
    """Append one figure to FASTDIFF_BENCH_LOG (a JSON line), when it is set."""
    if os.environ.get("FASTDIFF_BENCH_LOG"):
        with open(os.environ["FASTDIFF_BENCH_LOG"], "a") as f:
            f.write(json.dumps(info, default=str) + "\n")


@pytest.fixture
def gpu_log():
    """gpu_log(benchmark, **info): record figures timed by the benchmark itself in extra_info and the log."""
    def log(benchmark, **info):
        benchmark.extra_info.update(info)
        _log_line(benchmark.extra_info)
    return log


@pytest.fixture
def gpu_bench(benchmark, cuda):
    """gpu_bench(fn, bytes=..., flops=..., **info) -> median ms of fn on the GPU, recorded with GB/s or TFLOP/s."""

    def run(fn, *, bytes=None, flops=None, **info):
        from triton.testing import do_bench

        ms = do_bench(fn, warmup=25, rep=75, return_mode="median")
        benchmark.extra_info.update(info, ms=ms)
        if bytes is not None:
            benchmark.extra_info.update(bytes=bytes, gbps=bytes / ms / 1e6)
        if flops is not None:
            benchmark.extra_info.update(flops=flops, tflops=flops / ms / 1e9)
        _log_line(benchmark.extra_info)

        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=10, warmup_rounds=2)
        return ms

    return run
