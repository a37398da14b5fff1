"""Time grids for the samplers: (steps+1,) float64, strictly decreasing from t = 1.0 to t = 0.0.

A grid carries the step count, so samplers never hold state (k-diffusion takes sigmas the same way).
Discrete grids live on the integer indices k in {1..T} of a T-step schedule (t = k/T); the others are
placed in logsnr and mapped back with `Schedule.t_of_logsnr`. Every grid ends with the exact point t = 0.
"""
from __future__ import annotations

import re
from typing import Literal, get_args

import numpy as np
import torch

from fastdiff.errors import FastdiffError
from fastdiff.schedules import Schedule

Spacing = Literal["linspace", "leading", "trailing", "quadratic"]  # the choices, once: configs use it
SPACINGS: tuple[str, ...] = get_args(Spacing)
GRIDS = ("full", "student", "logsnr", "karras") + SPACINGS


def _from_t(t_positive) -> torch.Tensor:
    """(steps,) decreasing positive times -> (steps+1,) grid with the final 0 appended."""
    t = torch.as_tensor(t_positive, dtype=torch.float64)
    return torch.cat([t, t.new_zeros(1)])


def full_grid(T: int) -> torch.Tensor:
    """(T+1,) t = k/T for k = T..0: the teacher's own chain."""
    return torch.arange(T, -1, -1, dtype=torch.float64) / T


def student_grid(N: int) -> torch.Tensor:
    """(N+1,) t = i/N for i = N..0: a distilled student's grid (Salimans & Ho 2022)."""
    return full_grid(N)


def _repair(k: np.ndarray, T: int) -> np.ndarray:
    """(steps,) integer indices -> strictly increasing indices in [1, T] with the top one at T.

    Ascending pass k_i <- max(k_i, k_{i-1} + 1, 1), then k_top <- T and the descending pass
    k_i <- min(k_i, k_{i+1} - 1); both are cumulative max/min of k_i - i, so this is vectorized.
    """
    i = np.arange(len(k))
    k = np.maximum(np.maximum.accumulate(k - i), 1) + i
    k[-1] = T
    return np.minimum.accumulate((k - i)[::-1])[::-1] + i


