"""Dispatch for the hot paths: one function per kernel, Triton on CUDA and plain torch elsewhere.

`FASTDIFF_KERNELS` picks the path: `auto` (default; Triton for CUDA tensors when Triton imports and supports
the dtype, torch otherwise; self-attention takes the implementation fastdiff.dispatch measured fastest for its
shape on the device), `torch`, or `triton` (on a CPU tensor this runs Triton's interpreter, which
needs TRITON_INTERPRET=1 set before Triton is first imported). Importing this module does not import Triton.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch
import torch.nn.functional as F

from fastdiff import dispatch
from fastdiff.errors import FastdiffError
from fastdiff.param import PARAMS, append_dims, to_x0_eps

KERNEL_MODES = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_HEAD_DIM = 256


@functools.cache
def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    # the same truth values Triton reads TRITON_INTERPRET with
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


def _use_triton(x: torch.Tensor, supported: bool) -> bool:
    """Whether to run the Triton path for tensors like `x`; `supported`: whether the kernel handles them."""
    mode = os.environ.get("FASTDIFF_KERNELS", "auto")
    if mode not in KERNEL_MODES:
        raise FastdiffError(f"FASTDIFF_KERNELS={mode!r}: choose one of {', '.join(KERNEL_MODES)}")
    if mode == "torch":
        return False
    if mode == "auto":
        return x.is_cuda and supported and _triton_importable()
    if not _triton_importable():
        raise FastdiffError("FASTDIFF_KERNELS=triton but triton does not import; install it or use auto/torch")
    if not x.is_cuda and not _interpreting():
        raise FastdiffError("FASTDIFF_KERNELS=triton on a CPU tensor needs Triton's interpreter: set "
                            "TRITON_INTERPRET=1 before anything imports triton, or use FASTDIFF_KERNELS=auto")
    if not supported:
        raise ValueError(f"the Triton kernel does not support these inputs ({x.dtype}, shape {tuple(x.shape)}); "
                         "use FASTDIFF_KERNELS=auto or torch")
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, heads, N, d) q, (B, heads, M, d) k and v -> (B, heads, N, d) softmax(q k^T / sqrt(d)) v, in q's dtype.

    Self-attention (M = N, no mask): Triton flash attention (differentiable) or torch's
    scaled_dot_product_attention (SDPA); in mode auto, whichever of Triton and SDPA's backends
    `fastdiff.dispatch` measured fastest for the shape on this CUDA device. Cross-attention (M != N) or a (B, M)
    key-padding `mask` (True: attend) always goes to SDPA: the Triton kernel has one sequence length and no mask
    (text sequences are short, L <= 77).
    """
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention needs q (B, heads, N, d) and k, v (B, heads, M, d); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device) or not q.is_floating_point():
        raise ValueError(f"attention needs q, k, v of one floating dtype on one device; got "
                         f"{q.dtype}/{k.dtype}/{v.dtype} on {q.device}/{k.device}/{v.device}")
    if mask is not None or q.shape != k.shape:
        if mask is not None and tuple(mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"attention's key-padding mask must be (B, M) = {(k.shape[0], k.shape[2])}; got "
                             f"{tuple(mask.shape)}")
        attn_mask = None if mask is None else mask[:, None, None, :].to(q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    use_triton = _use_triton(q, q.dtype in TRITON_DTYPES and q.shape[-1] <= MAX_TRITON_HEAD_DIM)
    if os.environ.get("FASTDIFF_KERNELS", "auto") == "auto":
        return dispatch.run(dispatch.choose(q, k, v, triton=use_triton), q, k, v)
    if use_triton:
        from fastdiff.kernels.attention import attention as flash_attention

        return flash_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def sampler_step(x_t: torch.Tensor, out: torch.Tensor, *, param: str, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
                 coef_x0: torch.Tensor, coef_xt: torch.Tensor, coef_noise: torch.Tensor, clip: bool = False,
                 noise: torch.Tensor | None = None, seed: int | None = None, sample_index: torch.Tensor | None = None,
                 out_uncond: torch.Tensor | None = None, guidance: float | None = None, draw: int = 0,
                 validate: bool = True) -> torch.Tensor:
    """(B, ...) x_t and network output -> (B, ...) x_s = coef_x0 x0_hat + coef_xt x_t + coef_noise z, in x_t's dtype.

    x0_hat comes from `out` in the parameterization `param` (eps, x0 or v) at (alpha_t, sigma_t), after the
    guidance combine out = u + w (c - u) when `out_uncond` (u) and `guidance` (w) are given, clamped to
    [-1, 1] when `clip`. The five coefficients are per-sample (B,) tensors. z is `noise` when given; else,
    with `seed` (an int, or a (1,) int64 tensor on x_t's device) and `sample_index` ((B,) global sample indices),
    the Philox noise of draw `draw` (fastdiff.noise): a function of (seed, sample index, draw, element) only, so
    sample k gets the same noise in any batch; else there is no noise term (coef_noise must then be 0). The
    Triton kernel draws it in registers, the torch path through fastdiff.noise.philox_normals: the same uint32
    streams, normals within a few float32 ulp (the log/sin/cos of the two differ).
    Math runs in fp32, or fp64 for fp64 inputs on the torch path.

    `validate=False` skips the argument checks (ValueError otherwise): the samplers pass it, since they build the
    per-sample coefficients themselves; the check that a noiseless step has coef_noise == 0 costs a host-device
    synchronisation on CUDA, which would also keep a sampler loop out of a CUDA graph.
    """
    if validate:
        _check_step(x_t, out, param, (alpha_t, sigma_t, coef_x0, coef_xt, coef_noise), noise, seed, sample_index,
                    out_uncond, guidance)
    kwargs = dict(param=param, clip=clip, out_uncond=out_uncond, guidance=guidance)
    # the fused kernel has no backward: under autograd (noise optimisation through a sampler) the torch path runs
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x_t, out, out_uncond))
    if not differentiable and _use_triton(x_t, x_t.dtype in TRITON_DTYPES):
        from fastdiff.kernels.sampler_step import sampler_step as fused_step

        return fused_step(x_t, out, alpha_t, sigma_t, coef_x0, coef_xt, coef_noise, noise=noise, seed=seed,
                          sample_index=sample_index, draw=draw, **kwargs)
    if seed is not None:
        from fastdiff.noise import philox_normals

        noise = philox_normals(seed, sample_index.to(x_t.device), draw, x_t[0].numel()).reshape(x_t.shape)
    return _sampler_step_torch(x_t, out, alpha_t, sigma_t, coef_x0, coef_xt, coef_noise, noise=noise, **kwargs)


