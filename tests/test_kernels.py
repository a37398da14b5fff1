"""Triton kernels against their torch references, and the dispatch in fastdiff.ops.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest) at tiny shapes;
with CUDA the same tests run on the GPU at larger shapes and every launch configuration the heuristics pick.
"""
import subprocess
import sys

import pytest
import torch
from scipy import stats

pytest.importorskip("triton", reason="Triton is not installed: the kernels cannot run")

from fastdiff import ops  # noqa: E402
from fastdiff.errors import FastdiffError  # noqa: E402
from fastdiff.kernels import attention as flash  # noqa: E402
from fastdiff.kernels import sampler_step as fused  # noqa: E402

INTERPRET = ops._interpreting()
CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1, which conftest sets only without CUDA")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA device")]),
]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _coefs(batch, device, dtype=torch.float32, seed=0):
    """(B,) alpha_t, sigma_t, coef_x0, coef_xt, coef_noise of a plausible step, alpha in [0.3, 1)."""
    g = torch.Generator().manual_seed(seed)
    alpha = 0.3 + 0.7 * torch.rand(batch, generator=g, dtype=torch.float64)
    c = torch.randn(3, batch, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (alpha, (1 - alpha**2).sqrt(), c[0], c[1], c[2].abs())]


def _inputs(shape, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(4)]


# ---------------------------------------------------------------------------------------------- sampler step


def _check_step(device, param, clip, cfg, dtype, out_dtype=None, shape=(3, 5, 7), block=16):
    x, out, uncond, noise = _inputs(shape, device, dtype)
    out = out.to(out_dtype or dtype)
    kwargs = dict(param=param, clip=clip, out_uncond=uncond if cfg else None, guidance=1.7 if cfg else None,
                  noise=noise)
    coefs = _coefs(shape[0], device)
    got = fused.sampler_step(x, out, *coefs, block=block, **kwargs)
    want = fused.sampler_step_reference(x, out, *coefs, **kwargs)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param", ["eps", "x0", "v"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("cfg", [False, True])
def test_sampler_step_matches_reference(device, param, clip, cfg):
    _check_step(device, param, clip, cfg, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float16, None), (torch.bfloat16, None),
                                             (torch.float32, torch.bfloat16)])
