"""Whole sampler loops on the GPU: eager vs one CUDA graph (fastdiff.graphs) vs torch.compile(mode="reduce-overhead"),
with the network alone beside them, for the digits U-Net and a CIFAR-sized U-Net (the DDPM paper's 35.7M) at
batch 1, 16 and 256, for a 1-step and a 4-step student (DDIM eta 0 on the grid i/N) and 4-step DDPM with per-sample
Philox noise. Wall-clock per sample: the whole loop (initial noise given), synchronised, median of repeats.

Also the attention block as the U-Net runs it (norm, q/k/v layout copies, attention, projection, residual) at the
attention shapes of benchmarks/test_bench_kernels.py's CIFAR and latent rows, through fastdiff's dispatch and through
plain SDPA: the part a fused prologue/epilogue would remove.

Run by benchmarks/gpu.sh (figures into FASTDIFF_BENCH_LOG as they come); skipped without CUDA.
"""
import functools

import pytest
import torch

from fastdiff.graphs import GraphedLoop
from fastdiff.samplers import ddim, ddpm, initial_noise, make_grid, student_grid
from fastdiff.schedules import Schedule
from fastdiff.train import PRESETS, build_network

MODELS = {"digits": ("digits", (1, 8, 8)), "cifar": ("cifar10", (3, 32, 32))}
BATCHES = (1, 16, 256)
LOOPS = {"student1": 1, "student4": 4, "ddpm4": 4}
COMPILE_AT = {("digits", 16), ("cifar", 16)}  # torch.compile costs a compile per shape: two shapes keep gpu.sh short
BLOCKS = {"cifar-16x16-c256": (256, 256, 16, 64), "cifar-16x16-c160": (256, 160, 16, 160),  # (B, C, HW side, d)
          "latent-64x64-c320": (16, 320, 64, 40)}


@functools.cache
def _network(model: str):
    preset, _ = MODELS[model]
    torch.manual_seed(0)
    return build_network(PRESETS[preset]).eval().to("cuda"), Schedule(PRESETS[preset].schedule, PRESETS[preset].T)


def _loop(name: str, schedule: Schedule):
    """body(x, noise, y) -> Sample of the loop `name`."""
    steps = LOOPS[name]
    if name.startswith("student"):
        ts = student_grid(steps)
        return lambda net: lambda x, noise, y: ddim(net, x, ts, schedule=schedule, param="v", clip=True)
    ts = make_grid("linspace", steps, schedule)
    return lambda net: lambda x, noise, y: ddpm(net, x, ts, schedule=schedule, param="v", clip=True, generator=noise)


def _time(fn, repeats: int = 20) -> float:
    """Median ms of fn() with CUDA events after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _run_loop(benchmark, gpu_log, cuda, mode, model, batch, loop):
    net, schedule = _network(model)
    shape = MODELS[model][1]
    x, noise = initial_noise(range(batch), shape, 0, cuda)
    with torch.no_grad():
        if mode == "network":  # the loop's network forwards alone, eager
            t = torch.full((batch,), 0.5, device=cuda)
            fn = lambda: [net(x, t) for _ in range(LOOPS[loop])]  # noqa: E731
        elif mode == "graph":
            graphed = GraphedLoop(_loop(loop, schedule)(net), x, noise)
            fn = lambda: graphed(x, noise)  # noqa: E731
        else:
            model_fn = torch.compile(net, mode="reduce-overhead") if mode == "compile" else net
            body = _loop(loop, schedule)(model_fn)

            def fn():
                noise.draw = 1
                return body(x, noise, None)
        ms = _time(fn)
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    gpu_log(benchmark, kind="sampler_loop", mode=mode, model=model, batch=batch, loop=loop, steps=LOOPS[loop], ms=ms,
            ms_per_sample=ms / batch)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("mode", ["network", "eager", "graph"])
def test_sampler_loop_gpu(benchmark, cuda, gpu_log, mode, model, batch, loop):
    _run_loop(benchmark, gpu_log, cuda, mode, model, batch, loop)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("model,batch", sorted(COMPILE_AT))
def test_sampler_loop_compile_gpu(benchmark, cuda, gpu_log, model, batch, loop):
    """The generic baseline, last in the file: a compile per model costs tens of seconds."""
    _run_loop(benchmark, gpu_log, cuda, "compile", model, batch, loop)


@pytest.mark.parametrize("shape", BLOCKS)
@pytest.mark.parametrize("impl", ["dispatch", "sdpa"])
def test_attention_block_gpu(benchmark, cuda, gpu_log, monkeypatch, impl, shape):
    """The U-Net's AttnBlock forward (fp16), whole: FASTDIFF_KERNELS=auto (the dispatch table) vs torch (SDPA)."""
    from fastdiff import dispatch
    from fastdiff.models.unet import AttnBlock

    b, c, side, d = BLOCKS[shape]
    monkeypatch.setenv("FASTDIFF_KERNELS", "auto" if impl == "dispatch" else "torch")
    block = AttnBlock(c, d).to(cuda, torch.float16).eval()
    x = torch.randn(b, c, side, side, device=cuda, dtype=torch.float16)
    with torch.no_grad():
        block(x)
        ms = _time(lambda: block(x))
        benchmark.pedantic(lambda: block(x), rounds=3, warmup_rounds=1)
    chosen = {k: v for k, v in dispatch._TABLE.items() if f"N={side * side}|d={d}" in k}
    gpu_log(benchmark, kind="attention_block", impl=impl, shape=shape, bchw=[b, c, side, side], head_dim=d, ms=ms,
            dispatch=chosen)