def _check_step(x_t, out, param, coefs, noise, seed, sample_index, out_uncond, guidance) -> None:
    """The argument checks of sampler_step (ValueError naming the argument)."""
    if param not in PARAMS:
        raise ValueError(f"unknown parameterization {param!r}; choose one of {PARAMS}")
    if x_t.ndim < 1 or not x_t.is_floating_point():
        raise ValueError(f"x_t must be a floating (B, ...) tensor; got {x_t.dtype} of shape {tuple(x_t.shape)}")
    batch = x_t.shape[0]
    for name, t in (("out", out), ("noise", noise), ("out_uncond", out_uncond)):
        if t is not None and (t.shape != x_t.shape or not t.is_floating_point()):
            raise ValueError(f"{name} must be a floating tensor of x_t's shape {tuple(x_t.shape)}; "
                             f"got {t.dtype} of shape {tuple(t.shape)}")
    coefs = dict(zip(("alpha_t", "sigma_t", "coef_x0", "coef_xt", "coef_noise"), coefs))
    for name, c in coefs.items():
        if not isinstance(c, torch.Tensor) or c.shape != (batch,):
            raise ValueError(f"{name} must be a per-sample tensor of shape ({batch},); got {c!r:.80}")
    if (out_uncond is None) != (guidance is None):
        raise ValueError("classifier-free guidance needs both out_uncond and guidance")
    if noise is not None and seed is not None:
        raise ValueError("give either noise or seed, not both")
    if seed is not None:
        if isinstance(seed, torch.Tensor):
            if seed.shape != (1,) or seed.dtype != torch.int64:
                raise ValueError(f"a tensor seed must be (1,) int64; got {seed.dtype} of shape {tuple(seed.shape)}")
        elif not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63); got {seed!r}")
        if sample_index is None or sample_index.shape != (batch,) or sample_index.is_floating_point():
            raise ValueError(f"seeded noise needs sample_index, an integer tensor of shape ({batch},)")
    elif noise is None and bool((coefs["coef_noise"] != 0).any()):
        raise ValueError("coef_noise is nonzero but there is no noise: pass noise, or seed and sample_index")


def _sampler_step_torch(x_t, out, alpha_t, sigma_t, coef_x0, coef_xt, coef_noise, *, param, clip, out_uncond,
                        guidance, noise) -> torch.Tensor:
    """The fused update in plain torch ops, in fp32 (fp64 for fp64 inputs)."""
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    x, out = x_t.to(dtype), out.to(dtype)
    alpha_t, sigma_t, coef_x0, coef_xt, coef_noise = (append_dims(c.to(device=x_t.device, dtype=dtype), x_t.ndim)
                                                      for c in (alpha_t, sigma_t, coef_x0, coef_xt, coef_noise))
    # classifier-free guidance (Ho & Salimans 2022): out = u + w (c - u)
    if out_uncond is not None:
        out = torch.lerp(out_uncond.to(dtype), out, guidance)
    x0 = to_x0_eps(out, x, alpha_t, sigma_t, param)[0]
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    x_s = coef_x0 * x0 + coef_xt * x
    if noise is not None:
        x_s = x_s + coef_noise * noise.to(dtype)
    return x_s.to(x_t.dtype)
