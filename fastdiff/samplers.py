"""Samplers: plain functions over an explicit decreasing time grid ts (k-diffusion style).

Every sampler is `name(model, x, ts, *, schedule, param, clip=False, generator=None, return_trajectory=False,
guidance=None, ...) -> Sample`: `x` (B, ...) is the state at ts[0] (the initial noise when ts[0] = 1), `ts`
a (steps+1,) float64 grid from `fastdiff.grids`, and `model(x, t) -> out` a plain callable with t a (B,)
tensor of continuous times in x's dtype and `out` in the parameterization `param` ("eps", "x0" or "v").

- guidance=w (float): `model(x, t)` returns the pair (out_cond, out_uncond) from one batched forward and the
  sampler uses out_uncond + w (out_cond - out_uncond) (Ho & Salimans 2022; w = 0 unconditional, w = 1
  conditional). A guided forward counts as 1 NFE.
- clip: x0_hat is clamped to [-1, 1] and eps_hat recomputed from the clamped x0_hat.
- generator: a `fastdiff.noise.SampleNoise` (per-sample counter-based noise: row i's normals are a function of
  (seed, sample index, draw, element), drawn on x's device, inside the fused step on CUDA; `initial_noise` makes
  one), None (torch's global RNG), one torch.Generator, or a list of B generators, row i drawing only from
  generator[i] (fastdiff <= 0.5's per-sample CPU generators, `sample_generators`).
- Sample.trajectory (return_trajectory=True) holds the B-batch state at every grid point, ts[0] first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence, get_args

import torch

from fastdiff.errors import FastdiffError
from fastdiff.grids import GRIDS, SPACINGS, full_grid, karras_grid, logsnr_grid, make_grid, strided_grid, student_grid
from fastdiff.guidance import combine
from fastdiff.noise import (NOISE_RNGS, Generators, SampleNoise, initial_noise, randn, randn_like_per_sample,
                            sample_generators)
from fastdiff.ops import sampler_step
from fastdiff.param import consistency_fn, denoiser, eps_from_x0
from fastdiff.schedules import Schedule

__all__ = ["Sample", "ddpm", "ddim", "distilled", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc", "heun",
           "consistency", "sample_generators", "randn_like_per_sample", "SampleNoise", "NOISE_RNGS", "VARIANCES",
           "UNIPC_VARIANTS",
           # the grids, re-exported so that one import serves a sampling call
           "GRIDS", "SPACINGS", "make_grid", "full_grid", "strided_grid", "student_grid", "logsnr_grid", "karras_grid"]

Variance = Literal["large", "small"]  # the choices, once: configs use it
VARIANCES: tuple[str, ...] = get_args(Variance)
UniPCVariant = Literal["bh1", "bh2"]  # UniPC's B(h): bh1 = h, bh2 = e^h - 1 (Zhao et al. 2023, at h -> -h for x0)
UNIPC_VARIANTS: tuple[str, ...] = get_args(UniPCVariant)


@dataclass
class Sample:
    """(B, ...) final x, the number of network evaluations, and the states at the grid points (or None)."""

    x: torch.Tensor
    nfe: int
    trajectory: list[torch.Tensor] | None = None


def sample(model, n: int, shape: Sequence[int], ts: torch.Tensor, *, schedule: Schedule, param: str, seed: int,
           device, clip: bool, guidance: float | None = None, rng: str = "philox") -> torch.Tensor:
    """(n, *shape) samples 0..n-1 of `model` by DDIM(eta=0) on the grid `ts` from their per-index noise: the one
    way training pictures and every distillation round's evaluation draw samples (the sweep uses the same noise)."""
    x, _ = initial_noise(range(n), shape, seed, device, rng=rng)
    with torch.no_grad():
        return ddim(model, x, ts, schedule=schedule, param=param, clip=clip, guidance=guidance).x


