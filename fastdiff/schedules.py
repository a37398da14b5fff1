"""Noise schedules in continuous time t in [0, 1]: alpha_bar(t), alpha, sigma, logsnr.

Conventions (DESIGN.md "math contract"): alpha_bar(0) = 1, alpha_t = sqrt(alpha_bar(t)),
sigma_t = sqrt(1 - alpha_bar(t)), logsnr = log(alpha_t^2 / sigma_t^2). Everything is computed in
float64 and returned as float64 tensors; callers cast to their working dtype.

Clipping at t = 1: alpha_bar is clipped from below at sigmoid(LOGSNR_MIN) = sigmoid(-20) ~ 2.1e-9, so
logsnr(t) >= -20 everywhere. This only bites for the cosine schedule, whose alpha_bar(1) is exactly 0
(Nichol & Dhariwal cap the discrete betas at 0.999 for the same reason); the linear schedule's
alpha_bar(1) ~ 4e-5 (logsnr ~ -10) is untouched. There is no clip at t = 0: logsnr(0) = +inf, and the
samplers never evaluate the network there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, get_args

import numpy as np
import torch

from fastdiff.errors import FastdiffError

ScheduleName = Literal["linear", "cosine"]  # the choices, once: configs use it
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)
LOGSNR_MIN = -20.0
COSINE_S = 0.008
BETA_START, BETA_END = 1e-4, 0.02


def _as_f64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


@dataclass(frozen=True)
class Schedule:
    """A noise schedule `kind` with T discrete training steps; all methods take t of any shape."""

    kind: str = "linear"
    T: int = 1000

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise FastdiffError(f"unknown schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        if self.T < 1:
            raise FastdiffError(f"schedule T must be >= 1, got {self.T}")

    @cached_property
    def _log_alpha_bar_grid(self) -> torch.Tensor:
        """(T+1,) log alpha_bar at t = k/T, k = 0..T, for the linear schedule (Ho et al. 2020)."""
        betas = np.linspace(BETA_START, BETA_END, self.T, dtype=np.float64)
        return torch.from_numpy(np.concatenate([[0.0], np.cumsum(np.log1p(-betas))]))

    def discrete_betas(self) -> torch.Tensor:
        """(T,) betas of the discrete chain; cosine betas capped at 0.999 (Nichol & Dhariwal 2021)."""
        if self.kind == "linear":
            return torch.linspace(BETA_START, BETA_END, self.T, dtype=torch.float64)
        k = torch.arange(self.T + 1, dtype=torch.float64) / self.T
        f = torch.cos((k + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)

    def alpha_bar(self, t) -> torch.Tensor:
        """alpha_bar(t), float64, same shape as t; see the module docstring for the clip at t = 1."""
        t = _as_f64(t).clamp(0.0, 1.0)
        if self.kind == "linear":
            # Exact cumulative products on the grid k/T, linear in log alpha_bar between grid points.
            grid = self._log_alpha_bar_grid
            u = t * self.T
            k0 = u.floor().clamp(0, self.T - 1)
            frac = u - k0
            k0 = k0.long()
            log_ab = grid[k0] * (1 - frac) + grid[k0 + 1] * frac
            ab = torch.exp(log_ab)
        else:
            f = lambda s: torch.cos((s + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2  # noqa: E731
            ab = f(t) / f(torch.zeros_like(t))
        return ab.clamp(min=1.0 / (1.0 + math.exp(-LOGSNR_MIN)), max=1.0)

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) with alpha^2 + sigma^2 = 1."""
        ab = self.alpha_bar(t)
        return ab.sqrt(), (1 - ab).sqrt()

    def logsnr(self, t) -> torch.Tensor:
        """lambda_t = log(alpha_bar / (1 - alpha_bar)); +inf at t = 0."""
        ab = self.alpha_bar(t)
        return torch.log(ab) - torch.log1p(-ab)

    def t_of_logsnr(self, logsnr, iters: int = 64) -> torch.Tensor:
        """Inverse of `logsnr` by bisection (logsnr is strictly decreasing in t)."""
        target = _as_f64(logsnr)
        lo, hi = torch.zeros_like(target), torch.ones_like(target)
        for _ in range(iters):
            mid = (lo + hi) / 2
            above = self.logsnr(mid) > target
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return (lo + hi) / 2
