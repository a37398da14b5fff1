"""Consistency distillation's maths (Song et al. 2023, "Consistency Models", Alg. 2), adapted to fastdiff's VP time.

The consistency function f_theta(x_t, t) is the student's x0 prediction, with the boundary condition f(x, 0) = x:
- v-prediction: f = alpha x - sigma v, exact at t = 0 (alpha = 1, sigma = 0);
- x0-prediction: f = c_skip(t) x + (1 - c_skip(t)) F with c_skip = sigma_d^2 / (sigma~^2 + sigma_d^2),
  sigma~ = sigma_t/alpha_t (EDM's sigma; Song et al. 2023 sec. 3 with c_out = 1 - c_skip, so that a student
  initialised from an x0 teacher keeps its output where sigma~ >> sigma_d), sigma_d = 0.5;
- eps-prediction is refused: x0 = (x - sigma eps)/alpha divides by alpha ~ 0 at t = 1.

One update (Alg. 2): n ~ U{0..N-1} on the N+1 boundaries t_0 < ... < t_N (the karras grid, rho = 7, whose lowest
point is t = 1/T), x_{t_{n+1}} = alpha x0 + sigma z, ONE teacher ODE step to t_n (DDIM eta = 0, or Heun), and the
distance d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta-(x^_{t_n}, t_n)) with theta- the target network (an EMA of theta,
decay mu). d = pseudo-Huber sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(d_data) (Song & Dhariwal 2023,
"Improved Techniques for Training Consistency Models", sec. 3.3), or the squared L2 (mean over elements).
"""
from __future__ import annotations

from typing import Callable

import torch

from fastdiff.errors import FastdiffError
from fastdiff.grids import karras_grid
from fastdiff.losses import noised
from fastdiff.param import append_dims, c_skip, consistency_fn  # noqa: F401  (re-exported: the CD student)
from fastdiff.schedules import Schedule

HUBER_C = 0.00054  # times sqrt(d_data)


def boundaries(schedule: Schedule, n: int, rho: float = 7.0) -> torch.Tensor:
    """(n+1,) float64 increasing times t_0 < ... < t_n: the karras grid of n steps without its final 0 (t_0 = 1/T,
    t_n its top: t = 1, or where sigma~ = 80)."""
    if n < 1:
        raise FastdiffError(f"consistency distillation needs N >= 1 discretization steps, got {n}")
    return karras_grid(schedule, n + 1, rho)[:-1].flip(0)


def ddim_step(x0_eps_fn: Callable, schedule: Schedule) -> Callable:
    """The teacher's one ODE step x_t -> x_s by DDIM eta = 0 (x_s = alpha_s x0^ + sigma_s eps^), unclipped;
    `x0_eps_fn(x, t)` is the teacher as fastdiff.param.denoiser gives it. t, s: (B,) float64."""
    def step(x, t, s):
        x0, eps = x0_eps_fn(x, t)
        a, sg = (append_dims(v.to(x), x.ndim) for v in schedule.alpha_sigma(s))
        return a * x0 + sg * eps

    return step


def heun_step(x0_eps_fn: Callable, schedule: Schedule) -> Callable:
    """The teacher's one ODE step by Heun (Karras et al. 2022 Alg. 1) in x~ = x/alpha, sigma~ = sigma/alpha: two
    teacher evaluations; the EDM variant Song et al. 2023 use for CD."""
    def step(x, t, s):
        a_t, s_t = (append_dims(v.to(x), x.ndim) for v in schedule.alpha_sigma(t))
        a_s, s_s = (append_dims(v.to(x), x.ndim) for v in schedule.alpha_sigma(s))
        x0, eps = x0_eps_fn(x, t)
        euler = a_s * x0 + s_s * eps  # DDIM eta=0 is the Euler step in (x~, sigma~)
        _, eps2 = x0_eps_fn(euler, s)
        # trapezoid in x~: x~_s = x~_t + (sigma~_s - sigma~_t) (eps + eps2)/2
        return a_s * (x / a_t + (s_s / a_s - s_t / a_t) * (eps + eps2) / 2)

    return step


def distance(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """(B,) pseudo-Huber sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(d) (d elements per example), or the squared
    L2 distance as a mean over elements ("l2")."""
    diff = (a - b).flatten(1)
    if metric == "l2":
        return diff.pow(2).mean(1)
    if metric == "pseudo-huber":
        c = HUBER_C * diff.shape[1] ** 0.5
        return (diff.pow(2).sum(1) + c**2).sqrt() - c
    raise FastdiffError(f"unknown consistency distance {metric!r}; choose pseudo-huber or l2")


def cd_loss(student_f: Callable, target_f: Callable, teacher_step: Callable, x0: torch.Tensor, schedule: Schedule,
            ts: torch.Tensor, gen: torch.Generator, metric: str = "pseudo-huber") -> torch.Tensor:
    """(B,) d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta-(x^_{t_n}, t_n)) with n ~ U{0..N-1} per example (Alg. 2).

    ts: (N+1,) increasing boundaries (`boundaries`); x_{t_{n+1}} = alpha x0 + sigma z from `gen`; x^_{t_n} is one
    `teacher_step(x, t_{n+1}, t_n)`; the target side runs without gradients."""
    n = torch.randint(0, len(ts) - 1, (x0.shape[0],), generator=gen)
    t_hi, t_lo = ts[n + 1], ts[n]
    x_hi, *_ = noised(x0, t_hi, schedule, gen)
    with torch.no_grad():
        x_lo = teacher_step(x_hi, t_hi, t_lo)
        target = target_f(x_lo, t_lo)
    return distance(student_f(x_hi, t_hi), target, metric)
