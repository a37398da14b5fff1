"""Per-sample noise from a counter-based generator: sample k's noise is the same in any batch, on any rank or device.

Every normal a sampler draws is a pure function of (seed, sample index, draw, element): Philox4x32-10 (Salmon et al.
2011, "Parallel random numbers: as easy as 1, 2, 3") with key = the 64-bit seed and counter = (element quad,
sample index low 32 bits, sample index high 32 bits, draw), turned into four float32 normals per call by two
Box–Muller transforms — exactly what the fused sampler step (kernels/sampler_step.py) computes in registers with
Triton's `tl.philox`, `uint_to_uniform_float` and `pair_uniform_to_normal`. `philox_normals` is its pure-torch twin:

- the uint32 streams and the uniforms are bit-identical on every device (integer arithmetic, one exactly rounded
  int -> float32 conversion and one float32 product);
- the normals go through log, sqrt, cos and sin, which are not correctly rounded and differ between libraries:
  measured on CPU, the twin and the Triton kernel under the interpreter (numpy's float32 functions) differ by at most
  a few float32 ulp (tests/test_noise.py states the bound it checks); on CUDA the kernel uses the device's
  functions, not measured here.

Draw 0 is the initial noise x_T; a sampler's stochastic steps take draws 1, 2, ... in order (`SampleNoise`).

`rng="torch-cpu"` reproduces fastdiff <= 0.5's noise: one torch CPU generator per sample seeded with
(seed * 0x9E3779B97F4A7C15 + index) mod 2^64 (`sample_generators`), its normals drawn in sequence
and copied to the device — per-sample and batch-independent too, but drawn on the host (on a GPU, DDPM spent ~30 %
of its time there) and never inside a CUDA graph. Results rows name the generator in their `noise` column.
"""
from __future__ import annotations

from typing import Literal, Sequence, get_args

import torch

from fastdiff.errors import FastdiffError

NoiseRNG = Literal["philox", "torch-cpu"]
NOISE_RNGS: tuple[str, ...] = get_args(NoiseRNG)
# the `noise` column of a results row, per generator (fastdiff.results.KEY holds it)
ROW_NAMES = {"philox": "philox4x32-10-per-sample", "torch-cpu": "torch-cpu-per-sample"}

