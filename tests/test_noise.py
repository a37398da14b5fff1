"""Per-sample counter-based noise (fastdiff.noise): the torch twin against the Triton kernel's generator, batch
independence of whole DDPM runs, and the legacy CPU generators."""
from __future__ import annotations

import math
import random

import pytest
import torch

from fastdiff import ops
from fastdiff.analytic import GaussianDenoiser
from fastdiff.errors import FastdiffError
from fastdiff.grids import strided_grid
from fastdiff.noise import SampleNoise, philox4x32, philox_normals, uniform
from fastdiff.samplers import ddim, ddpm, initial_noise, randn_like_per_sample, sample_generators
from fastdiff.schedules import Schedule

from test_kernels import DEVICES, INTERPRET

# the largest difference between the twin's normals and the kernel's, in float32 ulp: Box-Muller goes through
# log/sqrt/cos/sin, which numpy (the interpreter), torch's CPU kernels and CUDA do not round alike; measured
# on this CPU at most 4 ulp (numpy vs torch) over 162,552 normals of 20 random (seed, indices, draw, n)
ULP_BOUND = 8
_RANDOM = random.Random(2026)
CASES = [(0, [0, 1, 2], 0, 37), (2**62 + 99, [5, 2**33 + 7], 3, 64), (1234, [7], 2**32 - 1, 5), (7, [0, 1], 1, 4099)] + [
    (_RANDOM.randrange(2**63), [_RANDOM.randrange(2**40) for _ in range(_RANDOM.randint(1, 5))], _RANDOM.randrange(2**32),
     _RANDOM.randint(1, 3000)) for _ in range(4)]  # random shapes, seeds, indices and draws (fixed, so reproducible)


def _ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    """Max distance in float32 ulp (same-sign values: the int32 bit patterns' difference)."""
    assert torch.equal(a.sign(), b.sign()) or float((a - b).abs().max()) < 1e-30
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


def test_philox_matches_the_random123_known_answers():
    # Random123's kat_vectors for philox4x32_10: zero counter/key, and all-ones
    assert [int(v) for v in philox4x32(0, 0, 0, 0, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    m = 0xFFFFFFFF
    assert [int(v) for v in philox4x32(m, m, m, m, m, m)] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,index,draw,n", CASES)
def test_twin_uint32_streams_equal_the_kernels(device, seed, index, draw, n):
    from fastdiff.kernels.sampler_step import philox_bits

    idx = torch.tensor(index, device=device)
    bits = philox_bits(seed, idx, draw, n)
    quads = torch.arange(bits.shape[1] // 4, device=device)[None, :]
    twin = torch.stack(philox4x32(quads, (idx & 0xFFFFFFFF)[:, None], (idx >> 32)[:, None], draw,
                                  seed & 0xFFFFFFFF, seed >> 32), -1).reshape(len(index), -1)
    assert torch.equal(bits, twin)
    assert torch.equal(uniform(bits.cpu()), uniform(twin.cpu()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,index,draw,n", CASES)
def test_twin_normals_equal_the_fused_steps_within_a_few_ulp(device, seed, index, draw, n):
    from fastdiff.kernels.sampler_step import sampler_step as fused

    b = len(index)
    zeros, ones = torch.zeros(b, n, device=device), torch.ones(b, device=device)
    kernel = fused(zeros, zeros, ones, ones, ones * 0, ones * 0, ones, param="x0", seed=seed,
                   sample_index=torch.tensor(index, device=device), draw=draw).cpu()
    twin = philox_normals(seed, torch.tensor(index), draw, n)
    assert _ulp(kernel, twin) <= ULP_BOUND
    assert not torch.equal(twin, philox_normals(seed, torch.tensor(index), draw + 1, n))


def test_normals_are_standard_and_keyed_per_sample():
    z = philox_normals(3, torch.arange(64), 0, 4096).double()
    assert abs(float(z.mean())) < 4 / math.sqrt(z.numel()) and abs(float(z.var()) - 1) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([z[:, :-1].flatten(), z[:, 1:].flatten()]))[0, 1])) < 0.01
    # sample k's noise does not depend on the batch around it
    assert torch.equal(philox_normals(3, torch.tensor([40, 2]), 0, 4096), z[[40, 2]].float())


@pytest.mark.parametrize("kernels", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(), reason="Triton needs CUDA or its interpreter"))])
def test_ddpm_samples_do_not_depend_on_the_batch_size(monkeypatch, kernels):
    """A whole DDPM run (initial and every step's noise) gives sample k the same result in batches of 1, 7 and 64:
    the analytic Gaussian denoiser treats every sample alone, so any difference would come from the noise."""
    monkeypatch.setenv("FASTDIFF_KERNELS", kernels)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    schedule = Schedule("cosine", 1000)
    model = GaussianDenoiser(0.0, 0.5, schedule)
    ts = strided_grid(1000, 10 if kernels == "triton" else 50, "linspace")

    def run(indices):
        x, noise = initial_noise(indices, (2, 3, 3), 5, device)
        return ddpm(lambda x, t: model(x.double(), t).float(), x, ts, schedule=schedule, param="eps",
                    generator=noise).x.cpu()

    full = run(range(64))
    assert torch.equal(run([13]), full[13:14])
    assert torch.equal(run(range(7, 14)), full[7:14])
    assert torch.equal(run([63, 0, 31]), full[[63, 0, 31]])
    assert not torch.equal(full[0], full[1])