def _evaluate(model, x: torch.Tensor, t: torch.Tensor, guidance: float | None):
    """One (guided) forward at the (B,) times t -> (out, out_uncond), out_uncond None without guidance."""
    out = model(x, t)
    return (out, None) if guidance is None else out


def _guided(out, out_uncond, guidance):
    """Classifier-free guidance (Ho & Salimans 2022) through fastdiff.guidance.combine; no-op without a pair."""
    return out if out_uncond is None else combine(out, out_uncond, guidance)


def _x0_eps(model, x, t: float, schedule: Schedule, param: str, clip: bool, guidance):
    """(B, ...) x at time t -> (x0_hat, eps_hat), x0_hat clamped to [-1, 1] if clip, eps_hat consistent with it."""
    x0, eps = denoiser(lambda x_t, t_net: _guided(*_evaluate(model, x_t, t_net, guidance), guidance), schedule,
                       param)(x, t)
    if clip:
        alpha, sigma = (v.to(x) for v in schedule.alpha_sigma(t))
        x0 = x0.clamp(-1.0, 1.0)
        eps = eps_from_x0(x0, x, alpha, sigma)
    return x0, eps


def check_grid(ts: torch.Tensor) -> None:
    """(steps+1,) grid: raise a FastdiffError unless it is strictly decreasing in [0, 1]."""
    if ts.ndim != 1 or len(ts) < 2 or not bool((ts[1:] < ts[:-1]).all()) or ts[-1] < 0 or ts[0] > 1:
        raise FastdiffError("a time grid must be a strictly decreasing 1-D tensor in [0, 1] with >= 2 points; "
                            "build one with fastdiff.grids.make_grid")


def affine_steps(model, x, t_net, alpha, sigma, coefs, *, param, clip, generator, return_trajectory,
                  guidance) -> Sample:
    """Run the per-step updates x <- coef_x0 x0_hat + coef_xt x + coef_noise z (one fastdiff.ops.sampler_step each).

    t_net, alpha, sigma: (steps,) float64 time, alpha and sigma of the network evaluation at step i;
    coefs: (steps, 3) float64 (coef_x0, coef_xt, coef_noise); a step draws z only when its coef_noise != 0.
    """
    b = x.shape[0]
    noisy = (coefs[:, 2] != 0).tolist()
    t_in, table = _device_tables(t_net, alpha, sigma, coefs, x)
    trajectory = [x] if return_trajectory else None
    for i in range(len(t_net)):
        out, out_uncond = _evaluate(model, x, t_in[i].expand(b), guidance)
        a, s, c_x0, c_xt, c_noise = table[i, :, None].expand(5, b).contiguous().unbind()
        x = sampler_step(x, out, param=param, alpha_t=a, sigma_t=s, coef_x0=c_x0, coef_xt=c_xt, coef_noise=c_noise,
                         clip=clip, out_uncond=out_uncond, guidance=guidance, validate=False,  # table built here
                         **_step_noise(x, generator, noisy[i]))
        if trajectory is not None:
            trajectory.append(x)
    return Sample(x, len(t_net), trajectory)


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # affine_steps' device tables, by grid and dtype


