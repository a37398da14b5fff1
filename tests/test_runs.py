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
    assert saved["update"] == 3 and len(saved["recent"]) == 3 and "rng" in saved  # the final state is kept too


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
    state = load_checkpoint(tmp_path / "cut.pt")
    state["step"] = state.pop("update")  # as earlier versions wrote it: resumes the same
    assert runs.update_of(state) == 3
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    runs.fit(net, opt, total=5, loss_fn=noisy(gen), lr_at=lambda u: 0.1, gen=gen, salt=0, device=torch.device("cpu"),
             state_path=tmp_path / "cut.pt", ckpt_every=2, label="cut", resume=state, progress=False,
             extra_state=lambda: {"config": {}})
    assert torch.equal(net.weight, whole.weight) and torch.equal(net.bias, whole.bias)


def _two_networks(tmp_path, name, total=6, resume=None, **kw):
    """A student and a critic (2 steps per update, as a distiller's critic would), an EMA of the student."""
    from fastdiff.checkpoint import load_resumable

    torch.manual_seed(0)
    student, critic = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    gen = torch.Generator().manual_seed(0)
    calls = {"critic": 0, "student": 0}

    def critic_loss(model):  # the critic fits the student's (detached) residual
        calls["critic"] += 1
        noise = 0.1 * torch.randn(X.shape, generator=gen)
        return (model(X + noise) - (student(X) - Y).detach()).pow(2).mean()

    def student_loss(model):  # the student's loss reads the critic, as a distribution-matching generator's does
        calls["student"] += 1
        return ((model(X) - Y).pow(2) + 0.1 * critic(X).detach() * model(X)).mean()

    nets = {"critic": runs.Trained(critic, torch.optim.Adam(critic.parameters(), lr=0.05), critic_loss, steps=2),
            "student": runs.Trained(student, torch.optim.SGD(student.parameters(), lr=0.1), student_loss)}
    state = load_resumable(tmp_path / f"{name}.pt") if resume else None
    fitted = runs.fit(nets, total=total, lr_at=lambda u: 0.1, gen=gen, salt=0, device=torch.device("cpu"),
                      state_path=tmp_path / f"{name}.pt", ckpt_every=2, label=name, resume=state, progress=False,
                      extra_state=lambda: {"config": {}}, emas={"ema": ("student", 0.9)}, **kw)
    return student, critic, fitted, calls


def test_fit_trains_named_networks_on_a_schedule_and_resumes_them_bit_for_bit(tmp_path):
    """The guarantees of the one loop hold for a set of networks: each its own optimiser and steps per update, an
    EMA of any of them, all saved and restored; a stopped run (the signal path) and a run whose latest checkpoint
    is corrupt (the previous one) both end bit-identical to an uninterrupted one."""
    student, critic, fitted, calls = _two_networks(tmp_path, "whole")
    assert calls == {"critic": 12, "student": 6}  # 2 critic steps, then 1 student step, per update
    saved = load_checkpoint(tmp_path / "whole.pt")
    assert set(saved["modules"]) == set(saved["optimizers"]) == {"critic", "student"} and "model" not in saved
    assert set(saved["emas"]) == {"ema"} and saved["update"] == 6
    ema = fitted.emas["ema"]
    assert not torch.equal(ema.weight, student.weight) and not ema.weight.requires_grad

    with pytest.raises(Preempted, match="at update 3/6"):
        _two_networks(tmp_path, "cut", on_step=lambda u: runs.request_stop() if u == 3 else None)
    runs._stop_signal = None
    s2, c2, f2, calls2 = _two_networks(tmp_path, "cut", resume=True)
    assert calls2 == {"critic": 6, "student": 3}  # only the updates left
    for a, b in ((s2, student), (c2, critic), (f2.emas["ema"], ema)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)

    # a kill mid-write leaves the latest checkpoint unreadable: the previous one (update 2) resumes, same end
    with pytest.raises(Preempted):
        _two_networks(tmp_path, "corrupt", on_step=lambda u: runs.request_stop() if u == 4 else None)
    runs._stop_signal = None
    (tmp_path / "corrupt.pt").write_bytes(b"cut short")
    s3, c3, f3, calls3 = _two_networks(tmp_path, "corrupt", resume=True)
    assert calls3["student"] == 4  # from update 2
    for a, b in ((s3, student), (c3, critic), (f3.emas["ema"], ema)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_a_non_finite_loss_of_a_second_network_names_it(tmp_path):
    net = torch.nn.Linear(2, 1)
    nets = {"critic": runs.Trained(torch.nn.Linear(2, 1), torch.optim.SGD(net.parameters(), lr=0.1),
                                   lambda model: model(X).sum() * float("nan")),
            "student": runs.Trained(net, torch.optim.SGD(net.parameters(), lr=0.1), lambda model: model(X).sum())}
    with pytest.raises(FastdiffError, match=r"loss became nan in a \(critic\) at update 0"):
        runs.fit(nets, total=2, lr_at=lambda u: 0.1, gen=torch.Generator(), salt=0, device=torch.device("cpu"),
                 state_path=tmp_path / "a.pt", ckpt_every=1, label="a", progress=False)
