"""Parameterizations (eps, x0, v) and the training losses, against hand computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdiff.param import PARAMS, append_dims, eps_from_x0, target, to_x0_eps
from fastdiff.losses import WEIGHTINGS, diffusion_loss, snr_weight, weighted_loss
from fastdiff.schedules import Schedule


def _draw(shape, seed=0, kind="cosine"):
    """float64 x0, eps, t in [1e-3, 1], alpha, sigma, logsnr and x_t = alpha x0 + sigma eps."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    t = 1e-3 + (1 - 1e-3) * torch.rand(shape[0], generator=g, dtype=torch.float64)
    s = Schedule(kind, 1000)
    alpha, sigma = s.alpha_sigma(t)
    x_t = append_dims(alpha, x0.ndim) * x0 + append_dims(sigma, x0.ndim) * eps
    return x0, eps, t, alpha, sigma, s.logsnr(t), x_t


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("shape", [(256, 2), (64, 3, 4, 4)])
@pytest.mark.parametrize("param", PARAMS)
def test_target_then_to_x0_eps_round_trips(param, shape, kind):
    x0, eps, _, alpha, sigma, _, x_t = _draw(shape, kind=kind)
    out = target(x0, eps, alpha, sigma, param)
    x0_hat, eps_hat = to_x0_eps(out, x_t, alpha, sigma, param)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_from_x0(x0, x_t, alpha, sigma), eps, rtol=0, atol=1e-10)


def test_v_formulas():
    x0, eps, _, alpha, sigma, _, x_t = _draw((32, 5))
    a, s = alpha[:, None], sigma[:, None]
    v = target(x0, eps, alpha, sigma, "v")
    torch.testing.assert_close(v, a * eps - s * x0, rtol=0, atol=1e-14)  # Salimans & Ho 2022
    torch.testing.assert_close(a * x_t - s * v, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(s * x_t + a * v, eps, rtol=0, atol=1e-12)


def test_unknown_param_raises():
    x0, eps, _, alpha, sigma, _, x_t = _draw((4, 2))
    with pytest.raises(ValueError, match="parameterization"):
        to_x0_eps(x0, x_t, alpha, sigma, "score")
    with pytest.raises(ValueError, match="parameterization"):
        target(x0, eps, alpha, sigma, "score")
    with pytest.raises(ValueError, match="weighting"):
        snr_weight(torch.zeros(4), "min-snr")


def test_eps_mse_is_the_seeds_l_simple():
    """diffusion_loss('eps-mse') = ||eps - eps_theta(sqrt(ab) x0 + sqrt(1 - ab) eps, t)||^2, t uniform."""
    x0 = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    seen = {}

    def net(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return 0.5 * x_t + t[:, None, None, None]

    loss = diffusion_loss(net, x0, Schedule("cosine", 1000), "eps", "eps-mse", torch.Generator().manual_seed(7))
    # the same draws by hand: t ~ U[1e-3, 1], then eps; the seed's forward process in numpy
    g = torch.Generator().manual_seed(7)
    t = (1e-3 + (1 - 1e-3) * torch.rand(16, generator=g, dtype=torch.float64)).numpy()
    eps = torch.randn(x0.shape, generator=g).double().numpy()
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    ab = (f(t) / f(0.0))[:, None, None, None]
    x_t = np.sqrt(ab) * x0.numpy() + np.sqrt(1 - ab) * eps
    eps_theta = 0.5 * x_t + t[:, None, None, None]
    np.testing.assert_allclose(seen["t"].numpy(), t, rtol=1e-15)
    np.testing.assert_allclose(seen["x_t"].numpy(), x_t, rtol=1e-6, atol=1e-6)
    assert loss.shape == (16,)
    np.testing.assert_allclose(loss.numpy(), ((eps - eps_theta) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize("param", PARAMS)
def test_snr_weighted_losses_by_hand(param):
    x0, _, _, alpha, sigma, logsnr, x_t = _draw((64, 3), seed=4, kind="linear")
    out = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a, s, o, xt = alpha.numpy()[:, None], sigma.numpy()[:, None], out.numpy(), x_t.numpy()
    x0_hat = {"eps": (xt - s * o) / a, "x0": o, "v": a * xt - s * o}[param]
    err = ((x0.numpy() - x0_hat) ** 2).mean(1)
    snr = alpha.numpy() ** 2 / sigma.numpy() ** 2
    assert (snr < 1).any() and (snr > 1).any()  # both branches of the truncation are exercised
    for weighting, w in (("snr-trunc", np.maximum(snr, 1)), ("snr+1", snr + 1)):
        got = weighted_loss(out, x0, None, x_t, alpha, sigma, logsnr, param, weighting)
        np.testing.assert_allclose(got.numpy(), w * err, rtol=1e-9)


def test_weightings_equal_their_named_losses():
    x0, eps, _, alpha, sigma, logsnr, x_t = _draw((64, 3), seed=6)
    out = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x0_hat, eps_hat = to_x0_eps(out, x_t, alpha, sigma, "v")
    # (SNR + 1) ||x - x_hat||^2 = ||v - v_hat||^2 (Salimans & Ho 2022 §4)
    v = target(x0, eps, alpha, sigma, "v")
    snr1 = weighted_loss(out, x0, eps, x_t, alpha, sigma, logsnr, "v", "snr+1")
    torch.testing.assert_close(snr1, (v - out).pow(2).mean(1), rtol=1e-9, atol=0)
    # eps-MSE = SNR ||x - x_hat||^2
    eps_mse = weighted_loss(out, x0, eps, x_t, alpha, sigma, logsnr, "v", "eps-mse")
    torch.testing.assert_close(eps_mse, (eps - eps_hat).pow(2).mean(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(eps_mse, logsnr.exp() * (x0 - x0_hat).pow(2).mean(1), rtol=1e-9, atol=0)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("param", PARAMS)
def test_exact_model_has_zero_loss(param, weighting):
    x0, eps, _, alpha, sigma, logsnr, x_t = _draw((64, 2, 3), seed=8)
    out = target(x0, eps, alpha, sigma, param)
    assert weighted_loss(out, x0, eps, x_t, alpha, sigma, logsnr, param, weighting).abs().max() < 1e-18
    # through diffusion_loss: a net that knows x0 outputs the exact target for its own (x_t, t)
    schedule = Schedule("linear", 1000)

    def exact(x_t, t):
        a, s = schedule.alpha_sigma(t)
        e = (x_t - a[:, None, None] * x0) / s[:, None, None]
        return target(x0, e, a, s, param)

    random = lambda x_t, t: torch.randn_like(x_t)  # noqa: E731
    gen = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    exact_loss = diffusion_loss(exact, x0, schedule, param, weighting, gen())
    # the loss casts the net output to float32, so "zero" is float32 round-off
    assert exact_loss.abs().max() < 1e-8
    assert diffusion_loss(random, x0, schedule, param, weighting, gen()).mean() > 1e-2


def test_diffusion_loss_passes_labels_and_samples_t_in_range():
    x0 = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    y = torch.arange(512) % 3
    seen = {}

    def net(x_t, t, y_in):
        seen["t"], seen["y"] = t, y_in
        return torch.zeros_like(x_t)

    diffusion_loss(net, x0, Schedule("cosine"), "eps", "eps-mse", torch.Generator().manual_seed(1), t_min=0.2, y=y)
    assert torch.equal(seen["y"], y)
    assert seen["t"].min() >= 0.2 and seen["t"].max() <= 1.0 and seen["t"].std() > 0.2
