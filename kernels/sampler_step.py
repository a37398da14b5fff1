"""Fused diffusion sampler step: x_s = c_x0 * x0_hat + c_xt * x_t + c_noise * z in one pass over memory.

One kernel reads x_t and the network output (and the unconditional output under classifier-free guidance,
and the noise when it is given) and writes x_s; everything else happens in registers:

    out    = u + w (c - u)                      classifier-free guidance (Ho & Salimans 2022), optional
    x0_hat = (x_t - sigma out) / alpha          eps-prediction
           = out                                x0-prediction
           = alpha x_t - sigma out              v-prediction (Salimans & Ho 2022)
    x0_hat = clamp(x0_hat, -1, 1)               optional
    x_s    = c_x0 x0_hat + c_xt x_t + c_noise z

The coefficients are per-sample scalars, so DDPM ancestral, DDIM(eta) and the distilled students' updates
are all this one kernel. z is a given tensor or Philox noise made in the kernel from
(seed, sample index, draw, element index), which is the same whatever the launch grid and BLOCK are, and which
fastdiff.noise.philox_normals computes in plain torch (its twin: the same uint32 streams, normals within a few ulp).
"""
import functools

import torch
import triton
import triton.language as tl

PARAMS = ("eps", "x0", "v")
_PARAM_INDEX = {p: i for i, p in enumerate(PARAMS)}
NOISE_NONE, NOISE_GIVEN, NOISE_PHILOX = 0, 1, 2


@triton.jit
def _philox_words(seed, quad, sample_index, draw):
    """(Q,) element-quad indices -> the four (Q,) uint32 Philox4x32-10 words of counter (quad, sample_index lo,
    sample_index hi, draw) under key `seed` (fastdiff.noise.philox4x32 is the torch twin)."""
    c0 = quad.to(tl.uint32)
    zero = c0 * 0
    return tl.philox(seed, c0, zero + (sample_index & 0xFFFFFFFF).to(tl.uint32),
                     zero + (sample_index >> 32).to(tl.uint32), zero + draw.to(tl.uint32))


@triton.jit
def _philox_normal_quads(seed, quad, sample_index, draw):
    """(Q,) element-quad indices -> (Q, 4) standard normals for elements 4 quad .. 4 quad + 3.

    Counter = (quad, sample_index lo, sample_index hi, draw), key = seed: one Philox4x32-10 call gives four
    uint32, and two Box-Muller transforms turn them into four normals, so no random bits are wasted.
    """
    r0, r1, r2, r3 = _philox_words(seed, quad, sample_index, draw)
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    j = tl.arange(0, 4)[None, :]
    return tl.where(j == 0, n0[:, None], tl.where(j == 1, n1[:, None], tl.where(j == 2, n2[:, None], n3[:, None])))


