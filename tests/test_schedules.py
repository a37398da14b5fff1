"""Noise schedules against their closed forms (README, "Conventions (the math contract)")."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fastdiff.errors import FastdiffError
from fastdiff.schedules import LOGSNR_MIN, Schedule

KINDS = ("linear", "cosine")


def _cosine_closed(t: np.ndarray, s: float = 0.008) -> np.ndarray:
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    return f(t) / f(0.0)


@pytest.mark.parametrize("T", [1000, 37])
def test_linear_grid_is_the_ddpm_cumprod(T):
    # Ho et al. 2020: beta_k = linspace(1e-4, 0.02, T), alpha_bar_k = prod_{j<=k} (1 - beta_j) at t = k/T.
    ref = np.concatenate([[1.0], np.cumprod(1 - np.linspace(1e-4, 0.02, T))])
    ab = Schedule("linear", T).alpha_bar(torch.arange(T + 1, dtype=torch.float64) / T)
    assert ab.dtype == torch.float64
    # The contract asks for 1e-6; float64 arithmetic gives ~1e-15, so a float32 slip anywhere fails this.
    np.testing.assert_allclose(ab.numpy(), ref, rtol=1e-12, atol=0)


def test_linear_between_grid_points_is_geometric_interpolation():
    s, T = Schedule("linear", 100), 100
    k = torch.arange(T, dtype=torch.float64)
    mid = s.alpha_bar((k + 0.5) / T)
    np.testing.assert_allclose(mid.numpy(), (s.alpha_bar(k / T) * s.alpha_bar((k + 1) / T)).sqrt().numpy(), rtol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_endpoints_and_unit_variance(kind):
    s = Schedule(kind, 1000)
    assert s.alpha_bar(0.0).item() == 1.0
    assert s.logsnr(0.0).item() == math.inf
    t = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alpha, sigma = s.alpha_sigma(t)
    assert alpha.shape == sigma.shape == t.shape
    np.testing.assert_allclose((alpha**2 + sigma**2).numpy(), 1.0, rtol=0, atol=1e-14)
    ab = s.alpha_bar(t)
    np.testing.assert_allclose(s.logsnr(t).numpy(), np.log(ab.numpy() / (1 - ab.numpy())), rtol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_logsnr_decreases(kind):
    s = Schedule(kind, 1000)
    t = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    lam = s.logsnr(t)
    assert (lam[1:] <= lam[:-1]).all()
    # strictly, away from the clip (cosine clips only in the last ~3e-5 of t)
    inner = t <= 0.999
    assert (lam[inner][1:] < lam[inner][:-1]).all()


def test_cosine_matches_closed_form():
    t = np.linspace(0, 0.999, 1001)
    ab = Schedule("cosine", 1000).alpha_bar(torch.from_numpy(t))
    np.testing.assert_allclose(ab.numpy(), _cosine_closed(t), rtol=1e-12, atol=0)


def test_clip_at_t1_is_documented_value():
    cos, lin = Schedule("cosine", 1000), Schedule("linear", 1000)
    # the closed form is ~1e-33 at t = 1; the schedule clips logsnr at -20 (alpha_bar = sigmoid(-20))
    assert cos.alpha_bar(1.0).item() > 0
    assert cos.alpha_bar(1.0).item() == pytest.approx(1 / (1 + math.exp(20)), rel=1e-12)
    assert cos.logsnr(1.0).item() == pytest.approx(LOGSNR_MIN, abs=1e-9)
    t = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    for s in (cos, lin):
        assert (s.logsnr(t) >= LOGSNR_MIN - 1e-9).all()
        assert torch.isfinite(s.logsnr(t[1:])).all()
    # the linear schedule's end point is untouched by the clip
    ref = np.prod(1 - np.linspace(1e-4, 0.02, 1000))
    assert lin.alpha_bar(1.0).item() == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_t_of_logsnr_inverts_logsnr(kind):
    s = Schedule(kind, 1000)
    t = 1e-3 + (0.999 - 1e-3) * torch.rand(500, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    np.testing.assert_allclose(s.t_of_logsnr(s.logsnr(t)).numpy(), t.numpy(), rtol=0, atol=1e-12)
    lo, hi = s.logsnr(0.999).item(), s.logsnr(1e-3).item()
    lam = torch.linspace(lo, hi, 101, dtype=torch.float64)
    np.testing.assert_allclose(s.logsnr(s.t_of_logsnr(lam)).numpy(), lam.numpy(), rtol=0, atol=1e-9)


def test_discrete_betas():
    T = 1000
    lin = Schedule("linear", T)
    np.testing.assert_allclose(lin.discrete_betas().numpy(), np.linspace(1e-4, 0.02, T), rtol=1e-15)
    grid = lin.alpha_bar(torch.arange(1, T + 1, dtype=torch.float64) / T)
    np.testing.assert_allclose(torch.cumprod(1 - lin.discrete_betas(), 0).numpy(), grid.numpy(), rtol=1e-12)
    cos = Schedule("cosine", T).discrete_betas()
    assert cos.shape == (T,) and cos.dtype == torch.float64
    assert cos.max().item() == 0.999 and cos[-1].item() == 0.999  # Nichol & Dhariwal's cap
    assert (cos > 0).all() and (cos[1:] >= cos[:-1]).all()
    # below the cap, beta_k = 1 - alpha_bar(k/T) / alpha_bar((k-1)/T) of the closed form
    k = np.arange(1, T + 1)
    ref = 1 - _cosine_closed(k / T) / _cosine_closed((k - 1) / T)
    np.testing.assert_allclose(cos.numpy()[:-1], ref[:-1], rtol=1e-9)


@pytest.mark.parametrize("kwargs", [{"kind": "sigmoid"}, {"kind": "linear", "T": 0}])
def test_bad_schedule_is_a_user_error(kwargs):
    with pytest.raises(FastdiffError, match="schedule"):
        Schedule(**kwargs)


@pytest.mark.parametrize("schedule", [Schedule("linear", 1000), Schedule("cosine", 64),
                                      Schedule("linear", 50, beta_start=1e-3, beta_end=0.05),
                                      Schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012),
                                      Schedule("squaredcos_cap_v2", 100), Schedule("trained", 3, betas=(0.1, 0.2, 0.3))])
def test_schedule_round_trips_through_its_dict(schedule):
    assert Schedule.from_dict(json.loads(json.dumps(schedule.to_dict()))) == schedule


def test_discrete_kinds_are_exact_on_the_grid():
    s = Schedule("trained", 3, betas=(0.1, 0.2, 0.3))
    np.testing.assert_allclose(s.alpha_bar(torch.tensor([1 / 3, 2 / 3, 1.0], dtype=torch.float64)).numpy(),
                               [0.9, 0.72, 0.504], rtol=1e-15)
    # squaredcos_cap_v2 is the cosine schedule's capped discrete chain (diffusers' betas_for_alpha_bar)
    torch.testing.assert_close(Schedule("squaredcos_cap_v2", 100).discrete_betas(),
                               Schedule("cosine", 100).discrete_betas(), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [{"kind": "trained", "T": 2, "betas": (0.1, 1.0)},  # alpha_bar_T = 0
                                    {"kind": "trained", "T": 3, "betas": (0.1, 0.2)},
                                    {"kind": "trained", "T": 2}, {"kind": "linear", "T": 2, "betas": (0.1, 0.2)}])
def test_bad_beta_lists_are_user_errors(kwargs):
    with pytest.raises(FastdiffError, match="betas"):
        Schedule(**kwargs)
