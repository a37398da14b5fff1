"""CUDA graphs for fixed-grid samplers: a whole sampler loop captured once per (network, batch shape, grid) and
replayed per batch, so a few-step sampler's wall-clock is the GPU's work, not Python's and the launches'.

What varies between replays lives in static device buffers the loop reads: the initial noise x_T, the sample
indices and the seed of the per-sample Philox noise (fastdiff.noise: the fused step reads the seed from a device
buffer and takes its draw number as a kernel argument, the same in every replay), and the condition y. Nothing in
the loop synchronises with the host: the samplers built on `fastdiff.samplers.affine_steps` (DDPM, strided DDPM,
DDIM, the distilled students) keep their coefficient tables on the device after the first call, and the fused
step validates nothing per call. A network whose forward synchronises (a text encoder's null-row test does) cannot
be captured: `capture` raises, and the sweep then runs that row eagerly and says so in the row (`cuda_graph`).

On CPU there is nothing to capture: `GraphedLoop` runs the same loop through the same static buffers eagerly (the
code path the CPU tests check against a plain run), and the sweep's `--cuda-graphs auto` is a no-op there while
`on` is an error. Generic baseline for comparison: `torch.compile(mode="reduce-overhead")` (benchmarks/).
"""
from __future__ import annotations

from typing import Callable, Literal, get_args

import torch

from fastdiff.errors import FastdiffError
from fastdiff.noise import SampleNoise

CudaGraphs = Literal["auto", "on", "off"]
CUDA_GRAPH_MODES: tuple[str, ...] = get_args(CudaGraphs)
WARMUP = 2  # eager runs on a side stream before capture: kernels compiled, dispatch table and device tables filled

Body = Callable[[torch.Tensor, SampleNoise, "torch.Tensor | None"], torch.Tensor]


def use_graphs(mode: str, device: torch.device, sampler: str) -> bool:
    """Whether a sweep row of `sampler` on `device` runs as a CUDA graph under --cuda-graphs `mode`.
    FastdiffError: an unknown mode, or "on" without a CUDA device."""
    if mode not in CUDA_GRAPH_MODES:
        raise FastdiffError(f"--cuda-graphs {mode!r}: choose one of {', '.join(CUDA_GRAPH_MODES)}")
    if mode == "on" and device.type != "cuda":
        raise FastdiffError("--cuda-graphs on needs a CUDA device; on CPU use auto (a no-op there) or off")
    from fastdiff.registry import find

    entry = find(sampler)  # graphable: its loop is affine_steps (fixed grid, device-side tables)
    return mode != "off" and device.type == "cuda" and entry is not None and entry.graphable


class GraphedLoop:
    """`body(x_T, noise, y) -> x0` (a sampler loop; (B, ...) x_T, a philox SampleNoise past its draw 0, (B, ...)
    condition or None) for one batch shape, captured as one CUDA graph; `loop(x_T, noise, y)` copies the batch's
    inputs into the static buffers, replays, and returns the static output (overwritten by the next call: copy it
    to keep it). `nfe`: network evaluations per replay, counted at capture. On CPU the same buffers feed an eager
    run. FastdiffError if the noise is not philox (CPU generators draw on the host) or the capture fails."""

    def __init__(self, body: Body, x: torch.Tensor, noise: SampleNoise, y: torch.Tensor | None = None,
                 warmup: int = WARMUP):
        if noise.rng != "philox":
            raise FastdiffError(f"a CUDA graph needs noise drawn on the device (--noise philox), not {noise.rng!r}")
        self.body, self.first_draw = body, noise.draw
        self.x, self.y = x.clone(), None if y is None else y.clone()
        self.noise = SampleNoise(noise.seed, noise.index.tolist(), x.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out, self.nfe = None, 0
        if x.is_cuda:
            self._capture(warmup)

    def _run(self) -> torch.Tensor:
        self.noise.draw = self.first_draw  # the draw numbers are kernel arguments: every replay starts here
        sample = self.body(self.x, self.noise, self.y)
        self.nfe = getattr(sample, "nfe", self.nfe)
        return getattr(sample, "x", sample)

    def _capture(self, warmup: int) -> None:
        side = torch.cuda.Stream(self.x.device)
        side.wait_stream(torch.cuda.current_stream(self.x.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                self._run()
        torch.cuda.current_stream(self.x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph), torch.no_grad():
                self.out = self._run()
        except RuntimeError as err:  # a host synchronisation or host copy inside the loop
            raise FastdiffError(f"this sampler loop cannot be captured as a CUDA graph: {err}".splitlines()[0]
                                ) from err
        self.graph = graph

    def __call__(self, x: torch.Tensor, noise: SampleNoise, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape != self.x.shape or (y is None) != (self.y is None) or (y is not None and y.shape != self.y.shape):
            raise FastdiffError(f"a graph captured for batch shape {tuple(self.x.shape)} was given "
                                f"{tuple(x.shape)}: capture one per batch shape")
        self.x.copy_(x)
        self.noise.index.copy_(noise.index)
        self.noise.seed_tensor.copy_(noise.seed_tensor)
        if y is not None:
            self.y.copy_(y)
        if self.graph is None:
            with torch.no_grad():
                return self._run()
        self.graph.replay()
        return self.out
