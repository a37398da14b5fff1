"""runs.fit, the one optimiser loop: micro-batch accumulation, the non-finite guard, checkpoint and resume."""
from __future__ import annotations

import pytest
import torch

from fastdiff import runs
from fastdiff.checkpoint import load_checkpoint
from fastdiff.errors import FastdiffError, Preempted

X = torch.linspace(-1, 1, 16).reshape(8, 2)
Y = X @ torch.tensor([[2.0], [-1.0]]) + 0.5


def _fit(tmp_path, loss_fn_of, accumulate=1, total=3, name="a", **kw):
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    fitted = runs.fit(net, opt, total=total, loss_fn=loss_fn_of(gen), lr_at=lambda u: 0.1, gen=gen, salt=0,
                      device=torch.device("cpu"), state_path=tmp_path / f"{name}.pt", ckpt_every=2, label=name,
                      accumulate=accumulate, progress=False, extra_state=lambda: {"config": {}}, **kw)
    return net, fitted


def test_accumulated_micro_batches_make_the_full_batch_update(tmp_path):
    def full(gen):
        return lambda model: (model(X) - Y).pow(2).mean()

    def halves(gen):
        state = {"i": 0}

        def loss(model):
            part = slice(0, 4) if state["i"] % 2 == 0 else slice(4, 8)
            state["i"] += 1
            return (model(X[part]) - Y[part]).pow(2).mean()
        return loss

    a, fitted_a = _fit(tmp_path, full)
    b, fitted_b = _fit(tmp_path, halves, accumulate=2, name="b")
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.bias, b.bias, rtol=0, atol=1e-6)
    assert abs(fitted_a.loss - fitted_b.loss) < 1e-5  # the mean loss of an update is the mean over its micro-batches
    saved = load_checkpoint(tmp_path / "a.pt")
    assert saved["step"] == 3 and len(saved["recent"]) == 3 and "rng" in saved  # the final state is kept too


def test_a_non_finite_loss_stops_with_the_checkpoint_named(tmp_path):
    def exploding(gen):
        return lambda model: model(X).sum() * float("nan")

    with pytest.raises(FastdiffError, match=r"loss became nan in a at update 0; the last good checkpoint .*a\.pt"):
        _fit(tmp_path, exploding)


def test_resumed_fit_equals_an_uninterrupted_one_bit_for_bit(tmp_path):
    def noisy(gen):  # draws from the run's stream, like every real loss
        return lambda model: (model(X + 0.1 * torch.randn(X.shape, generator=gen)) - Y).pow(2).mean()

    whole, _ = _fit(tmp_path, noisy, total=5, name="whole")
    with pytest.raises(Preempted, match="at update 3/5"):
        _fit(tmp_path, noisy, total=5, name="cut", on_step=lambda u: runs.request_stop() if u == 3 else None)
    runs._stop_signal = None
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    runs.fit(net, opt, total=5, loss_fn=noisy(gen), lr_at=lambda u: 0.1, gen=gen, salt=0, device=torch.device("cpu"),
             state_path=tmp_path / "cut.pt", ckpt_every=2, label="cut", resume=load_checkpoint(tmp_path / "cut.pt"),
             progress=False, extra_state=lambda: {"config": {}})
    assert torch.equal(net.weight, whole.weight) and torch.equal(net.bias, whole.bias)
