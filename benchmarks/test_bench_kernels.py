"""Kernel benchmarks: the fused sampler step against eager torch, torch.compile and a plain copy, and flash
attention against each SDPA backend. On CPU only the torch paths run (the Triton interpreter is no benchmark).

Run `pytest benchmarks --benchmark-only --benchmark-json FILE`; benchmarks/gpu_report.py turns the GPU
figures into results/gpu/kernels.json.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from fastdiff import ops

STEP_SIZES = {"1M": 2**20, "4M": 2**22, "16M": 2**24, "64M": 2**26}
GRAPH_STEPS = 10  # fused steps per captured graph in the triton_graph row
COMPILE_SIZES = ("16M",)  # torch.compile costs a compile per shape and dtype: one size keeps gpu.sh short
STEP_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SAMPLE_SHAPE = (4, 64, 64)  # a latent-sized sample: 16384 elements, so 1M..64M is a batch of 64..4096
ATTN_SHAPES = {  # (B, heads, N, d)
    "cifar-d64": (256, 4, 256, 64), "cifar-d160": (256, 1, 256, 160), "cifar-d128": (256, 4, 256, 128), "cifar-d256": (256, 4, 256, 256),
    "latent-d40": (16, 8, 4096, 40), "latent-d80": (16, 8, 4096, 80), "latent-d160": (16, 8, 4096, 160),
    "seq1024-d64": (512, 8, 1024, 64), "seq2048-d64": (128, 8, 2048, 64), "seq4096-d64": (32, 8, 4096, 64),
}
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
SWEEP_SHAPES = ("seq2048-d64", "latent-d80")
SWEEP_CONFIGS = [(128, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2),
                 (64, 64, 4, 3), (128, 32, 4, 3)]


def _step_inputs(numel, dtype, device):
    """x_t, out, noise of `numel` elements and (B,) coefficients of a DDPM step."""
    b = numel // SAMPLE_SHAPE[0] // SAMPLE_SHAPE[1] // SAMPLE_SHAPE[2]
    x, out, noise = (torch.randn(b, *SAMPLE_SHAPE, device=device, dtype=dtype) for _ in range(3))
    alpha = torch.rand(b, device=device) * 0.5 + 0.5
    coefs = (alpha, (1 - alpha**2).sqrt(), torch.rand(b, device=device), torch.rand(b, device=device),
             torch.rand(b, device=device))
    return x, out, noise, coefs


@functools.cache
def _compiled_reference():
    from fastdiff.kernels.sampler_step import sampler_step_reference

    return torch.compile(sampler_step_reference, dynamic=False)


@pytest.mark.parametrize("size", STEP_SIZES)
@pytest.mark.parametrize("dtype", STEP_DTYPES)
@pytest.mark.parametrize("impl", ["copy", "triton", "eager", "triton_philox", "triton_ddim", "compile", "triton_graph"])
def test_sampler_step_gpu(gpu_bench, cuda, impl, size, dtype):
    """eps-prediction step: triton, eager, compile read x_t, out, noise, write x_s; philox and ddim read no noise.
    triton_graph: GRAPH_STEPS Philox steps captured in one CUDA graph, timed per step (no host launch cost)."""
    from fastdiff.kernels import sampler_step as fused

    if impl == "compile" and size not in COMPILE_SIZES:
        pytest.skip(f"torch.compile is timed at {', '.join(COMPILE_SIZES)} only")
    numel, dt = STEP_SIZES[size], STEP_DTYPES[dtype]
    x, out, noise, coefs = _step_inputs(numel, dt, cuda)
    index = torch.arange(x.shape[0], device=cuda)
    seed = torch.tensor([1], device=cuda)  # a device buffer, as the samplers pass it (fastdiff.noise.SampleNoise)
    fns = {
        "copy": (lambda: x.clone(), 2),
        "triton": (lambda: fused.sampler_step(x, out, *coefs, param="eps", noise=noise), 4),
        "eager": (lambda: fused.sampler_step_reference(x, out, *coefs, param="eps", noise=noise), 4),
        "compile": (lambda: _compiled_reference()(x, out, *coefs, param="eps", noise=noise), 4),
        "triton_philox": (lambda: fused.sampler_step(x, out, *coefs, param="eps", seed=seed, sample_index=index), 3),
        "triton_ddim": (lambda: fused.sampler_step(x, out, *coefs, param="eps"), 3),
    }
    if impl == "triton_graph":
        step = fns["triton_philox"][0]
        step()  # compiled before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_STEPS):
                step()
        fn, tensors = graph.replay, 3 * GRAPH_STEPS
    else:
        fn, tensors = fns[impl]
    gpu_bench(fn, bytes=tensors * numel * x.element_size(), kind="sampler_step", impl=impl, size=size,
              numel=numel, dtype=dtype, steps_per_call=GRAPH_STEPS if impl == "triton_graph" else 1)


def _sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return fn


@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("impl", ("triton",) + SDPA_BACKENDS + ("dispatch",))
def test_attention_gpu(gpu_bench, cuda, impl, shape):
    """Forward only, fp16; FLOPs = 4 B H N^2 d (the two matmuls). `dispatch`: what fastdiff.ops.attention runs
    (fastdiff.dispatch's measured choice)."""
    from fastdiff import dispatch
    from fastdiff.kernels import attention as flash

    b, h, n, d = ATTN_SHAPES[shape]
    q, k, v = (torch.randn(b, h, n, d, device=cuda, dtype=torch.float16) for _ in range(3))
    try:
        attn = flash.attention if impl == "triton" else ops.attention if impl == "dispatch" else _sdpa(impl)
        attn(q, k, v)
    except (AttributeError, RuntimeError) as err:  # a backend this torch lacks, or that rejects the shape or GPU
        pytest.skip(f"{impl} unavailable for {shape}: {str(err).splitlines()[0]}")
    extra = {"chosen": dispatch.choose(q, k, v)} if impl == "dispatch" else {}
    gpu_bench(lambda: attn(q, k, v), flops=4 * b * h * n * n * d, kind="attention", impl=impl, shape=shape,
              bhnd=[b, h, n, d], **extra)


@pytest.mark.parametrize("shape", SWEEP_SHAPES)
@pytest.mark.parametrize("config", SWEEP_CONFIGS, ids=lambda c: "bm{}-bn{}-w{}-s{}".format(*c))
def test_attention_config_sweep_gpu(gpu_bench, cuda, config, shape):
    """Forward TFLOP/s of hand-picked launch configs, the data for the head-dim heuristic in kernels/attention.py."""
    from fastdiff.kernels import attention as flash

    b, h, n, d = ATTN_SHAPES[shape]
    q, k, v = (torch.randn(b, h, n, d, device=cuda, dtype=torch.float16) for _ in range(3))
    cfg = flash.Config(*config)
    try:
        flash.attention_forward(q, k, v, cfg)
    except Exception as err:  # a config that does not fit this GPU's shared memory or registers
        pytest.skip(f"{config} does not run at {shape}: {type(err).__name__}: {str(err).splitlines()[0]}")
    gpu_bench(lambda: flash.attention_forward(q, k, v, cfg), flops=4 * b * h * n * n * d, kind="attention_sweep",
              impl="triton", shape=shape, config=list(config),
              default=list(flash.pick_config(d, torch.float16)) == list(config))


def test_sampler_step_cpu(benchmark, cpu_threads):
    """The torch path fastdiff uses on CPU: one DDPM step with given noise, 1M fp32 elements."""
    x, out, noise, coefs = _step_inputs(2**20, torch.float32, "cpu")
    names = ("alpha_t", "sigma_t", "coef_x0", "coef_xt", "coef_noise")
    benchmark(ops.sampler_step, x, out, param="eps", noise=noise, **dict(zip(names, coefs)))


def test_attention_cpu(benchmark, cpu_threads):
    """The torch path fastdiff uses on CPU (SDPA) at a CIFAR 16x16 attention shape."""
    q, k, v = (torch.randn(8, 4, 256, 64) for _ in range(3))
    benchmark(ops.attention, q, k, v)


def test_sampler_step_host_path_cpu(benchmark, cpu_threads, monkeypatch):
    """The fused step's Python host path per call with the kernel launch stubbed out: what every GPU step pays on top
    of Triton's launch itself, timed on the CPU. A sampler's call: (16, 1, 8, 8) fp32, coefficient rows of its
    device table, the Philox seed buffer and sample indices of fastdiff.noise.SampleNoise."""
    import statistics
    import time

    from fastdiff.kernels import sampler_step as fused

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(fused, "_sampler_step_kernel", _NoLaunch())
    x = torch.randn(16, 1, 8, 8)
    out = torch.randn_like(x)
    coefs = torch.rand(5, 16).unbind()
    index, seed = torch.arange(16), torch.tensor([3])
    calls, per_call = 1000, []

    def run():
        start = time.perf_counter()
        for _ in range(calls):
            fused.sampler_step(x, out, *coefs, param="v", clip=True, seed=seed, sample_index=index, draw=1)
        per_call.append((time.perf_counter() - start) / calls * 1e6)

    benchmark.pedantic(run, rounds=7, warmup_rounds=1)
    benchmark.extra_info.update(kind="sampler_step_host_path", us_per_call=statistics.median(per_call), calls=calls)
