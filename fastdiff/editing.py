"""Editing with a trained model: DDIM inversion, img2img (SDEdit) and inpainting, all over explicit grids.

Same conventions as `fastdiff.samplers` (model(x, t) -> out in `param`, clip, guidance, per-sample generators,
Sample(x, nfe, trajectory)); img2img and inpaint run any one-step-at-a-time sampler from there (ddim, ddpm, heun)
and forward-noise the data with the per-sample generators, so sample k is edited the same in any batch.
"""
from __future__ import annotations

from typing import Callable

import torch

from fastdiff.errors import FastdiffError
from fastdiff.samplers import Generators, Sample, check_grid, affine_steps, randn, ddim
from fastdiff.schedules import Schedule


def ddim_invert(model, x0, ts, *, schedule: Schedule, param: str, clip: bool = False, return_trajectory: bool = False,
                guidance: float | None = None) -> Sample:
    """(B, ...) data -> Sample whose x is the latent at ts[0]: deterministic DDIM (eta=0) run from t=0 up the grid.

    Step s -> t (s < t, consecutive on the grid) evaluates the network at (x_s, t), so it uses the same times as
    decoding with `ddim` on `ts` and never t = 0, and keeps the noise estimate eps_hat (the usual inversion
    approximation eps(x_t) ~ eps(x_s)): x_t = alpha_t (x_s - sigma_s eps_hat)/alpha_s + sigma_t eps_hat.
    Decoding the result with `ddim` on the same grid reproduces x0 up to O(step size). NFE = steps.
    """
    check_grid(ts)
    up = ts.flip(0)
    alpha, sigma = schedule.alpha_sigma(up)
    alpha_s, sigma_s, alpha_t, sigma_t = alpha[:-1], sigma[:-1], alpha[1:], sigma[1:]
    # with eps_hat = (x_s - alpha_t x0_hat)/sigma_t from the network at (x_s, t):
    # x_t = (alpha_t/alpha_s + k/sigma_t) x_s - (k alpha_t/sigma_t) x0_hat, k = sigma_t - alpha_t sigma_s/alpha_s
    k = sigma_t - alpha_t * sigma_s / alpha_s
    coefs = torch.stack([-k * alpha_t / sigma_t, alpha_t / alpha_s + k / sigma_t, torch.zeros_like(k)], 1)
    return affine_steps(model, x0, up[1:], alpha_t, sigma_t, coefs, param=param, clip=clip, generator=None,
                         return_trajectory=return_trajectory, guidance=guidance)


def _noised(x0: torch.Tensor, t: float, schedule: Schedule, generator: Generators) -> torch.Tensor:
    """(B, ...) x0 -> (B, ...) x_t = alpha_t x0 + sigma_t eps, eps from the (per-sample) generators."""
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(t))
    return alpha * x0 + sigma * randn(x0, generator)


def img2img(model, x0, ts, strength: float, *, schedule: Schedule, param: str, sampler: Callable[..., Sample] = ddim,
            clip: bool = False, generator: Generators = None, return_trajectory: bool = False,
            guidance: float | None = None, **sampler_kwargs) -> Sample:
    """(B, ...) data -> Sample: SDEdit (Meng et al. 2022) at `strength` in (0, 1].

    The grid is cut to its points t <= strength, x0 is noised forward to the first of them with the generators,
    and `sampler` (ddim by default; ddpm, heun, ...; extra keywords such as eta or variance go to it) runs the
    rest. strength 1 is plain sampling; a strength below the grid's smallest positive t returns x0 (0 NFE).
    """
    if not 0.0 < strength <= 1.0:
        raise FastdiffError(f"img2img strength must be in (0, 1], got {strength}")
    check_grid(ts)
    ts = ts[ts <= strength]
    if len(ts) < 2:
        return Sample(x0, 0, [x0] if return_trajectory else None)
    x = _noised(x0, float(ts[0]), schedule, generator)
    return sampler(model, x, ts, schedule=schedule, param=param, clip=clip, generator=generator,
                   return_trajectory=return_trajectory, guidance=guidance, **sampler_kwargs)


def _paste(x, known, mask):
    """mask known + (1 - mask) x: exactly `known` where mask is 1."""
    return mask * known + (1 - mask) * x


def inpaint(model, x0, mask, ts, *, schedule: Schedule, param: str, sampler: Callable[..., Sample] = ddim,
            clip: bool = False, generator: Generators = None, return_trajectory: bool = False,
            guidance: float | None = None, **sampler_kwargs) -> Sample:
    """(B, ...) data and mask (1 = known; broadcasts to x0's shape) -> Sample with the unknown region filled in.

    Starts from noise at ts[0]; after each step of `sampler` (one step at a time, ddim by default) the known
    region is replaced by x0 noised forward to the new time with fresh per-sample noise (the replacement method,
    Song et al. 2021 / RePaint without resampling), so at t = 0 it is x0 exactly.
    """
    check_grid(ts)
    mask = torch.as_tensor(mask, dtype=x0.dtype, device=x0.device).expand_as(x0)
    x = _paste(randn(x0, generator), _noised(x0, float(ts[0]), schedule, generator), mask)
    trajectory = [x] if return_trajectory else None
    nfe = 0
    for i in range(len(ts) - 1):
        step = sampler(model, x, ts[i:i + 2], schedule=schedule, param=param, clip=clip, generator=generator,
                       guidance=guidance, **sampler_kwargs)
        nfe += step.nfe
        x = _paste(step.x, _noised(x0, float(ts[i + 1]), schedule, generator), mask)
        if trajectory is not None:
            trajectory.append(x)
    return Sample(x, nfe, trajectory)