def _device_tables(t_net, alpha, sigma, coefs, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ((steps,) network times in x's dtype, (steps, 5) (alpha, sigma, coef_x0, coef_xt, coef_noise) in the step's
    compute dtype), on x's device. Each step expands one row into contiguous (5, B) per-sample coefficients with a
    single copy, which fastdiff.ops uses without casting or copying again. Kept per (grid, device, dtype): a
    sampler called again on the same grid copies nothing from the host, so its loop can be captured in a CUDA
    graph (fastdiff.graphs)."""
    host = torch.cat([t_net[:, None], alpha[:, None], sigma[:, None], coefs], 1).to("cpu", torch.float64)
    key = (host.numpy().tobytes(), len(host), str(x.device), x.dtype)
    if key not in _TABLES:
        if len(_TABLES) >= 256:
            _TABLES.pop(next(iter(_TABLES)))
        dtype = torch.promote_types(x.dtype, torch.float32)
        _TABLES[key] = (host[:, 0].to(x.device, x.dtype), host[:, 1:].to(x.device, dtype))
    return _TABLES[key]


def _step_noise(x: torch.Tensor, generator: Generators, noisy: bool) -> dict:
    """sampler_step's noise arguments for one step: none; Philox counters (the fused step draws the normals itself);
    or a tensor of normals."""
    if not noisy:
        return {}
    if isinstance(generator, SampleNoise) and generator.rng == "philox":
        return dict(seed=generator.seed_tensor, sample_index=generator.index, draw=generator.take())
    return dict(noise=randn(x, generator))


def _pairs(ts: torch.Tensor, schedule: Schedule):
    """(steps+1,) grid -> (alpha_t, sigma_t, alpha_s, sigma_s, beta_ts), each (steps,) float64, for s < t consecutive.

    beta_{t|s} = 1 - abar_t/abar_s, computed with expm1 so it stays exact on fine grids.
    """
    check_grid(ts)
    alpha, sigma = schedule.alpha_sigma(ts)
    beta_ts = -torch.expm1(2 * (alpha[:-1].log() - alpha[1:].log()))
    return alpha[:-1], sigma[:-1], alpha[1:], sigma[1:], beta_ts


def _coefs(alpha_t, sigma_t, alpha_s, dir_coef, c) -> torch.Tensor:
    """(steps,) each -> (steps, 3) (coef_x0, coef_xt, coef_noise) of x_s = alpha_s x0 + dir_coef eps + c z.

    eps = (x_t - alpha_t x0)/sigma_t makes it
    x_s = (alpha_s - dir_coef alpha_t/sigma_t) x0 + (dir_coef/sigma_t) x_t + c z.
    """
    return torch.stack([alpha_s - dir_coef * alpha_t / sigma_t, dir_coef / sigma_t, c], 1)


def ddpm(model, x, ts, *, schedule: Schedule, param: str, clip: bool = False, generator: Generators = None,
         return_trajectory: bool = False, guidance: float | None = None, variance: str = "large") -> Sample:
    """(B, ...) noise at ts[0] -> Sample: DDPM ancestral sampling between consecutive grid points s < t.

    On the full grid k/T this is Ho et al. 2020 Alg. 2; on a sub-grid it is strided DDPM (Nichol & Dhariwal
    2021 respacing). variance "large" is beta_{t|s}, "small" the posterior's beta-tilde. No noise on a step to 0.
    """
    if variance not in VARIANCES:
        raise FastdiffError(f"unknown DDPM variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    alpha_t, sigma_t, alpha_s, sigma_s, beta_ts = _pairs(ts, schedule)
    # posterior mean (Ho et al. 2020 eq. 7 between any s < t):
    # mu = sqrt(abar_s) beta_{t|s}/(1 - abar_t) x0 + sqrt(1 - beta_{t|s}) (1 - abar_s)/(1 - abar_t) x_t,
    # which is the DDIM(eta=1) mean, i.e. direction coefficient dir_coef = alpha_t sigma_s^2 / (alpha_s sigma_t)
    dir_coef = alpha_t * sigma_s**2 / (alpha_s * sigma_t)
    var = beta_ts if variance == "large" else sigma_s**2 / sigma_t**2 * beta_ts
    c = torch.where(ts[1:] > 0, var.sqrt(), 0.0)
    coefs = _coefs(alpha_t, sigma_t, alpha_s, dir_coef, c)
    return affine_steps(model, x, ts[:-1], alpha_t, sigma_t, coefs, param=param, clip=clip, generator=generator,
                         return_trajectory=return_trajectory, guidance=guidance)


def ddim(model, x, ts, *, schedule: Schedule, param: str, clip: bool = False, generator: Generators = None,
         return_trajectory: bool = False, guidance: float | None = None, eta: float = 0.0) -> Sample:
    """(B, ...) noise at ts[0] -> Sample: DDIM(eta) (Song et al. 2021); eta=0 deterministic, eta=1 = DDPM "small"."""
    if not 0.0 <= eta <= 1.0:
        raise FastdiffError(f"DDIM eta must be in [0, 1], got {eta}")
    alpha_t, sigma_t, alpha_s, sigma_s, beta_ts = _pairs(ts, schedule)
    # Song et al. 2021 eq. 12/16: x_s = alpha_s x0 + dir_coef eps + c z,
    # c = eta sqrt((1-abar_s)/(1-abar_t)) sqrt(beta_{t|s}), dir_coef = sqrt(1 - abar_s - c^2); with
    # eps = (x_t - alpha_t x0)/sigma_t this is linear in (x0, x_t)
    c = eta * sigma_s / sigma_t * beta_ts.sqrt()
    # dir_coef^2 = sigma_s^2 - c^2 = sigma_s^2/sigma_t^2 ((1 - eta^2) sigma_t^2 + eta^2 (alpha_t sigma_s/alpha_s)^2),
    # written without the cancellation
    dir_coef = sigma_s / sigma_t * ((1 - eta**2) * sigma_t**2 + eta**2 * (alpha_t * sigma_s / alpha_s) ** 2).sqrt()
    coefs = _coefs(alpha_t, sigma_t, alpha_s, dir_coef, c)
    return affine_steps(model, x, ts[:-1], alpha_t, sigma_t, coefs, param=param, clip=clip, generator=generator,
                         return_trajectory=return_trajectory, guidance=guidance)


def distilled(model, x, N: int, *, schedule: Schedule, param: str, clip: bool = False, generator: Generators = None,
              return_trajectory: bool = False, guidance: float | None = None) -> Sample:
    """(B, ...) noise at t=1 -> Sample: a distilled N-step student, i.e. DDIM eta=0 on its grid i/N."""
    return ddim(model, x, student_grid(N), schedule=schedule, param=param, clip=clip, generator=generator,
                return_trajectory=return_trajectory, guidance=guidance)


def dpm_solver_pp_2m(model, x, ts, *, schedule: Schedule, param: str, clip: bool = False,
                     generator: Generators = None, return_trajectory: bool = False,
                     guidance: float | None = None) -> Sample:
    """(B, ...) noise at ts[0] -> Sample: DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction, NFE = steps.

    First order on the first step and on the step to t = 0 (as k-diffusion's sample_dpmpp_2m), where it returns
    x0_hat. Deterministic: `generator` is accepted for a uniform signature and unused.
    """
    check_grid(ts)
    alpha, sigma = schedule.alpha_sigma(ts)
    half_logsnr = schedule.logsnr(ts) / 2  # DPM-Solver's lambda = log(alpha/sigma), half the contract's logSNR
    trajectory = [x] if return_trajectory else None
    x0_prev = None
    for i in range(len(ts) - 1):
        x0, _ = _x0_eps(model, x, float(ts[i]), schedule, param, clip, guidance)
        if ts[i + 1] == 0:
            x = x0
        else:
            h = half_logsnr[i + 1] - half_logsnr[i]
            x0_mix = x0
            if x0_prev is not None:
                # eq. (2M): D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1}/h_i
                r = (half_logsnr[i] - half_logsnr[i - 1]) / h
                x0_mix = x0 + (x0 - x0_prev) / (2 * r)
            # exponential integrator in data prediction: x_s = sigma_s/sigma_t x_t + alpha_s (1 - e^{-h}) D
            x = float(sigma[i + 1] / sigma[i]) * x + float(-alpha[i + 1] * torch.expm1(-h)) * x0_mix
        x0_prev = x0
        if trajectory is not None:
            trajectory.append(x)
    return Sample(x, len(ts) - 1, trajectory)


def _multistep_order(i: int, steps: int, order: int, lower_order_final: bool) -> int:
    """The order of multistep step i of `steps`: warm-up min(order, i + 1) while the history is short, and with
    lower_order_final also min(., steps - i), i.e. 1 on the last step, 2 on the one before (diffusers' rule)."""
    return min(order, i + 1, steps - i) if lower_order_final else min(order, i + 1)


def dpm_solver_pp_3m(model, x, ts, *, schedule: Schedule, param: str, clip: bool = False,
                     generator: Generators = None, return_trajectory: bool = False,
                     guidance: float | None = None, lower_order_final: bool = True) -> Sample:
    """(B, ...) noise at ts[0] -> (B, ...) Sample: DPM-Solver++(3M), data prediction, NFE = steps.

    The third-order multistep exponential integrator of Lu et al. 2022 ("DPM-Solver++", Sec. 4 and App. B; the
    official code's `multistep_dpm_solver_third_update` with algorithm_type dpmsolver++), as diffusers'
    `DPMSolverMultistepScheduler(solver_order=3, algorithm_type="dpmsolver++")`: with lambda = log(alpha/sigma),
    h = lambda_{i+1} - lambda_i, r0 = h_{i-1}/h, r1 = h_{i-2}/h and x0_j the model's x0_hat at ts[j],
    D1_0 = (x0_i - x0_{i-1})/r0, D1_1 = (x0_{i-1} - x0_{i-2})/r1, D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1),
    D2 = (D1_0 - D1_1)/(r0 + r1), and with phi1 = 1 - e^{-h}:
    x_{i+1} = sigma_{i+1}/sigma_i x_i + alpha_{i+1} (phi1 x0_i + (1 - phi1/h) D1 + (1/2 - (h - phi1)/h^2) D2).
    Step 0 is first order (DDIM) and step 1 second order (the 2M step of `dpm_solver_pp_2m`) while the history is
    short; the step to t = 0 returns x0_hat (diffusers' final_sigmas_type="zero"); with `lower_order_final` (the
    diffusers default) a grid of fewer than 15 steps also takes its last step at first and the one before at second
    order. Deterministic: `generator` is accepted for a uniform signature and unused.
    As written there (and here, for parity) the update is globally second order, not third: D2 estimates
    h^2 x0''/2 while its coefficient ~h/6 is the one of h^2 x0'', so half the h^3 x0''/6 term is missing (local
    error -h^3 x0''/12). Measured on the exact Gaussian denoiser it still errs ~6.7x less than 2M at equal steps
    (tests/test_samplers.py); doubling the D2 term would make it third order.
    """
    check_grid(ts)
    alpha, sigma = (v.tolist() for v in schedule.alpha_sigma(ts))
    lam = (schedule.logsnr(ts) / 2).tolist()  # DPM-Solver's lambda = log(alpha/sigma), half the contract's logSNR
    steps = len(ts) - 1
    trajectory = [x] if return_trajectory else None
    x0s: list[torch.Tensor] = []  # x0_hat at ts[i-2], ts[i-1], ts[i] (newest last)
    for i in range(steps):
        x0, _ = _x0_eps(model, x, float(ts[i]), schedule, param, clip, guidance)
        x0s = [*x0s[-2:], x0]
        if ts[i + 1] == 0:
            x = x0
        else:
            order = _multistep_order(i, steps, 3, lower_order_final and steps < 15)
            h = lam[i + 1] - lam[i]
            phi1 = -math.expm1(-h)
            a = alpha[i + 1]
            x = (sigma[i + 1] / sigma[i]) * x + (a * phi1) * x0
            if order >= 2:
                r0 = (lam[i] - lam[i - 1]) / h
                d1_0 = (x0 - x0s[-2]) / r0
                if order == 2:  # 2M: D = x0 + D1_0/2
                    x = x + (a * phi1 / 2) * d1_0
                else:
                    r1 = (lam[i - 1] - lam[i - 2]) / h
                    d1_1 = (x0s[-2] - x0s[-3]) / r1
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    d1 = d1_0 + r0 * d2
                    x = x + (a * (1 - phi1 / h)) * d1 + (a * (0.5 - (h - phi1) / h**2)) * d2
        if trajectory is not None:
            trajectory.append(x)
    return Sample(x, steps, trajectory)


def _unipc_coefs(lam: Sequence[float], i: int, order: int, variant: str):
    """UniPC's coefficients of the step ts[i] -> ts[i+1] of `order` (using ts[i-1], ..., ts[i-order+1] too).

    -> (rks, hphi1, b_h, rhos_p, rhos_c), Python floats: rks = (lambda_{i-k} - lambda_i)/h for k = 1..order-1,
    hphi1 = e^{-h} - 1, b_h = B(-h) of `variant`, the predictor's order-1 and the corrector's order weights rho.
    In data prediction UniPC runs at hh = -h: rho solves R rho = b with R[k-1] = (rks, 1)^(k-1) and
    b_k = k! hh phi_{k+1}(hh)/B(hh) for k = 1..order (phi_1(z) = (e^z - 1)/z, phi_{k+1}(z) = (phi_k(z) - 1/k!)/z,
    Zhao et al. 2023, Sec. 3): the corrector solves all `order` rows, the predictor the first order-1 rows and
    columns, except that it takes rho = 1/2 at order 2 (as the authors' code and diffusers do).
    """
    h = lam[i + 1] - lam[i]
    hh = -h
    rks = [(lam[i - k] - lam[i]) / h for k in range(1, order)]
    hphi1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else hphi1
    h_phi_k, factorial, b = hphi1 / hh - 1, 1, []  # hh phi_2(hh), then hh phi_{k+1}(hh) by the recursion
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = torch.tensor([[r ** (k - 1) for r in [*rks, 1.0]] for k in range(1, order + 1)], dtype=torch.float64)
    b = torch.tensor(b, dtype=torch.float64)
    if order == 1:
        rhos_p = []
    elif order == 2:
        rhos_p = [0.5]
    else:
        rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    rhos_c = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    return rks, hphi1, b_h, rhos_p, rhos_c


def unipc(model, x, ts, *, schedule: Schedule, param: str, clip: bool = False, generator: Generators = None,
          return_trajectory: bool = False, guidance: float | None = None, order: int = 2, variant: UniPCVariant = "bh2",
          lower_order_final: bool = True) -> Sample:
    """(B, ...) noise at ts[0] -> (B, ...) Sample: UniPC-p in data prediction (Zhao et al. 2023), NFE = steps.

    Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models", Sec. 3
    (UniC, UniP, the two B(h)) in its data-prediction form, as the authors' code and diffusers'
    `UniPCMultistepScheduler(solver_order=order, solver_type=variant, predict_x0=True)` run it: with
    lambda = log(alpha/sigma), h = lambda_{i+1} - lambda_i and m_j the model's x0_hat at ts[j], the predictor
    UniP-p is x_{i+1} = sigma_{i+1}/sigma_i x_i + alpha_{i+1} (1 - e^{-h}) m_i - alpha_{i+1} B(h)
    sum_k rho_k (m_{i-k} - m_i)/r_k, r_k = (lambda_{i-k} - lambda_i)/h, B(h) = -h (`variant` "bh1") or e^{-h} - 1
    ("bh2"). The model is then evaluated at that x_{i+1} and the corrector UniC-p recomputes x_{i+1} from x_i with
    one more point, m_{i+1} (order p + 1, and no extra NFE: m_{i+1} also drives the next predictor). The corrector
    does not run after the last step (nothing evaluates the model there). Warm-up: step i has order min(p, i + 1);
    with `lower_order_final` (the diffusers default) also min(., steps - i), so the last step is first order. The
    step to t = 0 returns x0_hat. Sample.trajectory holds the corrected states. `order` in 1..3; `generator` unused.
    """
    if order not in (1, 2, 3):
        raise FastdiffError(f"UniPC order must be 1, 2 or 3, got {order}")
    if variant not in UNIPC_VARIANTS:
        raise FastdiffError(f"unknown UniPC variant {variant!r}; choose one of {', '.join(UNIPC_VARIANTS)}")
    check_grid(ts)
    alpha, sigma = (v.tolist() for v in schedule.alpha_sigma(ts))
    lam = (schedule.logsnr(ts) / 2).tolist()
    steps = len(ts) - 1
    trajectory = [x] if return_trajectory else None
    ms: list[torch.Tensor] = []  # x0_hat at ts[i-order+1..i] (newest last)
    x_prev, coefs = x, None  # the state the last predictor started from, and that step's coefficients
    for i in range(steps):
        m, _ = _x0_eps(model, x, float(ts[i]), schedule, param, clip, guidance)
        if coefs is not None:  # UniC on the step ts[i-1] -> ts[i] with the new point m (ms not yet shifted)
            rks, hphi1, b_h, _, rhos_c = coefs
            a = alpha[i]
            res = sum(((rho / r) * (mk - ms[-1]) for rho, r, mk in zip(rhos_c, rks, reversed(ms[:-1]))),
                      start=rhos_c[-1] * (m - ms[-1]))
            x = (sigma[i] / sigma[i - 1]) * x_prev + (-a * hphi1) * ms[-1] + (-a * b_h) * res
            if trajectory is not None:
                trajectory.append(x)
        ms = [*ms[-(order - 1):], m] if order > 1 else [m]
        x_prev = x
        if ts[i + 1] == 0:
            x, coefs = m, None
        else:
            p = _multistep_order(i, steps, order, lower_order_final)
            coefs = _unipc_coefs(lam, i, p, variant)
            rks, hphi1, b_h, rhos_p, _ = coefs
            a = alpha[i + 1]
            x = (sigma[i + 1] / sigma[i]) * x + (-a * hphi1) * m
            for rho, r, mk in zip(rhos_p, rks, reversed(ms[:-1])):
                x = x + (-a * b_h * rho / r) * (mk - m)
    if trajectory is not None:
        trajectory.append(x)
    return Sample(x, steps, trajectory)


def heun(model, x, ts, *, schedule: Schedule, param: str, clip: bool = False, generator: Generators = None,
         return_trajectory: bool = False, guidance: float | None = None) -> Sample:
    """(B, ...) noise at ts[0] -> Sample: Karras et al. 2022 Alg. 1 (deterministic Heun), NFE = 2 steps - 1.

    Alg. 1 runs on x~ = x/alpha with sigma~ = sigma/alpha and D = x0_hat: Euler x~' = x~ + (sigma~' - sigma~) d,
    d = (x~ - D)/sigma~ = eps_hat, then the trapezoid correction, Euler alone on the step to 0. Written back in
    x = alpha x~ so that 1/alpha (~2e4 for cosine at t=1) never multiplies x. `generator` is unused.
    The trapezoid is only accurate for steps that are small relative to sigma~: from the cosine schedule's
    sigma~(1) = e^10 a first step down to sigma~ ~ 1 is far off at few steps, by the method, not by rounding;
    the karras grid starts at EDM's sigma~ = 80 instead (see `karras_grid`).
    """
    check_grid(ts)
    alpha, sigma = schedule.alpha_sigma(ts)
    sigma_edm = sigma / alpha
    trajectory = [x] if return_trajectory else None
    nfe = 0
    for i in range(len(ts) - 1):
        x0, eps = _x0_eps(model, x, float(ts[i]), schedule, param, clip, guidance)
        # Euler step = DDIM eta=0: x' = alpha' (x0 + sigma~' eps)
        x_next = float(alpha[i + 1]) * x0 + float(sigma[i + 1]) * eps
        nfe += 1
        if ts[i + 1] > 0:
            _, eps_next = _x0_eps(model, x_next, float(ts[i + 1]), schedule, param, clip, guidance)
            nfe += 1
            # trapezoid: x~'' = x0 + (sigma~ + sigma~')/2 eps + (sigma~' - sigma~)/2 eps'
            a = float(alpha[i + 1])
            x_next = (a * x0 + float(a * (sigma_edm[i] + sigma_edm[i + 1]) / 2) * eps
                      + float(a * (sigma_edm[i + 1] - sigma_edm[i]) / 2) * eps_next)
        x = x_next
        if trajectory is not None:
            trajectory.append(x)
    return Sample(x, nfe, trajectory)


def consistency(model, x, ts, *, schedule: Schedule, param: str, clip: bool = False, generator: Generators = None,
                return_trajectory: bool = False, guidance: float | None = None) -> Sample:
    """(B, ...) x at ts[0] -> Sample: multistep consistency sampling (Song et al. 2023, Alg. 1), NFE = steps.

    `model` is a consistency model in `param` (v, or x0 with the c_skip wrapper: fastdiff.param.consistency_fn).
    x0 = f(x, ts[0]); then at every later positive time tau of ts: x = alpha_tau x0 + sigma_tau z (z per sample from
    `generator`), x0 = f(x, tau). Returns the last x0 (clamped to [-1, 1] with clip). One step: ts = [t_top, 0],
    where t_top is the top of the student's training discretization (`fastdiff.distill.consistency.boundaries`).
    """
    check_grid(ts)
    net = lambda x_t, t_net: _guided(*_evaluate(model, x_t, t_net, guidance), guidance)  # noqa: E731
    return _renoise_loop(consistency_fn(net, schedule, param), x, ts, schedule, clip, generator, return_trajectory)


def renoising(model, x, ts, *, schedule: Schedule, param: str, clip: bool = False, generator: Generators = None,
              return_trajectory: bool = False, guidance: float | None = None) -> Sample:
    """(B, ...) x at ts[0] -> Sample: a multistep generator's sampler (DMD2, Yin et al. 2024, Sec. 4.3), NFE = steps.

    x0 = the model's x0 prediction at (x, ts[0]); at every later positive time tau of ts: x = alpha_tau x0 +
    sigma_tau z with fresh z per sample from `generator`, x0 = its prediction at tau. Returns the last x0 (clamped
    to [-1, 1] with clip). Multistep consistency sampling with the plain denoiser in place of the consistency
    function (the two agree for v; for x0 the consistency function adds the c_skip boundary condition)."""
    check_grid(ts)
    net = lambda x_t, t_net: _guided(*_evaluate(model, x_t, t_net, guidance), guidance)  # noqa: E731
    x0_eps = denoiser(net, schedule, param)
    return _renoise_loop(lambda x_t, t: x0_eps(x_t, t)[0], x, ts, schedule, clip, generator, return_trajectory)


def _renoise_loop(f, x, ts, schedule: Schedule, clip: bool, generator: Generators, return_trajectory: bool) -> Sample:
    """x0 = f(x, t) at ts' first positive time, then re-noise to each later one and predict again."""
    b = x.shape[0]
    times = ts[ts > 0]
    trajectory = [x] if return_trajectory else None
    x0 = None
    for i, tau in enumerate(times.tolist()):
        t = torch.full((b,), tau, dtype=torch.float64)
        if i > 0:
            alpha, sigma = (float(v) for v in schedule.alpha_sigma(tau))
            x = alpha * x0 + sigma * randn(x0, generator)
        x0 = f(x, t)
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        if trajectory is not None:
            trajectory.append(x0)
    return Sample(x0, len(times), trajectory)