def test_the_step_noise_is_the_streams_next_draws():
    """DDPM's z at its k-th noisy step is draw k of the stream (draw 0 is x_T): a sampler run equals one whose every
    step adds the stream's tensors explicitly."""
    schedule = Schedule("linear", 100)
    model = GaussianDenoiser(0.1, 1.0, schedule)
    ts = strided_grid(100, 5, "linspace")
    x, noise = initial_noise(range(3), (4,), 9, "cpu", dtype=torch.float64)
    got = ddpm(model, x, ts, schedule=schedule, param="eps", generator=noise)
    assert noise.draw == 1 + 4  # x_T plus every step but the last (no noise on the step to 0)
    explicit = SampleNoise(9, range(3), "cpu")
    assert torch.equal(explicit.next(x), x)
    draws = iter([explicit.next(x) for _ in range(4)])

    class Stream(list):  # a per-row generator list whose draws are given: ddpm draws through randn(x, generator)
        pass

    import fastdiff.samplers as samplers

    orig = samplers.randn
    try:
        samplers.randn = lambda x_, g: next(draws).to(x_.dtype)
        want = ddpm(model, x, ts, schedule=schedule, param="eps", generator=Stream([None] * 3))
    finally:
        samplers.randn = orig
    assert torch.allclose(got.x, want.x, rtol=0, atol=1e-12)


def test_legacy_torch_cpu_noise_reproduces_fastdiff_0_5():
    x, noise = initial_noise(range(3, 6), (2, 2), 4, "cpu", rng="torch-cpu")
    gens = sample_generators(4, range(3, 6))
    assert torch.equal(x, randn_like_per_sample(x.shape, gens, torch.float32, "cpu"))
    schedule = Schedule("cosine", 50)
    model = GaussianDenoiser(0.1, 0.8, schedule)
    ts = strided_grid(50, 5, "linspace")
    new = ddim(model, x.double(), ts, schedule=schedule, param="eps", eta=1.0, generator=noise).x
    old = ddim(model, x.double(), ts, schedule=schedule, param="eps", eta=1.0, generator=gens).x
    assert torch.equal(new, old)


def test_bad_noise_options_are_user_errors():
    with pytest.raises(FastdiffError, match="--noise"):
        SampleNoise(0, range(2), "cpu", rng="numpy")
    with pytest.raises(FastdiffError, match="seed"):
        SampleNoise(-1, range(2), "cpu")
    with pytest.raises(FastdiffError, match="batch"):
        SampleNoise(0, range(2), "cpu").next(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="tensor seed"):
        ops.sampler_step(torch.zeros(2, 3), torch.zeros(2, 3), param="x0", alpha_t=torch.ones(2),
                         sigma_t=torch.ones(2), coef_x0=torch.ones(2), coef_xt=torch.ones(2), coef_noise=torch.ones(2),
                         seed=torch.tensor([1, 2]), sample_index=torch.arange(2))
