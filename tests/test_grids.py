"""Time grids: endpoints and monotonicity for every spacing and step count, the spacings' formulas, logsnr/karras."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdiff.errors import FastdiffError
from fastdiff.grids import (GRIDS, SPACINGS, full_grid, karras_grid, logsnr_grid, make_grid, strided_grid,
                            student_grid)
from fastdiff.schedules import Schedule

T = 1000


def _k(ts: torch.Tensor) -> list[int]:
    """Grid -> its integer indices k = t T (asserting that they are integers)."""
    k = ts * T
    assert torch.equal(k, k.round())
    return k.long().tolist()


@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_strided_grid_starts_at_1_and_ends_at_0(spacing):
    for steps in range(1, T + 1):
        ts = strided_grid(T, steps, spacing)
        assert ts.dtype == torch.float64 and ts.shape == (steps + 1,)
        assert ts[0] == 1.0 and ts[-1] == 0.0
        assert bool((ts[1:] < ts[:-1]).all()), (spacing, steps)
    assert torch.equal(strided_grid(T, T, spacing), full_grid(T))


def test_spacings_follow_their_formulas():
    assert _k(strided_grid(T, 10, "trailing")) == list(range(1000, -1, -100))
    # diffusers' trailing, 0-based timesteps: round(arange(T, 0, -T/steps)) - 1
    diffusers = np.round(np.arange(T, 0, -T / 7)).astype(int) - 1
    assert _k(strided_grid(T, 7, "trailing"))[:-1] == (diffusers + 1).tolist()
    assert _k(strided_grid(T, 3, "leading")) == [1000, 667, 334, 0]
    assert _k(strided_grid(T, 10, "linspace"))[:-1] == np.round(np.linspace(1, T, 10)).astype(int)[::-1].tolist()
    assert _k(strided_grid(T, 10, "quadratic")) == [1000, 810, 640, 490, 360, 250, 160, 90, 40, 10, 0]
    # quadratic with many steps: the raw indices collide near 0 and the repair pass makes them 1, 2, 3, ...
    assert _k(strided_grid(T, 100, "quadratic"))[-4:] == [3, 2, 1, 0]


def test_full_and_student_grids():
    assert torch.equal(full_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert torch.equal(student_grid(2), torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    assert torch.equal(make_grid("student", 8, Schedule()), student_grid(8))
    assert torch.equal(make_grid("full", T, Schedule()), full_grid(T))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1, 2, 10, 50])
def test_logsnr_and_karras_grids(kind, steps):
    schedule = Schedule(kind, T)
    for ts in (logsnr_grid(schedule, steps), karras_grid(schedule, steps)):
        assert ts.shape == (steps + 1,) and ts[-1] == 0.0
        assert bool((ts[1:] < ts[:-1]).all())
        if steps > 1:
            assert ts[-2] == 1.0 / T
    assert logsnr_grid(schedule, steps)[0] == 1.0
    # EDM's sigma_max = 80 (both schedules reach more at t = 1: cosine e^10, linear ~157), then the schedule's own
    sigma_0 = torch.exp(-schedule.logsnr(karras_grid(schedule, steps)[:1]) / 2)
    assert torch.allclose(sigma_0, torch.tensor([80.0], dtype=torch.float64), rtol=1e-9)
    assert karras_grid(schedule, steps, sigma_max=1e9)[0] == 1.0
    if steps < 3:
        return
    # uniform steps in logsnr, and sigma^(1/rho) linear in i (Karras et al. 2022 eq. 5), away from t = 1 where
    # the cosine schedule's logsnr is clipped flat
    lam = schedule.logsnr(logsnr_grid(schedule, steps)[1:-1])
    assert torch.allclose(lam.diff(), lam.diff().mean().expand(steps - 2), rtol=1e-6)
    root = torch.exp(-schedule.logsnr(karras_grid(schedule, steps)[:-1]) / 2) ** (1 / 7)
    assert torch.allclose(root.diff(), root.diff().mean().expand(steps - 1), rtol=1e-6)


def test_bad_grids_are_user_errors():
    schedule = Schedule("linear", 100)
    for kind, steps in (("nope", 10), ("full", 10), ("trailing", 101), ("linspace", 0), ("student", 0)):
        with pytest.raises(FastdiffError):
            make_grid(kind, steps, schedule)
    assert all(make_grid(kind, 100, schedule)[0] == 1.0 for kind in GRIDS)
