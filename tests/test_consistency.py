"""Consistency distillation's maths against the exact Gaussian denoiser (fastdiff.analytic)."""
from __future__ import annotations

import pytest
import torch

from fastdiff.analytic import GaussianDenoiser, exact_ddim_step, exact_ode_solution
from fastdiff.distill.consistency import boundaries, cd_loss, ddim_step, distance, heun_step
from fastdiff.errors import FastdiffError
from fastdiff.param import consistency_fn, denoiser
from fastdiff.samplers import consistency
from fastdiff.schedules import Schedule
from test_metrics import one_thread, shared_cache  # noqa: F401  (fixtures: one classifier cache, one CPU thread)

MU, STD = 0.3, 0.6


@pytest.fixture(params=["linear", "cosine"])
def schedule(request):
    return Schedule(request.param, 1000)


def x_at(schedule, t, b=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = MU + STD * torch.randn(b, 2, 3, generator=gen, dtype=torch.float64)
    alpha, sigma = (v.reshape(-1, 1, 1) for v in schedule.alpha_sigma(t))
    return alpha * x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=torch.float64)


def test_boundaries_are_the_karras_grid_without_its_0(schedule):
    ts = boundaries(schedule, 18)
    assert ts.shape == (19,) and bool((ts[1:] > ts[:-1]).all())
    assert ts[0].item() == pytest.approx(1 / 1000) and ts[-1].item() <= 1.0
    with pytest.raises(FastdiffError):
        boundaries(schedule, 0)


def test_one_teacher_ddim_step_is_the_closed_form(schedule):
    den = GaussianDenoiser(MU, STD, schedule, "v")
    step = ddim_step(denoiser(den, schedule, "v"), schedule)
    t, s = torch.full((64,), 0.7, dtype=torch.float64), torch.full((64,), 0.55, dtype=torch.float64)
    x = x_at(schedule, t)
    torch.testing.assert_close(step(x, t, s), exact_ddim_step(den, x, 0.7, 0.55), rtol=1e-12, atol=1e-12)


def test_teacher_steps_have_their_local_order(schedule):
    """Local error against the exact ODE map: O(h^2) for the DDIM (Euler) step, O(h^3) for Heun's: halving h
    divides it by ~4 and ~8."""
    den = GaussianDenoiser(MU, STD, schedule, "eps")
    fn = denoiser(den, schedule, "eps")
    t = torch.full((64,), 0.5, dtype=torch.float64)
    x = x_at(schedule, t)

    def err(step, h):
        return (step(fn, schedule)(x, t, t - h) - exact_ode_solution(den, x, t, t - h)).abs().max().item()

    for step, order in ((ddim_step, 4), (heun_step, 8)):
        ratio = err(step, 0.02) / err(step, 0.01)
        assert order * 0.85 < ratio < order * 1.25


def exact_f(den):
    """The exact consistency function of Gaussian data: the probability-flow ODE map from t to 0."""
    return lambda x, t: exact_ode_solution(den, x, t, torch.zeros_like(t))


