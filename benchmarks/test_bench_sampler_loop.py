"""Whole-sampler-loop benchmark on CPU: each sampler of fastdiff.samplers over a tiny U-Net at equal NFE, so the
network's cost and the sampler's own cost are timed together as a user sees them."""
import pytest
import torch

from fastdiff import samplers
from fastdiff.models import UNet, UNetConfig
from fastdiff.schedules import Schedule

TINY_UNET = UNetConfig(image_size=16, channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                       head_dim=16, dropout=0.0)
# sampler -> (function, grid, keyword arguments); heun runs (nfe + 1) // 2 steps so its NFE matches
LOOPS = {"ddim": (samplers.ddim, "linspace", {}), "ddpm": (samplers.ddpm, "linspace", {}),
         "dpm++2m": (samplers.dpm_solver_pp_2m, "logsnr", {}), "heun": (samplers.heun, "karras", {})}


@pytest.mark.parametrize("nfe", [10, 50])
@pytest.mark.parametrize("name", list(LOOPS))
def test_sampler_loop_cpu(benchmark, cpu_threads, name, nfe):
    torch.manual_seed(0)
    net = UNet(TINY_UNET).eval()
    x = torch.randn(8, 3, 16, 16)
    schedule = Schedule("cosine")
    fn, grid, kw = LOOPS[name]
    steps = (nfe + 1) // 2 if name == "heun" else nfe
    ts = samplers.make_grid(grid, steps, schedule)
    gens = lambda: samplers.SampleNoise(0, range(x.shape[0]), "cpu")  # noqa: E731  (per-sample Philox noise)
    with torch.no_grad():
        sample = benchmark.pedantic(lambda: fn(net, x, ts, schedule=schedule, param="v", generator=gens(), **kw),
                                    rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(sampler=name, grid=grid, steps=steps, nfe=sample.nfe, batch=x.shape[0])
    assert sample.x.shape == x.shape and torch.isfinite(sample.x).all()