_SEED_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads (seed, index) over the 64-bit seed space
_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Philox4x32's Weyl key increments
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # and its round multipliers (Triton's, Random123's)
_UNIFORM_SCALE = 4.6566127342e-10  # Triton's uint_to_uniform_float for 32 bits: max int32 * scale < 1 in float32
_TWO_PI = 6.283185307179586


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint32 constant a times (...) uint32 values b (in int64) -> (high, low) 32-bit words of the 64-bit product,
    from 16-bit halves so that no int64 product overflows."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    return hh + (lh >> 16) + (hl >> 16) + (mid >> 16), ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox4x32-`rounds` of counters (c0..c3) under key (k0, k1): int64 tensors (or ints) holding uint32 values,
    broadcast together -> four int64 tensors of uint32 values. Triton's `philox_impl`, round for round."""
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3)))
    k0, k1 = (torch.as_tensor(k, dtype=torch.int64, device=c0.device) for k in (k0, k1))
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def uniform(r: torch.Tensor) -> torch.Tensor:
    """int64 tensor of uint32 values -> float32 uniforms in [0, 1): Triton's uint_to_uniform_float (bitcast to
    int32, negative x -> ~x, times 4.6566127342e-10 in float32)."""
    x = torch.where(r >= 2**31, r - 2**32, r)  # the int32 bit pattern
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 uniforms -> two float32 standard normals: Triton's pair_uniform_to_normal (u1 floored at 1e-7)."""
    u1 = torch.clamp(u1, min=1.0e-7)
    th = torch.tensor(_TWO_PI, dtype=torch.float32) * u2
    r = torch.sqrt(torch.tensor(-2.0, dtype=torch.float32) * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def philox_normals(seed: int | torch.Tensor, sample_index: torch.Tensor, draw: int, n: int) -> torch.Tensor:
    """(B,) int64 global sample indices -> (B, n) float32 standard normals of draw `draw` (0 <= draw < 2^32), on
    sample_index's device. Element e of sample k is normal e % 4 of Philox(key = seed, counter = (e // 4, k lo,
    k hi, draw)): what the fused sampler step draws for it. `seed`: an int in [0, 2^63) or a one-element int64
    tensor (a CUDA graph's static buffer)."""
    idx = sample_index.to(torch.int64)
    seed = torch.as_tensor(seed, dtype=torch.int64, device=idx.device).reshape(())
    quads = torch.arange((n + 3) // 4, dtype=torch.int64, device=idx.device)[None, :]
    r = philox4x32(quads, (idx & _M32)[:, None], (idx >> 32)[:, None], draw & _M32, seed & _M32, seed >> 32)
    n0, n1 = box_muller(uniform(r[0]), uniform(r[1]))
    n2, n3 = box_muller(uniform(r[2]), uniform(r[3]))
    return torch.stack([n0, n1, n2, n3], -1).reshape(len(idx), -1)[:, :n]


def sample_generators(seed: int, indices) -> list[torch.Generator]:
    """One CPU generator per global sample index, seeded with (seed * 0x9E3779B97F4A7C15 + index) mod 2^64: the
    per-sample noise of fastdiff <= 0.5 (rng "torch-cpu", kept to reproduce its results)."""
    return [torch.Generator().manual_seed((seed * _SEED_MIX + int(i)) % 2**64) for i in indices]


class SampleNoise:
    """The noise of a batch of samples with global indices `indices`: `next(x)` -> (B, ...) standard normals like
    x (in x's dtype, on x's device) for the next draw (draw 0 first: the initial noise).

    rng "philox": normals of `philox_normals`, computed on x's device; the fused sampler step can draw them itself
    from (`seed_tensor`, `index`, draw) — `take()` hands it the draw number instead of a tensor. rng "torch-cpu":
    fastdiff <= 0.5's per-sample CPU generators (`generators`), drawn in sequence.
    """

    def __init__(self, seed: int, indices, device, rng: str = "philox"):
        if rng not in NOISE_RNGS:
            raise FastdiffError(f"--noise {rng!r}: choose one of {', '.join(NOISE_RNGS)}")
        if not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise FastdiffError(f"--seed must be an int in [0, 2**63); got {seed!r}")
        self.seed, self.rng, self.draw = seed, rng, 0
        indices = list(indices)
        self.index = torch.as_tensor(indices, dtype=torch.int64, device=device)
        self.seed_tensor = torch.tensor([seed], dtype=torch.int64, device=device)
        if rng == "torch-cpu":
            self.generators = sample_generators(seed, indices)

    def __len__(self) -> int:
        return len(self.index)

    def take(self) -> int:
        """The next draw's number (the draw is then used up)."""
        self.draw += 1
        return self.draw - 1

    def next(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) normals like x for the next draw."""
        if len(x) != len(self.index):
            raise FastdiffError(f"noise for {len(self.index)} samples asked for a batch of {len(x)}")
        if self.rng == "torch-cpu":
            self.draw += 1
            return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype)
                                for g in self.generators]).to(x.device)
        z = philox_normals(self.seed_tensor.to(x.device), self.index.to(x.device), self.take(), x[0].numel())
        return z.reshape(x.shape).to(x.dtype)


Generators = SampleNoise | torch.Generator | Sequence[torch.Generator] | None


def randn_like_per_sample(shape, generators: Sequence[torch.Generator], dtype, device) -> torch.Tensor:
    """(B, ...) `shape` standard normals, row i drawn on the CPU from generators[i], then moved to `device`."""
    if len(generators) != shape[0]:
        raise FastdiffError(f"{len(generators)} generators for a batch of {shape[0]}: give one per sample")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in generators]).to(device)


def initial_noise(indices, shape: Sequence[int], seed: int, device, dtype=torch.float32, rng: str = "philox"):
    """-> ((len(indices), *shape) x_T, its SampleNoise): sample k's starting noise (draw 0) and the stream its later
    step noise comes from, whatever the batch, rank or device (EDM's seed per sample). `rng`: one of NOISE_RNGS
    ("torch-cpu": fastdiff <= 0.5's noise, to reproduce its results)."""
    noise = SampleNoise(seed, indices, device, rng)
    return noise.next(torch.empty((len(noise), *shape), dtype=dtype, device=device)), noise


def randn(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """(B, ...) standard normals like x from a SampleNoise, the global RNG, one generator, or one per row."""
    if isinstance(generator, SampleNoise):
        return generator.next(x)
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
    return randn_like_per_sample(x.shape, generator, x.dtype, x.device)