@triton.jit(do_not_specialize=["guidance", "draw"])
def _sampler_step_kernel(
    x_ptr, out_ptr, uncond_ptr, noise_ptr, y_ptr,  # (B, n) row-major
    alpha_ptr, sigma_ptr, c_x0_ptr, c_xt_ptr, c_noise_ptr, index_ptr,  # (B,)
    seed_ptr,  # (1,) int64: read on the device, so a CUDA graph replays with whatever seed its buffer holds
    n, guidance, draw,
    PARAM: tl.constexpr, CLIP: tl.constexpr, CFG: tl.constexpr, NOISE: tl.constexpr,
    BLOCK: tl.constexpr, WIDTH: tl.constexpr,
):
    # program (b, i) owns elements [i BLOCK, (i + 1) BLOCK) of sample b as a (BLOCK / WIDTH, WIDTH) tile:
    # WIDTH = 4 makes a tile row one Philox counter, WIDTH = 8 gives 16-byte loads of 16-bit dtypes.
    # The batch is grid axis 0, whose limit is 2^31 - 1, not 65535: toy 2-D data has huge batches.
    row = tl.program_id(0)
    tile_row = tl.program_id(1) * (BLOCK // WIDTH) + tl.arange(0, BLOCK // WIDTH)
    offs = tile_row[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :]
    mask = offs < n
    base = row.to(tl.int64) * n
    # per-sample coefficients, loaded once per program
    alpha = tl.load(alpha_ptr + row)
    sigma = tl.load(sigma_ptr + row)
    c_x0 = tl.load(c_x0_ptr + row)
    c_xt = tl.load(c_xt_ptr + row)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    # classifier-free guidance: out = u + w (c - u)
    if CFG:
        u = tl.load(uncond_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        out = u + guidance * (out - u)
    # network output -> x0_hat for the eps / x0 / v parameterizations
    if PARAM == 0:
        x0 = (x - sigma * out) / alpha
    elif PARAM == 1:
        x0 = out
    else:
        x0 = alpha * x - sigma * out
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    y = c_x0 * x0 + c_xt * x
    # noise term c_noise z; in-kernel noise is skipped for rows whose coefficient is 0 (last DDPM step, DDIM eta=0)
    if NOISE == 1:
        c_noise = tl.load(c_noise_ptr + row)
        y += c_noise * tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    elif NOISE == 2:
        tl.static_assert(WIDTH == 4, "Philox noise needs 4-wide tile rows")
        c_noise = tl.load(c_noise_ptr + row)
        if c_noise != 0.0:
            y += c_noise * _philox_normal_quads(tl.load(seed_ptr), tile_row, tl.load(index_ptr + row), draw)
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def sampler_step(x_t, out, alpha, sigma, c_x0, c_xt, c_noise, *, param, clip=False, out_uncond=None,
                 guidance=None, noise=None, seed=None, sample_index=None, draw=0, block=4096, num_warps=8):
    """(B, ...) x_t and network output, (B,) coefficients -> (B, ...) x_s in x_t's dtype.

    `noise` given: z = noise. Else `seed` (int, or a (1,) int64 tensor on x_t's device) and `sample_index` ((B,)
    int64) given: z is Philox noise of draw `draw`. Else no noise term. `block` must be a power of two >= 8; it
    changes the grid, never the result. Tensors already contiguous, fp32 and on x_t's device (the samplers'
    coefficient table, fastdiff.noise.SampleNoise's buffers) are used as they are: no copy, no allocation.
    """
    x_t, out = x_t.contiguous(), out.contiguous()
    y = torch.empty_like(x_t)
    numel = y.numel()
    if numel == 0:
        return y
    batch = x_t.shape[0]
    n = numel // batch
    block, num_warps = _launch_shape(n, block, num_warps)
    device = x_t.device
    coef = [c if c.dtype is torch.float32 and c.device == device and c.is_contiguous() else
            c.to(device=device, dtype=torch.float32).contiguous() for c in (alpha, sigma, c_x0, c_xt, c_noise)]
    if noise is not None:
        mode, noise = NOISE_GIVEN, noise.contiguous()
    elif seed is not None:
        mode = NOISE_PHILOX
        if sample_index.dtype is not torch.int64 or sample_index.device != device or not sample_index.is_contiguous():
            sample_index = sample_index.to(device=device, dtype=torch.int64).contiguous()
        if not isinstance(seed, torch.Tensor):
            seed = torch.tensor([int(seed)], dtype=torch.int64, device=device)
    else:
        mode = NOISE_NONE
    cfg = out_uncond is not None
    # unused pointers get x_t: the constexpr flags compile their loads away
    _sampler_step_kernel[(batch, -(-n // block))](
        x_t, out, out_uncond.contiguous() if cfg else x_t, noise if noise is not None else x_t, y,
        *coef, sample_index if mode == NOISE_PHILOX else x_t, seed if mode == NOISE_PHILOX else x_t,
        n, float(guidance) if cfg else 1.0, int(draw),
        PARAM=_PARAM_INDEX[param], CLIP=bool(clip), CFG=cfg, NOISE=mode, BLOCK=block,
        WIDTH=4 if mode == NOISE_PHILOX else 8, num_warps=num_warps,
    )
    return y


@functools.lru_cache(maxsize=256)
def _launch_shape(n: int, block: int, num_warps: int) -> tuple[int, int]:
    """(elements per sample, largest block, most warps) -> (block, warps): small samples (toy 2-D data) get a block,
    and warps, to their size. Cached: the host path of a sampler loop computes it once per shape."""
    block = min(block, max(8, triton.next_power_of_2(n)))
    return block, max(1, min(num_warps, block // 512))


def sampler_step_reference(x_t, out, alpha, sigma, c_x0, c_xt, c_noise, *, param, clip=False, out_uncond=None,
                           guidance=None, noise=None):
    """(B, ...) x_t and network output, (B,) coefficients -> (B, ...) x_s: the same update in plain torch (fp32)."""
    view = (-1,) + (1,) * (x_t.ndim - 1)
    alpha, sigma, c_x0, c_xt, c_noise = (c.to(torch.float32).reshape(view) for c in (alpha, sigma, c_x0, c_xt, c_noise))
    x, out = x_t.float(), out.float()
    if out_uncond is not None:
        out = out_uncond.float() + guidance * (out - out_uncond.float())
    x0 = {"eps": lambda: (x - sigma * out) / alpha, "x0": lambda: out, "v": lambda: alpha * x - sigma * out}[param]()
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    y = c_x0 * x0 + c_xt * x
    if noise is not None:
        y = y + c_noise * noise.float()
    return y.to(x_t.dtype)


@triton.jit
def _philox_bits_kernel(out_ptr, seed_ptr, index_ptr, draw, quads):
    # program b writes the (quads, 4) uint32 words of sample b's draw: the counters _philox_normal_quads uses
    row = tl.program_id(0)
    q = tl.arange(0, 1024)
    for start in range(0, quads, 1024):
        quad = start + q
        r0, r1, r2, r3 = _philox_words(tl.load(seed_ptr), quad, tl.load(index_ptr + row), draw)
        base = out_ptr + row.to(tl.int64) * quads * 4 + quad * 4
        mask = quad < quads
        tl.store(base, r0.to(tl.int64), mask=mask)
        tl.store(base + 1, r1.to(tl.int64), mask=mask)
        tl.store(base + 2, r2.to(tl.int64), mask=mask)
        tl.store(base + 3, r3.to(tl.int64), mask=mask)


def philox_bits(seed: int, sample_index: torch.Tensor, draw: int, n: int) -> torch.Tensor:
    """(B,) int64 sample indices -> (B, 4 ceil(n / 4)) int64 holding the uint32 Philox words the fused step's noise
    of draw `draw` is made of (element e: word e): what fastdiff.noise.philox4x32 must reproduce bit for bit."""
    quads = (n + 3) // 4
    out = torch.empty((len(sample_index), 4 * quads), dtype=torch.int64, device=sample_index.device)
    seed_t = torch.tensor([int(seed)], dtype=torch.int64, device=sample_index.device)
    _philox_bits_kernel[(len(sample_index),)](out, seed_t, sample_index.to(torch.int64).contiguous(), int(draw), quads)
    return out
