"""Training losses in one place: the seed's L_simple and the x-space losses with SNR weights.

- ``eps-mse``: L_simple = ||eps - eps_hat||^2 (Ho et al. 2020, eq. 14), uniform t.
- ``snr-trunc``: max(SNR, 1)·||x - x_hat||^2 ("truncated SNR", Salimans & Ho 2022 §4).
- ``snr+1``: (SNR + 1)·||x - x_hat||^2 (equals the v-MSE, Salimans & Ho 2022 §4).
All are means over the example's elements, returned per example so callers can reduce as they like.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch

from fastdiff.param import append_dims, to_x0_eps
from fastdiff.schedules import Schedule

Weighting = Literal["eps-mse", "snr-trunc", "snr+1"]  # the choices, once: configs use it
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
T_MIN = 1e-3  # training times t ~ U[T_MIN, 1]: never t = 0, where sigma = 0


def snr_weight(logsnr: torch.Tensor, weighting: str) -> torch.Tensor:
    """(B,) weight on ||x - x_hat||^2 for the x-space losses."""
    snr = torch.exp(logsnr)
    if weighting == "snr-trunc":
        return snr.clamp(min=1.0)
    if weighting == "snr+1":
        return snr + 1.0
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")


def x_space_loss(x_hat, target, logsnr, weighting: str) -> torch.Tensor:
    """(B,) w(lambda)·||target - x_hat||^2, mean over each example's elements (w from `snr_weight`)."""
    return snr_weight(logsnr, weighting) * (target - x_hat).pow(2).mean(tuple(range(1, target.ndim)))


def sample_t(b: int, generator: torch.Generator, n_grid: int | None = None, t_min: float = T_MIN) -> torch.Tensor:
    """(B,) float64 training times: t ~ U[t_min, 1], or on the grid i/N with i ~ U{1..N} when `n_grid` = N."""
    if n_grid is None:
        return t_min + (1 - t_min) * torch.rand(b, generator=generator, dtype=torch.float64)
    return torch.randint(1, n_grid + 1, (b,), generator=generator).double() / n_grid


def noised(x0, t, schedule: Schedule, generator: torch.Generator):
    """-> (x_t, eps, alpha, sigma): x_t = alpha_t x0 + sigma_t eps, eps ~ N(0, I) from `generator`; alpha and sigma
    (B,) in x0's dtype. The forward process of every loss here (teacher and distillation)."""
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    alpha, sigma = (a.to(x0) for a in schedule.alpha_sigma(t))
    return append_dims(alpha, x0.ndim) * x0 + append_dims(sigma, x0.ndim) * eps, eps, alpha, sigma


def weighted_loss(out, x0, eps, x_t, alpha, sigma, logsnr, param: str, weighting: str) -> torch.Tensor:
    """(B,) loss of network output `out` (in `param`) against the clean x0 and noise eps."""
    if weighting == "eps-mse":
        _, eps_hat = to_x0_eps(out, x_t, alpha, sigma, param)
        return (eps - eps_hat).pow(2).mean(tuple(range(1, x0.ndim)))
    x0_hat, _ = to_x0_eps(out, x_t, alpha, sigma, param)
    return x_space_loss(x0_hat, x0, logsnr, weighting)


def diffusion_loss(net, x0, schedule: Schedule, param: str, weighting: str, generator: torch.Generator,
                   t_min: float = T_MIN, y=None) -> torch.Tensor:
    """(B,) denoising loss at t ~ U[t_min, 1] with x_t = alpha x0 + sigma eps (noise from `generator`)."""
    t = sample_t(x0.shape[0], generator, t_min=t_min)
    x_t, eps, alpha, sigma = noised(x0, t, schedule, generator)
    out = net(x_t, t.to(x0), y) if y is not None else net(x_t, t.to(x0))
    return weighted_loss(out.float(), x0, eps, x_t, alpha, sigma, schedule.logsnr(t).to(x0), param, weighting)