def strided_grid(T: int, steps: int, spacing: str = "linspace") -> torch.Tensor:
    """(steps+1,) a sub-grid t = k/T of the T-step chain (improved-diffusion respacing), from k = T down to 0.

    With j = 0..steps-1 the raw indices are
      linspace:  round(linspace(1, T, steps))
      leading:   k = T - c j, integer stride c = T // steps from the top. diffusers' "leading" uses the same
                 stride from the bottom (k = 1 + c j), so it stops at T - c + 1 < T whenever steps does not
                 divide T; this one always starts at T.
      trailing:  round(T - j T / steps), fractional stride from the top: diffusers' "trailing" (their 0-based
                 timestep is k - 1).
      quadratic: round(T (j'/steps)^2), j' = 1..steps: DDIM's CIFAR spacing without its 0.8 factor, which stops
                 DDIM at 0.8 T; this one reaches T.
    then a repair pass (`_repair`) makes them distinct, in [1, T], with the top at T, so every steps in 1..T works.
    """
    if spacing not in SPACINGS:
        raise FastdiffError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if not 1 <= steps <= T:
        raise FastdiffError(f"a strided grid of a {T}-step schedule needs 1 <= steps <= {T}, got {steps}")
    j = np.arange(steps, dtype=np.float64)
    if spacing == "linspace":
        k = np.linspace(1, T, steps)
    elif spacing == "leading":
        k = T - (T // steps) * j[::-1]
    elif spacing == "trailing":
        k = T - j[::-1] * T / steps
    else:
        k = T * ((j + 1) / steps) ** 2
    k = _repair(np.round(k).astype(np.int64), T)
    return _from_t(k[::-1] / T)


def _endpoints(schedule: Schedule) -> tuple[float, float]:
    """logsnr at t = 1 and at the smallest positive discrete time t = 1/T, the range of the continuous grids."""
    return float(schedule.logsnr(1.0)), float(schedule.logsnr(1.0 / schedule.T))


def _from_logsnr(schedule: Schedule, logsnr: torch.Tensor, from_t1: bool = True) -> torch.Tensor:
    """(steps,) increasing logsnr from logsnr(1) (or from later, `from_t1` False) to logsnr(1/T) -> (steps+1,) grid
    with exact endpoints (bisection would miss t = 1 where the cosine schedule's logsnr is clipped flat)."""
    t = schedule.t_of_logsnr(logsnr)
    if from_t1:
        t[0] = 1.0
    if len(t) > 1:
        t[-1] = 1.0 / schedule.T
    return _from_t(t)


def logsnr_grid(schedule: Schedule, steps: int) -> torch.Tensor:
    """(steps+1,) uniform in logsnr from logsnr(1) to logsnr(1/T) (the smallest positive discrete t), then 0."""
    lo, hi = _endpoints(schedule)
    return _from_logsnr(schedule, torch.linspace(lo, hi, steps, dtype=torch.float64))


def karras_grid(schedule: Schedule, steps: int, rho: float = 7.0, sigma_max: float = 80.0) -> torch.Tensor:
    """(steps+1,) Karras et al. 2022 eq. 5 in sigma = exp(-logsnr/2) = sigma_t/alpha_t, down to t = 1/T, then 0.

    It starts at sigma = min(`sigma_max`, the schedule's sigma at t = 1), i.e. at t < 1 when clamped, as EDM does
    (sigma_max = 80 for every model there): the cosine schedule's sigma(1) = e^10 ~ 2.2e4 (linear: ~157) put a
    trapezoid step across four decades of sigma and Heun blew up below ~15 NFE. Unit-variance noise is already the
    marginal there: x_t = alpha x0 + sigma eps with alpha = 1/sqrt(1 + 80^2) ~ 0.0125 (t ~ 0.992 cosine, 0.931 linear).
    """
    lo, hi = _endpoints(schedule)
    top, sigma_min = min(np.exp(-lo / 2), sigma_max), np.exp(-hi / 2)
    # eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigma = (top ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - top ** (1 / rho))) ** rho
    return _from_logsnr(schedule, -2 * sigma.log(), from_t1=top == np.exp(-lo / 2))


def consistency_boundaries(schedule: Schedule, n: int, rho: float = 7.0) -> torch.Tensor:
    """(n+1,) float64 increasing times t_0 < ... < t_n of consistency distillation's discretization: the karras
    grid of n steps without its final 0 (t_0 = 1/T, t_n its top: t = 1, or where sigma~ = 80)."""
    if n < 1:
        raise FastdiffError(f"consistency distillation needs N >= 1 discretization steps, got {n}")
    return karras_grid(schedule, n + 1, rho)[:-1].flip(0)


def consistency_grid(schedule: Schedule, n: int, steps: int) -> torch.Tensor:
    """(steps+1,) the times of `steps`-step consistency sampling for a student distilled on the karras
    discretization with n steps (n + 1 boundaries t_0 = 1/T < ... < t_n, the karras grid without its 0): the
    boundaries at indices round(j n / steps), j = steps..1 (one step starts at t_n, the top the student was trained
    at), then 0. A fixed rule chosen before any result (Song et al. 2023 search the times; not done here)."""
    if not 1 <= steps <= n:
        raise FastdiffError(f"consistency sampling of a student trained on {n} steps needs 1 <= steps <= {n}, got "
                            f"{steps}")
    bounds = consistency_boundaries(schedule, n)
    idx = [round(j * n / steps) for j in range(steps, 0, -1)]
    return torch.cat([bounds[idx], bounds.new_zeros(1)])


def student_subgrid(n: int, steps: int) -> torch.Tensor:
    """(steps+1,) `steps` <= n of the times of an n-step student's grid t = i/n: i = round(j n / steps) for
    j = steps..1, then 0 (one step: t = 1; steps = n: the whole grid). The times a student trained on every point of
    its n-step grid can be sampled at with fewer steps (a multistep generator that re-noises between steps)."""
    if not 1 <= steps <= n:
        raise FastdiffError(f"a student trained on {n} steps samples with 1 <= steps <= {n}, got {steps}")
    return torch.tensor([round(j * n / steps) / n for j in range(steps, 0, -1)] + [0.0], dtype=torch.float64)


def make_grid(kind: str, steps: int, schedule: Schedule) -> torch.Tensor:
    """(steps+1,) the grid named `kind` (one of GRIDS, "cd{n}" or "student{n}") with `steps` steps for `schedule`.

    "full" is k/T and needs steps == schedule.T; "student" is i/steps (any steps >= 1); the spacings are
    strided sub-grids of schedule.T; "logsnr" and "karras" are continuous in t; "cd{n}" (e.g. cd18) is
    `consistency_grid` of a consistency student trained on n karras steps; "student{n}" is `student_subgrid`: steps
    <= n of the n-step student grid.
    """
    cd = re.fullmatch(r"cd([0-9]+)", kind)
    if cd:
        return consistency_grid(schedule, int(cd.group(1)), steps)
    sub = re.fullmatch(r"student([0-9]+)", kind)
    if sub:
        return student_subgrid(int(sub.group(1)), steps)
    if kind not in GRIDS:
        raise FastdiffError(f"unknown grid {kind!r}; choose one of {', '.join(GRIDS)}")
    if steps < 1:
        raise FastdiffError(f"a grid needs steps >= 1, got {steps}")
    if kind == "full":
        if steps != schedule.T:
            raise FastdiffError(f"the full grid of a {schedule.T}-step schedule has {schedule.T} steps, not {steps}")
        return full_grid(schedule.T)
    if kind == "student":
        return student_grid(steps)
    if kind == "logsnr":
        return logsnr_grid(schedule, steps)
    if kind == "karras":
        return karras_grid(schedule, steps)
    return strided_grid(schedule.T, steps, kind)