def test_exact_ode_map_has_zero_cd_loss_and_a_perturbed_one_does_not(schedule):
    den = GaussianDenoiser(MU, STD, schedule, "eps")
    ts = boundaries(schedule, 18)
    x0 = MU + STD * torch.randn(256, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact_step = lambda x, t, s: exact_ode_solution(den, x, t, s)  # noqa: E731  (an exact teacher ODE step)
    f = exact_f(den)
    for metric in ("l2", "pseudo-huber"):
        loss = cd_loss(f, f, exact_step, x0, schedule, ts, torch.Generator().manual_seed(2), metric)
        assert loss.abs().max() < 1e-10
    perturbed = lambda x, t: f(x, t) + 0.01 * t.reshape(-1, 1, 1)  # noqa: E731  (still f(x, 0) = x)
    loss = cd_loss(perturbed, f, exact_step, x0, schedule, ts, torch.Generator().manual_seed(2), "l2")
    assert loss.mean() > 1e-6


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(7, 6)

    def forward(self, x, t):
        return self.lin(torch.cat([x.flatten(1), t[:, None]], 1)).reshape(x.shape)


@pytest.mark.parametrize("param", ["v", "x0"])
def test_boundary_condition_f_x_0_is_x(schedule, param):
    torch.manual_seed(0)
    f = consistency_fn(Net().double(), schedule, param)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    assert torch.equal(f(x, torch.zeros(5, dtype=torch.float64)), x)
    assert not torch.allclose(f(x, torch.full((5,), 0.5, dtype=torch.float64)), x)


def test_eps_students_are_refused(schedule):
    with pytest.raises(FastdiffError, match="v- or x0-prediction"):
        consistency_fn(Net(), schedule, "eps")


def test_pseudo_huber():
    a = torch.zeros(3, 4, 25)
    assert torch.equal(distance(a, a, "pseudo-huber"), torch.zeros(3))
    c = 0.00054 * 10  # sqrt(d) = 10
    b = a.clone()
    b[0, 0, 0] = 3.0
    assert distance(a, b, "pseudo-huber")[0].item() == pytest.approx((9 + c**2) ** 0.5 - c)
    with pytest.raises(FastdiffError):
        distance(a, b, "lpips")


def test_multistep_sampler_with_one_step_is_one_step_sampling(schedule):
    torch.manual_seed(0)
    net = Net().double()
    top = boundaries(schedule, 18)[-1].item()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    one = consistency(net, x, torch.tensor([top, 0.0], dtype=torch.float64), schedule=schedule, param="v")
    direct = consistency_fn(net, schedule, "v")(x, torch.full((5,), top, dtype=torch.float64))
    assert one.nfe == 1 and torch.equal(one.x, direct)
    two = consistency(net, x, torch.tensor([top, 0.3, 0.0], dtype=torch.float64), schedule=schedule, param="v",
                      generator=torch.Generator().manual_seed(3))
    assert two.nfe == 2 and not torch.equal(two.x, one.x)


def test_multistep_sampler_on_the_exact_consistency_model_returns_data_moments(schedule):
    """With the exact f and fresh noise at every step, each step's output is an exact sample: mean and std of the
    data (a check that re-noising uses alpha_tau x0 + sigma_tau z)."""
    den = GaussianDenoiser(MU, STD, schedule, "x0")

    class Exact(torch.nn.Module):  # outputs F with c_skip x + (1 - c_skip) F = the exact ODE map
        def forward(self, x, t):
            from fastdiff.param import append_dims, c_skip

            t = t.double()
            skip = append_dims(c_skip(schedule, t), x.ndim)
            f = exact_ode_solution(den, x, t, torch.zeros_like(t))
            return (f - skip * x) / (1 - skip)

    top = boundaries(schedule, 18)[-1].item()
    x = torch.randn(20000, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(top))
    x = alpha * MU + (alpha**2 * STD**2 + sigma**2) ** 0.5 * x  # the exact marginal at t_top
    out = consistency(Exact(), x, torch.tensor([top, 0.5, 0.2, 0.0], dtype=torch.float64), schedule=schedule,
                      param="x0", generator=torch.Generator().manual_seed(1)).x
    assert out.mean().item() == pytest.approx(MU, abs=0.02) and out.std().item() == pytest.approx(STD, abs=0.02)


@pytest.mark.slow
def test_cd_run_resumes_to_the_same_weights(tmp_path):
    """A consistency-distillation run stopped mid-way and re-run ends with the weights, target network and cd.csv of
    an uninterrupted run (on a tiny toy2d teacher)."""
    import csv
    import dataclasses

    from fastdiff import runs
    from fastdiff.checkpoint import load_checkpoint
    from fastdiff.distill import distill
    from fastdiff.errors import Preempted
    from test_distill import _tiny_toy

    cfg = _tiny_toy(tmp_path, method="cd", ckpt_every=4, eval_samples=64, **{"cd.updates": 12, "cd.steps": 8,
                                                                           "cd.eval_every": 5})
    ref = distill(dataclasses.replace(cfg, out_dir=str(tmp_path / "ref")), progress=False)

    def stop_at_6(r, update):
        if update == 6:
            runs.request_stop(15)

    with runs.graceful_stop(), pytest.raises(Preempted):
        distill(cfg, progress=False, on_step=stop_at_6)
    seen = []
    run = distill(cfg, progress=False, on_step=lambda r, u: seen.append(u))
    assert seen[0] == 7
    a, b = load_checkpoint(run / "students" / "cd.pt"), load_checkpoint(ref / "students" / "cd.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["method"] == "cd" and a["cd"]["steps"] == 8
    assert a["cost"]["updates"] == 12 and a["cost"]["teacher_evals"] == 12 * cfg.batch_size
    # forward-equivalents: 1 teacher step, 1 target evaluation, 1 student forward + backward (3) per example
    assert a["cost"]["forward_equivalents"] == 12 * cfg.batch_size * (1 + 1 + 3)
    rows = [{k: v for k, v in r.items() if k != "wall_clock_s"} for r in csv.DictReader(open(run / "cd.csv"))]
    assert rows == [{k: v for k, v in r.items() if k != "wall_clock_s"} for r in csv.DictReader(open(ref / "cd.csv"))]
    # snapshots at 5, 10 and the end, each with its cost so far (the EMA weights, restored on resume too)
    assert [(int(r["updates"]), int(r["nfe"])) for r in rows] == [(u, n) for u in (5, 10, 12) for n in (1, 2, 4)]
    assert [int(r["teacher_evals"]) for r in rows[::3]] == [u * cfg.batch_size for u in (5, 10, 12)]
    assert sorted(p.name for p in (run / "students").iterdir()) == ["cd.pt", "cd_u000005.pt", "cd_u000010.pt",
                                                                   "cd_u000012.pt"]


def test_cd_refuses_eps_students(tmp_path, capsys):
    """(Guided CD, LCM-style, is supported: tests/test_text.py distils a text teacher with it.)"""
    from fastdiff.distill.cli import main
    from fastdiff.errors import run_cli

    assert run_cli(main, ["--method", "cd", "--param", "eps", "--out-dir", str(tmp_path / "a")]) == 2
    assert "--method cd needs --param v or x0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_pd_and_cd_students_join_the_sweep_as_their_own_families(tmp_path, shared_cache):
    import csv
    import dataclasses

    from fastdiff.bench import main as bench_main
    from fastdiff.distill import distill
    from fastdiff.report import write_report
    from test_distill import _tiny_toy

    cfg = _tiny_toy(tmp_path, method="pd+cd", eval_samples=64, **{"cd.updates": 4, "cd.steps": 8})
    run = distill(dataclasses.replace(cfg), progress=False)
    out = tmp_path / "results"
    assert bench_main(["--distill-dir", str(run), "--samplers", "consistency,distilled,ddim", "--steps", "1,2,16",
                       "--n-samples", "64", "--batch-size", "64", "--metrics", "fid", "--out-dir", str(out),
                       "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out / "toy2d" / "fid_vs_steps.csv")))
    cd_rows = {(r["grid"], int(r["steps"]), int(r["nfe"])) for r in rows if r["sampler"] == "consistency"}
    assert cd_rows == {("cd8", 1, 1), ("cd8", 2, 2)}  # 16 > N = 8 steps: not sampled
    report = write_report(out).read_text()
    assert "consistency student (cd8, multistep)" in report and "What each student cost to make" in report
    cd = [r for r in rows if r["sampler"] == "consistency"]
    assert {r["train_updates"] for r in cd} == {"4"} and {r["train_teacher_evals"] for r in cd} == {str(4 * 512)}
    assert {r["train_updates"] for r in rows if r["sampler"] == "ddim"} == {""}  # the teacher's rows
    pd = {int(r["steps"]): r["train_updates"] for r in rows if r["sampler"] == "distilled"}
    assert pd == {2: "60", 1: "120"}  # both methods from one run dir: PD's rounds, then CD
    # distill's own sweep and report put the methods' training points beside the sweep: FID vs training cost
    from fastdiff.distill import sweep_and_report

    report = sweep_and_report(run, dataclasses.replace(cfg, results_dir=str(tmp_path / "res"), bench=True,
                                                       bench_samples=64, bench_steps=(1, 2)))
    text = report.read_text()
    assert "![FID vs training cost](toy2d/fid_vs_training_cost.png)" in text
    assert "consistency: updates (forward-equivalents) to reach the progressive FID" in text
    points = list(csv.DictReader(open(tmp_path / "res" / "toy2d" / "training.csv")))
    pd_points = {(int(r["nfe"]), int(r["updates"])) for r in points if r["method"] == "progressive"}
    assert pd_points == {(2, 60), (1, 120)}  # each round's student at its cumulative updates
    cd_points = [r for r in points if r["method"] == "consistency"]
    assert {(int(r["nfe"]), int(r["updates"])) for r in cd_points} == {(1, 4), (2, 4), (4, 4)}  # its one student
    assert all(float(r["forward_equivalents"]) > 0 for r in points)


def test_cd_gets_the_pd_rounds_updates_and_snapshots_at_each_pd_students_cost():
    """Equal cost by default: CD runs as many updates (same batch) as the PD rounds of the same config and saves a
    student where each PD student is done, so that the report compares the two at equal updates."""
    from fastdiff import config as cfgs
    from fastdiff.distill.config import PRESETS
    from fastdiff.distill.consistency import cd_snapshots, cd_total
    from fastdiff.distill.pd import pd_costs, round_updates

    cfg = PRESETS["digits"]
    assert cfg.method == "pd+cd+dmd2" and cfg.cd.updates == 0
    costs = pd_costs(cfg)
    assert costs == [sum(round_updates(cfg, i) for i in range(r + 1)) for r in range(6)]
    assert cd_total(cfg) == costs[-1] and cd_snapshots(cfg) == costs
    every = cfgs.replace(cfg, {"cd.eval_every": costs[0] * 3})
    assert cd_snapshots(every) == sorted(set(costs) | set(range(costs[0] * 3, costs[-1], costs[0] * 3)))
    short = cfgs.replace(cfg, {"cd.updates": costs[1] + 1})
    assert cd_total(short) == costs[1] + 1 and cd_snapshots(short) == costs[:2] + [costs[1] + 1]


def test_bare_bool_flags_and_the_full_sweep_option(monkeypatch, tmp_path):
    """`--full` alone means true; without it the distill sweep leaves out DDIM eta = 1, DPM-Solver++(3M) and three
    UniPC variants (and keeps DDPM on the full grid and strided DDPM), with it they and 10 and 20 steps are swept (an
    explicit --bench-samplers wins)."""
    import fastdiff.distill.cli as cli
    from fastdiff import config as cfgs
    from fastdiff import runs
    from fastdiff.distill.config import PRESETS, DistillConfig

    cfg, _ = runs.config_from_argv(["--full"], DistillConfig, PRESETS, "x", "")
    assert cfg.full is True
    cfg, _ = runs.config_from_argv(["--full", "false"], DistillConfig, PRESETS, "x", "")
    assert cfg.full is False
    seen = []

    class Stop(Exception):
        pass

    def fake_sweep(bcfg):
        seen.append(bcfg)
        raise Stop

    monkeypatch.setattr(cli, "run_sweep", fake_sweep)
    for full in (False, True):
        with pytest.raises(Stop):
            cli.sweep_and_report(tmp_path, cfgs.replace(PRESETS["digits"], {"full": full}))
    lean, full = seen
    assert not set(cli.FULL_ONLY_SAMPLERS) & set(lean.samplers) and set(cli.FULL_ONLY_SAMPLERS) <= set(full.samplers)
    assert {"consistency", "distilled", "ddpm", "ddpm-strided", "ddim", "dpm++2m", "unipc2-bh2",
            "heun"} <= set(lean.samplers)
    assert lean.steps == (1, 2, 4, 8, 16, 32, 64) and full.steps == (1, 2, 4, 8, 10, 16, 20, 32, 64)
    with pytest.raises(Stop):
        cli.sweep_and_report(tmp_path, cfgs.replace(PRESETS["digits"], {"bench_samplers": ("ddpm", "ddim")}))
    assert seen[-1].samplers == ("ddpm", "ddim")


def test_a_pd_run_dir_does_not_depend_on_the_cd_fields(tmp_path):
    """A PD-only run dir re-run with other consistency settings is the same run (they are not read); a pd+cd one
    is refused."""
    import json

    from fastdiff import config as cfgs
    from fastdiff.distill.cli import check_distill_dir
    from fastdiff.distill.config import DistillConfig
    from fastdiff.errors import FastdiffError

    out = tmp_path / "run"
    pd = DistillConfig(method="pd", out_dir=str(out), teacher=str(tmp_path / "t.pt"))
    (out).mkdir()
    (out / "config.json").write_text(json.dumps(check_distill_dir(pd)))
    check_distill_dir(cfgs.replace(pd, {"cd.updates": 2000, "cd.target_ema": 0.0}))
    with pytest.raises(FastdiffError, match="different config"):
        check_distill_dir(cfgs.replace(pd, {"method": "pd+cd"}))