def test_sampler_step_half_precision(device, dtype, out_dtype):
    _check_step(device, "v", True, True, dtype, out_dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_step_large_rows(device):
    """Several programs per sample and a ragged tail; realistic sizes where the GPU makes them cheap."""
    shape = (4, 3, 67, 61) if device == "cuda" else (2, 3, 11, 13)
    _check_step(device, "eps", False, False, torch.float32, shape=shape, block=4096 if device == "cuda" else 64)


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_step_many_small_samples(device):
    """Toy 2-D data: a batch beyond the 65535 limit of a second grid axis (on CUDA), tiny samples."""
    _check_step(device, "x0", True, False, torch.float32, shape=(70_000, 2) if device == "cuda" else (300, 2))
    x = torch.zeros(0, 2, device=device)
    assert fused.sampler_step(x, x, *_coefs(0, device), param="eps").shape == (0, 2)


def _philox_noise(device, index, n, seed=1234, block=4096):
    """(len(index), n) in-kernel noise: x_s = z when every coefficient but coef_noise is 0."""
    b = len(index)
    zeros = torch.zeros(b, n, device=device)
    coefs = [torch.ones(b, device=device), torch.zeros(b, device=device), torch.zeros(b, device=device),
             torch.zeros(b, device=device), torch.ones(b, device=device)]
    return fused.sampler_step(zeros, zeros, *coefs, param="x0", seed=seed,
                              sample_index=torch.tensor(index, device=device), block=block)


@pytest.mark.parametrize("device", DEVICES)
def test_noise_independent_of_block_grid_and_batch(device):
    index = [3, 10, 2**40 + 1]
    z = _philox_noise(device, index, 37, block=4096)
    for block in (8, 16, 64):
        assert torch.equal(_philox_noise(device, index, 37, block=block), z)
    assert torch.equal(_philox_noise(device, [10], 37)[0], z[1])
    assert torch.equal(_philox_noise(device, [10, 3], 37), z[[1, 0]])
    assert not torch.equal(_philox_noise(device, index, 37, seed=1235), z)
    assert (z[0] - z[1]).abs().min() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_noise_is_standard_normal(device):
    z = _philox_noise(device, [0, 1], 2**17).double().cpu()
    flat = z.flatten().numpy()
    assert abs(flat.mean()) < 0.01 and abs(flat.std() - 1) < 0.01
    assert stats.kstest(flat, "norm").pvalue > 1e-3
    # the four normals of one Philox call are independent: neighbours uncorrelated, and samples too
    assert abs(torch.corrcoef(torch.stack([z[0, :-1], z[0, 1:]]))[0, 1]) < 0.01
    assert abs(torch.corrcoef(z)[0, 1]) < 0.01


@pytest.mark.parametrize("device", DEVICES)
def test_noise_skipped_where_coefficient_is_zero(device):
    x, out, _, _ = _inputs((2, 5, 7), device, torch.float32)
    coefs = _coefs(2, device)
    coefs[4] = torch.tensor([0.0, 0.5], device=device)
    got = fused.sampler_step(x, out, *coefs, param="eps", seed=7, sample_index=torch.tensor([0, 1], device=device))
    want = fused.sampler_step_reference(x, out, *coefs, param="eps")
    torch.testing.assert_close(got[0], want[0])
    assert (got[1] - want[1]).abs().max() > 0.1


# ------------------------------------------------------------------------------------------------- attention


def _qkv(shape, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(3)]


def _sdpa_float64(q, k, v, do):
    """(B, H, N, d) -> SDPA's output and gradients in float64 on q's device, the oracle."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64)
    return o, torch.autograd.grad(o, (q64, k64, v64), do.to(q.device, torch.float64))


def _assert_rel_close(got, want, tol):
    err = (got.detach().double() - want).abs().max() / want.abs().max()
    assert err < tol, f"relative max error {err:.2e} > {tol:.0e}"


ATTN_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# the CPU interpreter runs small shapes; the config override exercises several key/query blocks and the tail
CPU_CASES = [(40, torch.float32, flash.Config(16, 16, 4, 1)), (40, torch.float16, flash.Config(32, 16, 4, 1)),
             (40, torch.bfloat16, None), (64, torch.float32, None), (80, torch.float16, None),
             (160, torch.float32, None)]
# every launch config of the head-dim heuristic: 16-bit at each padded d, fp32 at 64, 128, 256 padded
CUDA_CASES = ([(d, dt, None) for d in (40, 64, 80, 128, 160, 256) for dt in (torch.float16, torch.bfloat16)]
              + [(d, torch.float32, None) for d in (40, 80, 160)])


def _attention_cases():
    def param(device, d, dtype, config):
        return pytest.param(device, d, dtype, config, marks=DEVICES[device == "cuda"].marks,
                            id=f"{device}-d{d}-{str(dtype).removeprefix('torch.')}{'-small-blocks' if config else ''}")

    return [param("cpu", *case) for case in CPU_CASES] + [param("cuda", *case) for case in CUDA_CASES]


@pytest.mark.parametrize("device,d,dtype,config", _attention_cases())
def test_attention_forward_backward_match_sdpa(device, d, dtype, config):
    shape = (2, 3, 1000, d) if device == "cuda" else (1, 2, 33, d)
    q, k, v = _qkv(shape, device, dtype)
    o = flash.attention(q, k, v, config, config)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_ref, grads_ref = _sdpa_float64(q, k, v, do)
    assert o.dtype == dtype and o.shape == q.shape
    _assert_rel_close(o, o_ref, ATTN_TOL[dtype])
    _assert_rel_close(flash.attention_reference(q, k, v), o_ref, ATTN_TOL[dtype])
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == dtype
        _assert_rel_close(g, g_ref, 2 * ATTN_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_attention_non_contiguous_inputs(device):
    """q, k, v as views of one fused projection; on CUDA also B * heads past a second grid axis' 65535 limit."""
    qkv = torch.randn(9000 if device == "cuda" else 1, 17, 3, 8, 40, device=device)  # (B, N, 3, H, d)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    o_ref, _ = _sdpa_float64(q, k, v, torch.zeros(q.shape))
    _assert_rel_close(flash.attention(q, k, v), o_ref, ATTN_TOL[torch.float32])


# -------------------------------------------------------------------------------------------------- dispatch


@pytest.fixture
def calls(monkeypatch):
    """Records which Triton launchers fastdiff.ops reaches."""
    seen = []

    def spy(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    spy(fused, "sampler_step")
    spy(flash, "attention")
    return seen


def _ops_step(device, dtype=torch.float32, **kwargs):
    x, out, _, noise = _inputs((2, 3, 5), device, dtype)
    coefs = dict(zip(("alpha_t", "sigma_t", "coef_x0", "coef_xt", "coef_noise"), _coefs(2, device)))
    return ops.sampler_step(x, out, **{"param": "eps", "noise": noise, **coefs, **kwargs})


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_honours_env(device, calls, monkeypatch):
    monkeypatch.setenv("FASTDIFF_DISPATCH", "off")  # auto mode's measured table could pick an SDPA backend on CUDA
    q, k, v = _qkv((1, 2, 9, 40), device, torch.float32)
    monkeypatch.setenv("FASTDIFF_KERNELS", "torch")
    torch_step, torch_attn = _ops_step(device), ops.attention(q, k, v)
    assert calls == []
    monkeypatch.setenv("FASTDIFF_KERNELS", "triton")
    torch.testing.assert_close(_ops_step(device), torch_step)
    torch.testing.assert_close(ops.attention(q, k, v), torch_attn, atol=1e-4, rtol=1e-4)
    assert calls == ["sampler_step", "attention"]
    monkeypatch.setenv("FASTDIFF_KERNELS", "auto")
    _ops_step(device), ops.attention(q, k, v)
    assert calls == ["sampler_step", "attention"] + (["sampler_step", "attention"] if device == "cuda" else [])


def test_dispatch_errors(monkeypatch):
    monkeypatch.setenv("FASTDIFF_KERNELS", "cuda")
    with pytest.raises(FastdiffError, match="choose one of"):
        _ops_step("cpu")
    monkeypatch.setenv("FASTDIFF_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(FastdiffError, match="TRITON_INTERPRET"):
        _ops_step("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="does not support"):
        _ops_step("cpu", dtype=torch.float64)
    with pytest.raises(ValueError, match="does not support"):
        ops.attention(*_qkv((1, 1, 4, 320), "cpu", torch.float32))


def test_auto_falls_back_to_torch_for_float64(calls, monkeypatch):
    """Samplers are tested in float64: the default path keeps it (Triton has no fp64 kernels)."""
    monkeypatch.setenv("FASTDIFF_KERNELS", "auto")
    assert _ops_step("cuda" if CUDA else "cpu", dtype=torch.float64).dtype == torch.float64
    assert calls == []


def test_importing_ops_does_not_import_triton():
    code = ("import sys, torch; by_torch = 'triton' in sys.modules; import fastdiff.ops; "
            "assert by_torch or 'triton' not in sys.modules, 'fastdiff.ops imported triton'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------- ops torch path


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
@pytest.mark.parametrize("clip", [False, True])
def test_ops_torch_path_matches_reference(param, clip, monkeypatch):
    monkeypatch.setenv("FASTDIFF_KERNELS", "torch")
    x, out, uncond, noise = _inputs((3, 4, 5), "cpu", torch.float32)
    coefs = _coefs(3, "cpu")
    got = ops.sampler_step(x, out, param=param, clip=clip, out_uncond=uncond, guidance=3.0, noise=noise,
                           **dict(zip(("alpha_t", "sigma_t", "coef_x0", "coef_xt", "coef_noise"), coefs)))
    want = fused.sampler_step_reference(x, out, *coefs, param=param, clip=clip, out_uncond=uncond, guidance=3.0,
                                        noise=noise)
    torch.testing.assert_close(got, want)


def test_ops_torch_path_float64_ddim_step(monkeypatch):
    """A DDIM(eta=0) step from an exact eps lands exactly on alpha_s x0 + sigma_s eps, in float64."""
    monkeypatch.setenv("FASTDIFF_KERNELS", "torch")
    x0, eps = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    a_t, a_s = torch.tensor([0.6, 0.7], dtype=torch.float64), torch.tensor([0.8, 0.9], dtype=torch.float64)
    s_t, s_s = (1 - a_t**2).sqrt(), (1 - a_s**2).sqrt()
    x_t = a_t[:, None, None] * x0 + s_t[:, None, None] * eps
    # x_s = alpha_s x0_hat + sigma_s eps_hat with eps_hat = (x_t - alpha_t x0_hat) / sigma_t
    got = ops.sampler_step(x_t, eps, param="eps", alpha_t=a_t, sigma_t=s_t, coef_x0=a_s - s_s * a_t / s_t,
                           coef_xt=s_s / s_t, coef_noise=torch.zeros(2, dtype=torch.float64))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, a_s[:, None, None] * x0 + s_s[:, None, None] * eps, atol=1e-12, rtol=0)


def test_ops_torch_path_seeded_noise_is_per_sample(monkeypatch):
    monkeypatch.setenv("FASTDIFF_KERNELS", "torch")
    zeros = torch.zeros(3, 6, dtype=torch.float64)
    one, zero = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)

    def noise(index):
        n = len(index)
        return ops.sampler_step(zeros[:n], zeros[:n], param="x0", alpha_t=one[:n], sigma_t=zero[:n],
                                coef_x0=zero[:n], coef_xt=zero[:n], coef_noise=one[:n], seed=5,
                                sample_index=torch.tensor(index))

    z = noise([4, 9, 2])
    assert z.dtype == torch.float64 and z.std() > 0.3
    torch.testing.assert_close(noise([9]), z[1:2], atol=0, rtol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(param="score"), "unknown parameterization"),
    (dict(coef_x0=torch.ones(3)), "per-sample"),
    (dict(out_uncond=torch.zeros(2, 3, 5)), "both out_uncond and guidance"),
    (dict(noise=None, seed=1), "sample_index"),
    (dict(noise=None, seed=-1, sample_index=torch.arange(2)), "seed must be"),
    (dict(seed=1, sample_index=torch.arange(2)), "not both"),
    (dict(noise=None), "coef_noise is nonzero"),
    (dict(noise=torch.zeros(2, 15)), "noise must be"),
])
def test_sampler_step_validates_inputs(bad, match, monkeypatch):
    monkeypatch.setenv("FASTDIFF_KERNELS", "torch")
    with pytest.raises(ValueError, match=match):
        _ops_step("cpu", **bad)


def test_attention_validates_inputs():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"k, v \(B, heads, M, d\)"):
        ops.attention(q, q, q[..., :2])
    with pytest.raises(ValueError, match=r"k, v \(B, heads, M, d\)"):  # keys and values of other lengths
        ops.attention(q, q, q[:, :, :2])
    with pytest.raises(ValueError, match="one floating dtype"):
        ops.attention(q, q, q.half())
