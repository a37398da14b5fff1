"""Network parameterizations: conversions between the network output and (x0, eps).

x_t = alpha x0 + sigma eps;  v = alpha eps - sigma x0  (Salimans & Ho 2022, eq. in App. D), so
x0 = alpha x_t - sigma v,  eps = sigma x_t + alpha v,  x0 = (x_t - sigma eps) / alpha.
alpha, sigma are per-sample tensors of shape (B,) and broadcast over the remaining dims.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

import torch

if TYPE_CHECKING:
    from fastdiff.schedules import Schedule

Param = Literal["eps", "x0", "v"]  # the choices, once: configs use it
SIGMA_DATA = 0.5  # the data's standard deviation in the consistency models' c_skip (Song et al. 2023)
PARAMS: tuple[str, ...] = get_args(Param)


def append_dims(a: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dims in all, for broadcasting per-sample scalars."""
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def to_x0_eps(out, x_t, alpha, sigma, param: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, ...) network output in `param` -> (x0_hat, eps_hat)."""
    alpha, sigma = append_dims(alpha, x_t.ndim), append_dims(sigma, x_t.ndim)
    if param == "eps":
        return (x_t - sigma * out) / alpha, out
    if param == "x0":
        return out, (x_t - alpha * out) / sigma
    if param == "v":
        return alpha * x_t - sigma * out, sigma * x_t + alpha * out
    raise ValueError(f"unknown parameterization {param!r}; choose one of {PARAMS}")


def eps_from_x0(x0, x_t, alpha, sigma) -> torch.Tensor:
    """eps = (x_t - alpha x0) / sigma: the noise consistent with x0 (used after clipping x0)."""
    return (x_t - append_dims(alpha, x_t.ndim) * x0) / append_dims(sigma, x_t.ndim)


def target(x0, eps, alpha, sigma, param: str) -> torch.Tensor:
    """The regression target for a network that outputs `param`."""
    if param == "eps":
        return eps
    if param == "x0":
        return x0
    if param == "v":
        return append_dims(alpha, x0.ndim) * eps - append_dims(sigma, x0.ndim) * x0
    raise ValueError(f"unknown parameterization {param!r}; choose one of {PARAMS}")


def denoiser(net, schedule, param: str):
    """A network in any parameterization as one denoiser (x_t, t) -> (x0_hat, eps_hat), the adapter samplers,
    distillers and guidance share (google-research's `_run_model`, k-diffusion's external wrappers).

    `net(x_t, t_net)` returns (B, ...) in `param`; t is a float (one time for the batch) or (B,) float64 times;
    alpha_t and sigma_t come from `schedule.alpha_sigma(t)` in float64, then x_t's dtype.
    """
    def fn(x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = (v.to(x_t) for v in schedule.alpha_sigma(t))
        t_net = (torch.full((x_t.shape[0],), t, dtype=x_t.dtype, device=x_t.device) if isinstance(t, float)
                 else t.to(x_t))
        return to_x0_eps(net(x_t, t_net), x_t, alpha, sigma, param)

    return fn


def c_skip(schedule: Schedule, t) -> torch.Tensor:
    """(B,) float64 c_skip(t) = sigma_d^2 / (sigma~^2 + sigma_d^2), sigma~ = sigma_t/alpha_t; c_skip(0) = 1."""
    alpha, sigma = schedule.alpha_sigma(t)
    return SIGMA_DATA**2 / ((sigma / alpha) ** 2 + SIGMA_DATA**2)


def consistency_fn(net, schedule: Schedule, param: str, cond: dict | None = None):
    """`net(x, t)` in `param` as the consistency function f(x, t) -> (B, ...) x0 estimate, f(x, 0) = x exactly.

    t: (B,) float64 times. FastdiffError for an eps network (its x0 divides by alpha ~ 0 at t = 1)."""
    if param == "eps":
        from fastdiff.errors import FastdiffError

        raise FastdiffError("consistency distillation needs a v- or x0-prediction student (--param v or x0); "
                            "eps makes x0 = (x - sigma eps)/alpha divide by alpha ~ 0 at t = 1")
    cond = cond or {}

    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (v.to(x) for v in schedule.alpha_sigma(t))
        out = net(x, t.to(x), **cond)
        if param == "v":
            return to_x0_eps(out, x, alpha, sigma, "v")[0]
        skip = append_dims(c_skip(schedule, t).to(x), x.ndim)
        return skip * x + (1 - skip) * out

    return f
