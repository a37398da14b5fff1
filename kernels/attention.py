"""Flash attention (Dao 2023, FlashAttention-2) forward and backward for the U-Net's self-attention.

q, k, v, o are (B, heads, N, d), softmax scale 1/sqrt(d), no mask. Any N (the last key/query block is
masked), any d <= 256 (d is padded to the next power of two inside the kernel with masked loads, so 40,
80 and 160 work), fp16/bf16/fp32 in and out with fp32 accumulation and an fp32 online softmax. The scores
are scaled by log2(e)/sqrt(d) so the softmax runs on exp2, and the forward saves the per-row log2-sum-exp
that the backward uses to rebuild the probabilities without storing them.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


class Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Hand-picked per padded head dim and element size (autotuning is not available in the interpreter): FA2's
# 128-query blocks where registers allow, smaller ones as d grows or for fp32 (which runs on FMA, not MMA).
_FWD_CONFIGS = {
    (2, 64): Config(128, 64, 4, 3), (2, 128): Config(128, 64, 8, 3), (2, 256): Config(64, 64, 8, 2),
    (4, 64): Config(64, 32, 4, 2), (4, 128): Config(32, 32, 4, 2), (4, 256): Config(32, 16, 4, 1),
}
_BWD_CONFIGS = {
    (2, 64): Config(64, 64, 4, 2), (2, 128): Config(64, 64, 8, 2), (2, 256): Config(32, 32, 8, 1),
    (4, 64): Config(32, 32, 4, 2), (4, 128): Config(32, 32, 4, 1), (4, 256): Config(16, 16, 4, 1),
}


def pick_config(head_dim, dtype, backward=False):
    """Launch configuration for a head dim and dtype (head dims below 64 share the 64 entry)."""
    key = (torch.empty((), dtype=dtype).element_size(), max(64, triton.next_power_of_2(head_dim)))
    return (_BWD_CONFIGS if backward else _FWD_CONFIGS)[key]


@triton.jit
def _load_rows(ptr, rows, offs_d, N, D: tl.constexpr, D_PAD: tl.constexpr, EVEN: tl.constexpr):
    """(R,) row indices -> (R, D_PAD) tile of a (N, D) row-major matrix, zero outside; unmasked when it can be."""
    ptrs = ptr + rows[:, None] * D + offs_d[None, :]
    if EVEN and D == D_PAD:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=(rows[:, None] < N) & (offs_d[None, :] < D), other=0.0)
    return tile


@triton.jit
def _tile_of_program(N, BLOCK: tl.constexpr):
    """-> (batch-head, first row) of this program in a 1-D grid of cdiv(N, BLOCK) row blocks per batch-head.

    Row blocks vary fastest, so programs running together share one head's K and V in L2, and the grid
    has no 65535 limit on B * heads (as a second grid axis would).
    """
    blocks = tl.cdiv(N, BLOCK)
    return tl.program_id(0) // blocks, (tl.program_id(0) % blocks) * BLOCK


@triton.jit
def _store_rows(ptr, rows, offs_d, tile, N, D: tl.constexpr):
    """Writes the valid part of an (R, D_PAD) tile to rows `rows` of a (N, D) row-major matrix."""
    tl.store(ptr + rows[:, None] * D + offs_d[None, :], tile.to(ptr.dtype.element_ty),
             mask=(rows[:, None] < N) & (offs_d[None, :] < D))


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,  # (BH, N, D) contiguous; LSE (BH, N) fp32
    N, qk_scale,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, PRECISION: tl.constexpr,
):
    # a program computes BLOCK_M query rows of one (batch, head)
    bh, start_m = _tile_of_program(N, BLOCK_M)
    base = bh.to(tl.int64) * N * D
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    q = _load_rows(Q + base, offs_m, offs_d, N, D, D_PAD, EVEN_M)
    # online softmax state (Milakov & Gimelshein 2018) in the log2 domain
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_kv = start_n + offs_n
        k = _load_rows(K + base, offs_kv, offs_d, N, D, D_PAD, EVEN_N)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if not EVEN_N:
            qk = tl.where(offs_kv[None, :] < N, qk, float("-inf"))
        # rescale the running sum and accumulator to the new row max, then add this block's p @ v
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        rescale = tl.math.exp2(m_i - m_new)
        l_i = l_i * rescale + tl.sum(p, 1)
        v = _load_rows(V + base, offs_kv, offs_d, N, D, D_PAD, EVEN_N)
        acc = tl.dot(p.to(v.dtype), v, acc * rescale[:, None], input_precision=PRECISION)
        m_i = m_new
    # epilogue: normalise, and keep log2-sum-exp2 of the scaled scores for the backward
    acc = acc / l_i[:, None]
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < N)
    _store_rows(O + base, offs_m, offs_d, acc, N, D)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,  # (BH, N, D) contiguous; LSE, DELTA (BH, N) fp32
    N, qk_scale, sm_scale,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, PRECISION: tl.constexpr,
):
    # a program owns BLOCK_N key rows of one (batch, head) and sweeps all query blocks
    bh, start_n = _tile_of_program(N, BLOCK_N)
    base = bh.to(tl.int64) * N * D
    row_base = bh.to(tl.int64) * N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    k = _load_rows(K + base, offs_n, offs_d, N, D, D_PAD, EVEN_N)
    v = _load_rows(V + base, offs_n, offs_d, N, D, D_PAD, EVEN_N)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        q = _load_rows(Q + base, rows, offs_d, N, D, D_PAD, EVEN_M)
        do = _load_rows(DO + base, rows, offs_d, N, D, D_PAD, EVEN_M)
        # P^T rebuilt from the saved log-sum-exp; padded query rows get lse = +inf, hence p = 0
        lse = tl.load(LSE + row_base + rows, mask=rows < N, other=float("inf"))
        delta = tl.load(DELTA + row_base + rows, mask=rows < N, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        # dV = P^T dO;  dS = P * (dO V^T - delta);  dK = scale dS^T Q
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        ds_t = p_t * (tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    _store_rows(DK + base, offs_n, offs_d, dk * sm_scale, N, D)
    _store_rows(DV + base, offs_n, offs_d, dv, N, D)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,  # (BH, N, D) contiguous; LSE, DELTA (BH, N) fp32
    N, qk_scale, sm_scale,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, PRECISION: tl.constexpr,
):
    # a program owns BLOCK_M query rows of one (batch, head) and sweeps all key blocks
    bh, start_m = _tile_of_program(N, BLOCK_M)
    base = bh.to(tl.int64) * N * D
    row_base = bh.to(tl.int64) * N
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    q = _load_rows(Q + base, offs_m, offs_d, N, D, D_PAD, EVEN_M)
    do = _load_rows(DO + base, offs_m, offs_d, N, D, D_PAD, EVEN_M)
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < N, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < N, other=0.0)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_kv = start_n + offs_n
        k = _load_rows(K + base, offs_kv, offs_d, N, D, D_PAD, EVEN_N)
        v = _load_rows(V + base, offs_kv, offs_d, N, D, D_PAD, EVEN_N)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if not EVEN_N:
            p = tl.where(offs_kv[None, :] < N, p, 0.0)
        # dS = P * (dO V^T - delta);  dQ = scale dS K
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    _store_rows(DQ + base, offs_m, offs_d, dq * sm_scale, N, D)


# The interpreter has no bf16 arithmetic: there the launchers run bf16 inputs in fp32.
_INTERPRETED = not isinstance(_attn_fwd_kernel, triton.runtime.JITFunction)


def _common(q, config, backward):
    """(B, H, N, d) -> the kernels' shared launch arguments."""
    b, h, n, d = q.shape
    cfg = config or pick_config(d, q.dtype, backward)
    meta = dict(D=d, D_PAD=max(16, triton.next_power_of_2(d)), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                EVEN_M=n % cfg.block_m == 0, EVEN_N=n % cfg.block_n == 0,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return b * h, n, cfg, meta


def attention_forward(q, k, v, config=None):
    """(B, H, N, d) q, k, v -> (B, H, N, d) softmax(q k^T / sqrt(d)) v and (B, H, N) fp32 log2-sum-exp2."""
    bh, n, cfg, meta = _common(q, config, backward=False)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
    sm_scale = q.shape[-1] ** -0.5
    _attn_fwd_kernel[(triton.cdiv(n, cfg.block_m) * bh,)](
        q, k, v, o, lse, n, sm_scale * LOG2E, **meta)
    return o, lse


def attention_backward(do, q, k, v, o, lse, config=None):
    """(B, H, N, d) dO, q, k, v, o and (B, H, N) lse -> (dq, dk, dv), each (B, H, N, d)."""
    bh, n, cfg, meta = _common(q, config, backward=True)
    do = do.contiguous()
    # delta_i = sum_j P_ij dP_ij = rowsum(dO * O) (FlashAttention-2, Alg. 2)
    delta = (do.float() * o.float()).sum(-1)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    sm_scale = q.shape[-1] ** -0.5
    scales = (n, sm_scale * LOG2E, sm_scale)
    _attn_bwd_dkdv_kernel[(triton.cdiv(n, cfg.block_n) * bh,)](q, k, v, do, lse, delta, dk, dv, *scales, **meta)
    _attn_bwd_dq_kernel[(triton.cdiv(n, cfg.block_m) * bh,)](q, k, v, do, lse, delta, dq, *scales, **meta)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, fwd_config, bwd_config):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = attention_forward(q, k, v, fwd_config)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.bwd_config = bwd_config
        return o

    @staticmethod
    def backward(ctx, do):
        return (*attention_backward(do, *ctx.saved_tensors, ctx.bwd_config), None, None)


def attention(q, k, v, fwd_config=None, bwd_config=None):
    """(B, H, N, d) q, k, v -> (B, H, N, d) attention output, differentiable; configs default to pick_config."""
    if _INTERPRETED and q.dtype == torch.bfloat16:
        return _FlashAttention.apply(q.float(), k.float(), v.float(), fwd_config, bwd_config).to(q.dtype)
    return _FlashAttention.apply(q, k, v, fwd_config, bwd_config)


def attention_reference(q, k, v):
    """(B, H, N, d) q, k, v -> (B, H, N, d) softmax(q k^T / sqrt(d)) v in plain torch, in fp32 (fp64 stays fp64)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * q.shape[-1] ** -0.5
    return (scores.softmax(-1) @ v.to(dtype)).to(q.dtype)
