"""Whole-sampler-loop benchmark on CPU: DDIM (eta = 0) over a tiny U-Net, each update through
fastdiff.ops.sampler_step, so the network's cost and the step's cost are timed together as a user sees them.

`ddim_loop_via_ops` is this benchmark's own stand-in for the DDIM sampler of fastdiff.samplers.
"""
import pytest
import torch

from fastdiff import ops
from fastdiff.models import UNet, UNetConfig
from fastdiff.schedules import Schedule

TINY_UNET = UNetConfig(image_size=16, channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                       head_dim=16, dropout=0.0)


def ddim_loop_via_ops(net, x, ts, schedule):
    """(B, C, H, W) noise at ts[0], decreasing grid ts ending at 0 -> (B, C, H, W) DDIM(eta=0) sample, eps-net."""
    b = x.shape[0]
    alpha, sigma = schedule.alpha_sigma(ts)
    for i in range(len(ts) - 1):
        a_t, s_t, a_s, s_s = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        eps = net(x, ts[i].float().expand(b))
        # DDIM (Song et al. 2021, eq. 12), eta = 0: x_s = alpha_s x0_hat + sigma_s (x_t - alpha_t x0_hat) / sigma_t
        coefs = dict(alpha_t=a_t, sigma_t=s_t, coef_x0=a_s - s_s * a_t / s_t, coef_xt=s_s / s_t,
                     coef_noise=torch.zeros_like(a_t))
        x = ops.sampler_step(x, eps, param="eps", **{k: v.expand(b) for k, v in coefs.items()})
    return x


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_loop_cpu(benchmark, cpu_threads, steps):
    torch.manual_seed(0)
    net = UNet(TINY_UNET).eval()
    x = torch.randn(8, 3, 16, 16)
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    schedule = Schedule("cosine")
    with torch.no_grad():
        sample = benchmark.pedantic(ddim_loop_via_ops, args=(net, x, ts, schedule), rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(steps=steps, nfe=steps, batch=x.shape[0])
    assert sample.shape == x.shape and torch.isfinite(sample).all()
