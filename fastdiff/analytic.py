"""The exact denoiser for Gaussian data x0 ~ N(mu, std^2 I), and the closed forms it gives the samplers.

With x_t = alpha x0 + sigma eps the posterior mean is E[x0 | x_t] = mu + alpha std^2/(alpha^2 std^2 + sigma^2)
(x_t - alpha mu), so DDIM steps and the probability-flow ODE are affine maps with closed forms: a sampler run
with `GaussianDenoiser` as the model can be checked against `exact_ode_solution` instead of a sample statistic.
"""
from __future__ import annotations

import torch

from fastdiff.param import PARAMS, append_dims, eps_from_x0, target
from fastdiff.schedules import Schedule


def _per_sample(t, x: torch.Tensor) -> torch.Tensor:
    """A float or (B,) time -> (B,) float64 on x's device."""
    return torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])


class GaussianDenoiser:
    """`model(x, t) -> out`: (B, ...) x at (B,) times t -> the exact output in `param` for data N(mu, std^2 I)."""

    def __init__(self, mu: float, std: float, schedule: Schedule, param: str = "eps"):
        if param not in PARAMS:
            raise ValueError(f"unknown parameterization {param!r}; choose one of {PARAMS}")
        self.mu, self.std, self.schedule, self.param = float(mu), float(std), schedule, param

    def _alpha_sigma(self, t, x) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) float64 alpha_t, sigma_t on x's device; the schedule runs once per distinct t (usually one)."""
        times, index = torch.unique(_per_sample(t, x).cpu(), return_inverse=True)
        return tuple(v[index].to(x.device) for v in self.schedule.alpha_sigma(times))

    def x0(self, x: torch.Tensor, t) -> torch.Tensor:
        """(B, ...) x_t, float or (B,) t -> (B, ...) E[x0 | x_t] in x's dtype (computed in float64)."""
        alpha, sigma = (append_dims(v, x.ndim) for v in self._alpha_sigma(t, x))
        xd = x.double()
        # Gaussian posterior mean: mu + alpha s^2/(alpha^2 s^2 + sigma^2) (x_t - alpha mu)
        x0 = self.mu + alpha * self.std**2 / (alpha**2 * self.std**2 + sigma**2) * (xd - alpha * self.mu)
        return x0.to(x.dtype)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(t, x)
        x0 = self.x0(x, t).double()
        eps = eps_from_x0(x0, x.double(), alpha, sigma)
        return target(x0, eps, alpha, sigma, self.param).to(x.dtype)

    def sample(self, shape, generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
        """`shape` samples of the data distribution N(mu, std^2 I)."""
        return self.mu + self.std * torch.randn(shape, generator=generator, dtype=dtype)


def exact_ddim_step(denoiser: GaussianDenoiser, x: torch.Tensor, t, s) -> torch.Tensor:
    """(B, ...) x_t -> (B, ...) x_s: one deterministic DDIM step x_s = alpha_s x0 + sigma_s eps with the exact x0."""
    alpha_t, sigma_t = (append_dims(v, x.ndim) for v in denoiser._alpha_sigma(t, x))
    alpha_s, sigma_s = (append_dims(v, x.ndim) for v in denoiser._alpha_sigma(s, x))
    x0 = denoiser.x0(x, t).double()
    return (alpha_s * x0 + sigma_s * (x.double() - alpha_t * x0) / sigma_t).to(x.dtype)


def exact_ode_solution(denoiser: GaussianDenoiser, x: torch.Tensor, t=1.0, s=0.0) -> torch.Tensor:
    """(B, ...) x_t -> (B, ...) x_s, the probability-flow ODE map from t to s: the limit of DDIM eta=0 on finer grids.

    In sigma~ = sigma/alpha, x~ = x/alpha the ODE is dx~/dsigma~ = (x~ - E[x0|x])/sigma~ = (x~ - mu) sigma~/(std^2 +
    sigma~^2), so x~ - mu grows like sqrt(std^2 + sigma~^2):
    x_s = alpha_s mu + (x_t - alpha_t mu) sqrt(alpha_s^2 std^2 + sigma_s^2) / sqrt(alpha_t^2 std^2 + sigma_t^2).
    """
    alpha_t, sigma_t = (append_dims(v, x.ndim) for v in denoiser._alpha_sigma(t, x))
    alpha_s, sigma_s = (append_dims(v, x.ndim) for v in denoiser._alpha_sigma(s, x))
    var = denoiser.std**2
    scale = ((alpha_s**2 * var + sigma_s**2) / (alpha_t**2 * var + sigma_t**2)).sqrt()
    return (alpha_s * denoiser.mu + (x.double() - alpha_t * denoiser.mu) * scale).to(x.dtype)
