"""Noise schedules in continuous time t in [0, 1]: alpha_bar(t), alpha, sigma, logsnr.

Conventions (README, "Conventions (the math contract)"): alpha_bar(0) = 1, alpha_t = sqrt(alpha_bar(t)),
sigma_t = sqrt(1 - alpha_bar(t)), logsnr = log(alpha_t^2 / sigma_t^2). Everything is computed in
float64 and returned as float64 tensors; callers cast to their working dtype.

Kinds: fastdiff's own "linear" (Ho et al. 2020) and "cosine" (Nichol & Dhariwal 2021, continuous), and the
discrete beta lists a diffusers scheduler describes ("scaled_linear", "squaredcos_cap_v2", "trained"; "linear"
with other beta_start/beta_end). Every discrete kind is exact on the grid k/T (alpha_bar(k/T) = prod_{j<=k}
(1 - beta_j) in float64, i.e. diffusers' `alphas_cumprod[k-1]`) and linear in log alpha_bar between grid points.

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
# every kind a Schedule can be: fastdiff's own plus the discrete beta lists of diffusers schedulers
KINDS: tuple[str, ...] = SCHEDULES + ("scaled_linear", "squaredcos_cap_v2", "trained")
LOGSNR_MIN = -20.0
COSINE_S = 0.008
BETA_START, BETA_END = 1e-4, 0.02


def _as_f64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


@dataclass(frozen=True)
class Schedule:
    """A noise schedule `kind` (one of KINDS) with T discrete training steps; all methods take t of any shape.

    beta_start/beta_end: the ends of the "linear" and "scaled_linear" beta lists (diffusers' config keys);
    betas: the T betas of kind "trained". FastdiffError for an unknown kind, T < 1, or betas outside (0, 1)
    (beta = 1 makes alpha_bar(1) = 0, a zero-terminal-SNR schedule: refused, see fastdiff.interop).
    """

    kind: str = "linear"
    T: int = 1000
    beta_start: float = BETA_START
    beta_end: float = BETA_END
    betas: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise FastdiffError(f"unknown schedule {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.T < 1:
            raise FastdiffError(f"schedule T must be >= 1, got {self.T}")
        if (self.kind == "trained") != (self.betas is not None):
            raise FastdiffError("a schedule has a betas list exactly when its kind is 'trained'")
        if self.kind != "cosine":
            betas = self.discrete_betas()
            if len(betas) != self.T or not bool(((betas > 0) & (betas < 1)).all()):
                raise FastdiffError(f"schedule {self.kind!r}: need {self.T} betas, each in (0, 1)")

    def discrete_betas(self) -> torch.Tensor:
        """(T,) float64 betas of the discrete chain (diffusers' `betas`, widened to float64); cosine betas capped at
        0.999 (Nichol & Dhariwal 2021), which is also diffusers' "squaredcos_cap_v2"."""
        if self.kind == "linear":
            return torch.from_numpy(np.linspace(self.beta_start, self.beta_end, self.T, dtype=np.float64))
        if self.kind == "scaled_linear":  # Stable Diffusion's: linear in sqrt(beta)
            return torch.from_numpy(np.linspace(self.beta_start**0.5, self.beta_end**0.5, self.T) ** 2)
        if self.kind == "trained":
            return torch.tensor(self.betas, dtype=torch.float64)
        k = torch.arange(self.T + 1, dtype=torch.float64) / self.T
        f = torch.cos((k + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)

    @cached_property
    def _log_alpha_bar_grid(self) -> torch.Tensor:
        """(T+1,) log alpha_bar at t = k/T, k = 0..T, of a discrete kind: cumulative sums of log(1 - beta)."""
        log1m = np.log1p(-self.discrete_betas().numpy())
        return torch.from_numpy(np.concatenate([[0.0], np.cumsum(log1m)]))

    def to_dict(self) -> dict:
        """JSON-ready description (checkpoints, exported folders): kind and T, plus what else defines it."""
        out: dict = {"kind": self.kind, "T": self.T}
        if self.kind in ("linear", "scaled_linear") and (self.beta_start, self.beta_end) != (BETA_START, BETA_END):
            out.update(beta_start=self.beta_start, beta_end=self.beta_end)
        if self.kind == "trained":
            out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Schedule":
        """Inverse of to_dict."""
        extra = {k: data[k] for k in ("beta_start", "beta_end") if k in data}
        return cls(data["kind"], int(data["T"]), **extra,
                   betas=tuple(float(b) for b in data["betas"]) if data.get("betas") is not None else None)

    def alpha_bar(self, t) -> torch.Tensor:
        """alpha_bar(t), float64, same shape as t; see the module docstring for the clip at t = 1."""
        t = _as_f64(t).clamp(0.0, 1.0)
        if self.kind != "cosine":
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
