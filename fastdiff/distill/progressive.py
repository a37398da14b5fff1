"""Progressive distillation's target and loss (Salimans & Ho 2022, Algorithm 2): the x a student must predict so
that one of its DDIM steps lands where two of the teacher's do, and the SNR-weighted x-space loss against it."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastdiff.param import append_dims, denoiser, to_x0_eps
from fastdiff.checkpoint import LoadedModel
from fastdiff.losses import noised, sample_t, x_space_loss
from fastdiff.schedules import Schedule

if TYPE_CHECKING:
    from fastdiff.distill.config import DistillConfig


def distill_target(z_t, t, x0_fn, schedule: Schedule, n_student: int, clip: bool = False) -> torch.Tensor:
    """(B, ...) x_tilde: the x the student must predict at z_t so that one DDIM step hits two teacher steps.

    Salimans & Ho 2022, Algorithm 2: t' = t - 0.5/N, t'' = t - 1/N; z_t -> z_t' -> z_t'' by DDIM (eta=0,
    no clipping) with the teacher;
    x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t).
    `x0_fn(z, t)` returns the teacher's (x0_hat, eps_hat); t is (B,) float64.

    clip: clamp the teacher's x0_hat to [-1, 1] and re-derive eps_hat from it, as its clipped DDIM sampler does.
    For an eps-prediction teacher on pixel data: its x0_hat = (z - sigma eps_hat)/alpha divides by alpha(1)
    (0.0064 for the linear schedule, 4.5e-5 for the cosine one), so the unclipped target at t = 1 is noise
    amplified by 1/alpha, whose loss outweighs every other t (see README, "Distil your own model").
    """
    def ddim_to(z, s_from, s_to):
        x0, eps = x0_fn(z, s_from)
        if clip:
            a_from, s_from_ = (append_dims(v.to(z), z.ndim) for v in schedule.alpha_sigma(s_from))
            x0 = x0.clamp(-1.0, 1.0)
            eps = (z - a_from * x0) / s_from_
        a, s = (append_dims(v.to(z), z.ndim) for v in schedule.alpha_sigma(s_to))
        return a * x0 + s * eps  # DDIM eta=0: x_s = alpha_s x0_hat + sigma_s eps_hat

    t1, t2 = t - 0.5 / n_student, t - 1.0 / n_student
    z2 = ddim_to(ddim_to(z_t, t, t1), t1, t2)
    a_t, s_t = schedule.alpha_sigma(t)
    a_2, s_2 = schedule.alpha_sigma(t2)
    ratio = s_2 / s_t
    num = z2 - append_dims((ratio).to(z_t), z_t.ndim) * z_t
    return num / append_dims((a_2 - ratio * a_t).to(z_t), z_t.ndim)


def teacher_fn(model: LoadedModel | torch.nn.Module, param: str, schedule: Schedule, cond: dict | None = None):
    """Teacher as (z, t float64) -> (x0_hat, eps_hat), through fastdiff.param (eps, x0 or v teachers).

    `cond` holds extra network inputs for this batch (class labels y, guidance weight w of a guided student).
    """
    net = model.net if isinstance(model, LoadedModel) else model
    cond = cond or {}
    return denoiser(lambda x_t, t: net(x_t, t, **cond), schedule, param)


def student_loss(student, target_fn, x0, schedule, cfg: DistillConfig, n_student: int | None, gen,
                 cond: dict | None = None, clip_target: bool = False):
    """(B,) w(lambda_t)·||x_tilde - x_hat_student(z_t)||^2.

    Progressive rounds (n_student = N): t = i/N, i ~ U{1..N}, x_tilde from two teacher DDIM steps. The guided
    first stage (n_student None, Meng et al. 2023): t ~ U[1e-3, 1], x_tilde = the guided teacher's x0_hat.
    `target_fn(z, t) -> (x0_hat, eps_hat)` is the teacher for this batch; `clip_target`: see distill_target.
    """
    t = sample_t(x0.shape[0], gen, n_student)  # distillation is training with another target (google-research)
    z_t, _, a, s = noised(x0, t, schedule, gen)
    with torch.no_grad():
        target = (target_fn(z_t, t)[0] if n_student is None
                  else distill_target(z_t, t, target_fn, schedule, n_student, clip_target))
    x_hat, _ = to_x0_eps(student(z_t, t.to(x0), **(cond or {})), z_t, a, s, cfg.param)
    return x_space_loss(x_hat, target, schedule.logsnr(t).to(x0), cfg.pd.weighting)


def sample_student(net, x, ts, **kw):
    """A progressive student's sampler: DDIM eta = 0 on its own grid i/N (Salimans & Ho 2022)."""
    from fastdiff.samplers import ddim

    return ddim(net, x, ts, eta=0.0, **kw)

