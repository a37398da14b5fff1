"""DMD2 (fastdiff.distill.dmd2): the distribution-matching gradient on Gaussians against its closed form, a 1-D
Gaussian generator that learns the data by it, the fake-score loss, the update schedule, bit-exact resume of a run
stopped between a fake-score and a generator update, export, and refusals."""
from __future__ import annotations

import csv
import dataclasses

import pytest
import torch

import fastdiff
from fastdiff import config as cfgs
from fastdiff import runs
from fastdiff.analytic import GaussianDenoiser
from fastdiff.distill import dmd2
from fastdiff.errors import Preempted, run_cli
from fastdiff.schedules import Schedule
from test_metrics import shared_cache  # noqa: F401  (fixture: one classifier cache)

SCHEDULE = Schedule("cosine", 1000)


def _gauss_x0(mu, std):
    return lambda x_t, t: GaussianDenoiser(mu, std, SCHEDULE, "x0").x0(x_t, t)


def test_the_distribution_matching_direction_is_its_closed_form_on_gaussians():
    """Data N(mu_d, s_d^2), generator N(mu_g, s_g^2), both scores exact. At one t, before the per-example normaliser,
    E[x0^_fake - x0^_real] = (mu_g - mu_d)(1 - alpha k_d) and E[(x0^_fake - x0^_real) xi] = alpha s_g (k_g - k_d) with
    k = alpha s^2/(alpha^2 s^2 + sigma^2), x = mu_g + s_g xi; the normalised direction is that difference over
    mean|x - x0^_real|; the surrogate's gradient in x is the direction over x.numel(); all zero where the generator
    is the data."""
    mu_d, s_d, mu_g, s_g, n = 0.3, 0.5, -0.4, 0.9, 400_000
    gen = torch.Generator().manual_seed(0)
    for t in (0.2, 0.5, 0.8):
        xi = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        x = mu_g + s_g * xi
        tt = torch.full((n,), t, dtype=torch.float64)
        alpha, sigma = (float(v) for v in SCHEDULE.alpha_sigma(t))
        x_t = alpha * x + sigma * torch.randn(n, 1, generator=gen, dtype=torch.float64)
        real, fake = _gauss_x0(mu_d, s_d)(x_t, tt), _gauss_x0(mu_g, s_g)(x_t, tt)
        k = lambda s: alpha * s**2 / (alpha**2 * s**2 + sigma**2)  # noqa: E731
        diff = fake - real
        for got, want in ((diff.mean(), (mu_g - mu_d) * (1 - alpha * k(s_d))),
                          ((diff * xi).mean(), alpha * s_g * (k(s_g) - k(s_d)))):
            se = (diff.std() if got is diff.mean() else (diff * xi).std()) / n**0.5
            assert abs(float(got) - want) < 5 * float(se), (t, float(got), want)
        direction = dmd2.dm_direction(x, real, fake)
        torch.testing.assert_close(direction * (x - real).abs(), diff, rtol=1e-12, atol=1e-12)
        assert torch.equal(dmd2.dm_direction(x, real, real), torch.zeros_like(x))  # generator = data: zero
    # the surrogate's gradient in x
    x = (mu_g + s_g * torch.randn(64, 3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    t = torch.full((64,), 0.5, dtype=torch.float64)
    loss = dmd2.dm_loss(x, t, _gauss_x0(mu_d, s_d), _gauss_x0(mu_g, s_g), SCHEDULE, torch.Generator().manual_seed(1))
    loss.backward()
    x_t, _, _, _ = dmd2.noised(x.detach(), t, SCHEDULE, torch.Generator().manual_seed(1))
    want = dmd2.dm_direction(x.detach(), _gauss_x0(mu_d, s_d)(x_t, t), _gauss_x0(mu_g, s_g)(x_t, t)) / x.numel()
    torch.testing.assert_close(x.grad, want, rtol=1e-12, atol=1e-15)


def test_a_gaussian_generator_learns_the_data_by_distribution_matching():
    """x = a z + b, z ~ N(0, 1), trained by dm_loss alone with t ~ U[0.02, 0.98], the exact data denoiser as the real
    score and the exact denoiser of the generator's own N(b, a^2) as the fake score (an ideal fake-score network):
    300 Adam updates (batch 4096, lr 0.05) from (a, b) = (1.5, -1) reach the data's N(0.5, 0.6^2) within 0.01
    (measured: 0.601, 0.500 after 200 updates and after 600; at lr 0.02, 600 updates: 0.617, 0.559)."""
    mu_d, s_d = 0.5, 0.6
    a = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        x = a * torch.randn(4096, 1, generator=gen, dtype=torch.float64) + b
        t = 0.02 + 0.96 * torch.rand(4096, generator=gen, dtype=torch.float64)
        fake = _gauss_x0(float(b.detach()), abs(float(a.detach())))
        loss = dmd2.dm_loss(x, t, _gauss_x0(mu_d, s_d), fake, SCHEDULE, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    a, b = float(a.detach()), float(b.detach())
    assert abs(b - mu_d) < 0.01 and abs(abs(a) - s_d) < 0.01, (a, b)


def test_the_fake_score_loss_is_the_teachers_denoising_loss_on_generator_samples():
    """On samples of N(mu_g, s_g^2) the exact denoiser of that Gaussian has the least loss (the data's is worse),
    and no gradient reaches the samples."""
    gen = torch.Generator().manual_seed(0)
    x = (-0.4 + 0.9 * torch.randn(20_000, 1, generator=gen, dtype=torch.float64)).requires_grad_(True)
    own, data = GaussianDenoiser(-0.4, 0.9, SCHEDULE, "v"), GaussianDenoiser(0.3, 0.5, SCHEDULE, "v")
    losses = [float(dmd2.fake_score_loss(net, x, SCHEDULE, "v", "snr-trunc", torch.Generator().manual_seed(1)))
              for net in (own, data)]
    assert losses[0] < 0.7 * losses[1], losses
    own_loss = dmd2.fake_score_loss(lambda z, t: own(z, t) * 1.0, x, SCHEDULE, "v", "snr-trunc", gen)
    assert not own_loss.requires_grad  # generator samples are detached


def test_options_are_checked_before_anything_is_written(tmp_path, capsys):
    from fastdiff.distill.cli import main

    for argv, message in ((["--dmd2.fake-updates", "0"], "--dmd2.fake-updates must be >= 1, got 0"),
                          (["--dmd2.t-max", "0.01"], "--dmd2.t-max must be in (0.02, 1]"),
                          (["--param", "eps"], "--method dmd2 needs --param v or x0"),
                          (["--dmd2.steps", "0"], "--dmd2.steps must be >= 1, got 0")):
        out = tmp_path / "run"
        assert run_cli(main, ["--preset", "toy2d", "--method", "dmd2", "--out-dir", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()


def test_the_cost_and_the_equal_cost_budgets():
    """Per update and example: 5 fake steps of (generator forward 1 + fake forward/backward 3), the generator's
    forward/backward 3, a teacher and a fake-score evaluation: 25; a 4-step generator adds 1.5 forwards per generator
    pass of backward simulation. With --dmd2.updates 0 it gets the PD rounds' forward-equivalents and snapshots at
    each PD student's."""
    from fastdiff.distill.config import PRESETS
    from fastdiff.distill.protocol import forward_equivalents, get_method

    cfg = cfgs.replace(PRESETS["digits"], {"dmd2.fake_updates": 5})  # DMD2's own (the preset takes 2)
    assert PRESETS["digits"].dmd2.fake_updates == 2 and get_method("dmd2").total(PRESETS["digits"]) == 462
    method, pd = get_method("dmd2"), get_method("pd")
    assert forward_equivalents(method.update_cost(cfg), 1) == 25 * cfg.batch_size
    four = cfgs.replace(cfg, {"dmd2.steps": 4})
    assert method.update_cost(four)["generator"] == (5 * 2.5 + 1.5 + 3) * cfg.batch_size
    pd_fe = [forward_equivalents(pd.update_cost(cfg), u) for u in pd.budgets(cfg)]
    assert method.budgets(cfg) == [round(f / (25 * cfg.batch_size)) for f in pd_fe] == [20, 40, 60, 80, 160, 240]
    assert method.total(cfg) == 240 and method.total(cfgs.replace(cfg, {"dmd2.updates": 7})) == 7


@pytest.mark.slow
def test_a_dmd2_run_follows_its_schedule_resumes_bit_for_bit_and_joins_the_sweep(tmp_path, shared_cache,
                                                                               monkeypatch):
    """A 2-step generator on a tiny toy2d teacher: 5 fake-score updates, then one generator update, per update; a
    run stopped during a fake-score update (the stop lands after that update, state.pt written) resumes to the
    weights of an uninterrupted run; its students name their role, cost and own evaluation; the sweep samples them
    at 1 and 2 steps on student2."""
    from fastdiff.checkpoint import load_checkpoint
    from fastdiff.distill import distill, sweep_and_report
    from test_distill import _tiny_toy

    cfg = _tiny_toy(tmp_path, method="dmd2", eval_samples=64, batch_size=64, ckpt_every=2,
                    **{"dmd2.updates": 5, "dmd2.steps": 2, "dmd2.eval_every": 2, "dmd2.lr": 1e-4})
    calls = []
    fake_loss, dm_loss = dmd2.fake_score_loss, dmd2.dm_loss
    monkeypatch.setattr(dmd2, "fake_score_loss", lambda *a, **k: calls.append("F") or fake_loss(*a, **k))
    monkeypatch.setattr(dmd2, "dm_loss", lambda *a, **k: calls.append("G") or dm_loss(*a, **k))
    ref = distill(dataclasses.replace(cfg, out_dir=str(tmp_path / "ref")), progress=False)
    assert "".join(calls) == "FFFFFG" * 5

    calls.clear()
    stop_after = 3 * 6 + 2  # in update 4, between its 2nd and 3rd fake-score step

    def fake_then_stop(*a, **k):
        calls.append("F")
        if len(calls) == stop_after:
            runs.request_stop(15)
        return fake_loss(*a, **k)

    monkeypatch.setattr(dmd2, "fake_score_loss", fake_then_stop)
    with runs.graceful_stop(), pytest.raises(Preempted, match="at update 4/5"):
        distill(cfg, progress=False)
    state = load_checkpoint(tmp_path / "distill" / "state.pt")
    assert state["stage"] == "dmd2" and state["update"] == 4 and set(state["modules"]) == {"fake_score", "generator"}
    run = distill(cfg, progress=False)
    a, b = load_checkpoint(run / "students" / "dmd2.pt"), load_checkpoint(ref / "students" / "dmd2.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # bit for bit
    student = fastdiff.load_student(run / "students" / "dmd2.pt")
    assert (student.method, student.sampler, student.role["grid"], student.role["steps"]) == ("dmd2", "dmd2",
                                                                                           "student2", 2)
    assert student.cost["forward_equivalents"] == 5 * 64 * (1 + (5 * 1.5 + 0.5 + 3) + 16)
    assert [e["nfe"] for e in student.role["evaluation"]] == [1, 2]
    assert sorted(p.name for p in (run / "students").glob("dmd2_u*.pt")) == ["dmd2_u000002.pt", "dmd2_u000004.pt",
                                                                             "dmd2_u000005.pt"]

    report = sweep_and_report(run, cfgs.replace(cfg, {"results_dir": str(tmp_path / "res"), "bench": True,
                                                      "bench_samples": 64, "bench_steps": (1, 2),
                                                      "bench_samplers": ("ddim", "dmd2")}))
    rows = [r for r in csv.DictReader(open(tmp_path / "res" / "toy2d" / "fid_vs_steps.csv")) if r["sampler"] == "dmd2"]
    assert {(r["grid"], r["steps"], r["nfe"]) for r in rows} == {("student2", "1", "1"), ("student2", "2", "2")}
    assert "DMD2 student (student2, re-noised)" in report.read_text()
    points = [r for r in csv.DictReader(open(tmp_path / "res" / "toy2d" / "training.csv"))]
    assert {(r["method"], r["nfe"], r["updates"]) for r in points} == {("distribution matching", n, u) for n in "12"
                                                                        for u in "245"}


@pytest.mark.slow
def test_a_one_step_dmd2_student_exports_and_a_multistep_one_is_refused(tmp_path, shared_cache, capsys):
    """Of a tiny diffusers UNet2DModel teacher: the 1-step generator exports as a DDIMPipeline (one DDIM step from
    t = 1 is its sampler; export samples the folder with diffusers and compares); a 2-step one (trained with the GAN
    head) is refused with the reason, writing nothing."""
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.checkpoint import load_checkpoint
    from fastdiff.distill.cli import main as distill_main
    from fastdiff.export import main as export_main
    from test_diffusers import T, tiny_unet

    pipe_dir = tmp_path / "ddpm"
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler(num_train_timesteps=T)).save_pretrained(
        pipe_dir)
    common = ["--teacher", str(pipe_dir), "--dataset", "digits", "--method", "dmd2", "--batch-size", "8",
              "--eval-samples", "16", "--bench", "false", "--dmd2.updates", "2", "--dmd2.fake-updates", "2"]
    assert distill_main([*common, "--out-dir", str(tmp_path / "one")]) == 0
    assert export_main([str(tmp_path / "one"), "--out", str(tmp_path / "export"), "--check", "4"]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert "| method | distribution-matching distillation, DMD2 (Yin et al. 2024) |" in card
    assert "diffusers DDIMPipeline max rel diff" in card
    student = fastdiff.load_student(tmp_path / "one" / "students" / "dmd2.pt")
    assert fastdiff.load_model(tmp_path / "export").hash == student.hash
    # a 2-step generator, with DMD2's GAN head on the fake score's bottleneck (the diffusers UNet's mid_block)
    assert distill_main([*common, "--dmd2.steps", "2", "--dmd2.gan", "--out-dir", str(tmp_path / "two")]) == 0
    state = load_checkpoint(tmp_path / "two" / "state.pt")
    assert any(k.startswith("head.") for k in state["modules"]["fake_score"])
    two = fastdiff.load_student(tmp_path / "two" / "students" / "dmd2.pt")
    # per update and example: teacher 1; generator 2 x (1 + 0.5) + 0.5 + 3; fake 2 x (3 + 2 x 3) + 1 + 3
    assert two.cost["forward_equivalents"] == 2 * 8 * (1 + 6.5 + 22)
    capsys.readouterr()
    assert run_cli(export_main, [str(tmp_path / "two" / "students" / "dmd2.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "a distribution-matching (DMD2) student does not export to a stock diffusers pipeline: an N-step DMD2" \
        in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_report_compares_three_methods_at_equal_forward_equivalents(tmp_path):
    """training.csv with PD (5 fwd-eq per example and update), CD (5) and DMD2 (25): the equal-cost line pairs each
    PD student with the others' snapshots at the same forward-equivalents (DMD2 at a fifth of the updates), the
    training-cost table and figure use forward-equivalents, and a method without a point at an NFE is left out there."""
    from fastdiff.report.readme import equal_cost
    from fastdiff.report.training import TRAINING, training_section

    rows = ["method,short,nfe,updates,forward_equivalents,wall_clock_s,metric,value",
            "progressive,PD,2,400,256000,1,fid,3.0", "progressive,PD,1,1200,768000,2,fid,2.5",
            "consistency,CD,1,400,256000,1,fid,9.0", "consistency,CD,2,400,256000,1,fid,8.0",
            "consistency,CD,1,1200,768000,2,fid,5.0", "consistency,CD,2,1200,768000,2,fid,4.0",
            "distribution matching,DMD2,1,80,256000,1,fid,20.0", "distribution matching,DMD2,1,240,768000,2,fid,1.5"]
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / TRAINING).write_text("\n".join(rows) + "\n")
    text = equal_cost(tmp_path / "digits")[0]
    assert text.startswith("At equal cost (forward-equivalents of the same batch (a backward = 2 forwards")
    assert "1 NFE at 7.68e+05 forward-equivalents (PD: 1200 updates): PD 2.5, CD 5, DMD2 1.5" in text
    assert "; 2 NFE at 2.56e+05 forward-equivalents (PD: 400 updates): PD 3, CD 8." in text  # no 2-NFE DMD2
    assert "DMD2's best over its run: 1.5 at 1 NFE (240 updates); it ran 240 updates." in text
    section = "\n".join(training_section(tmp_path / "digits", tmp_path))
    assert "| NFE | progressive: FID at updates (forward-equivalents) |" in section
    assert "| 1 | 2.5 at 1200 (7.68e+05 fwd-eq) | 5 at 1200 (7.68e+05 fwd-eq) | never | 1.5 at 240 (7.68e+05 fwd-eq) " \
           "| 240 (7.68e+05 fwd-eq) |" in section
    assert (tmp_path / "digits" / "fid_vs_training_cost.png").is_file()


@pytest.mark.slow
def test_a_guided_teacher_is_distilled_into_a_conditional_generator_without_a_w_input(tmp_path, shared_cache):
    """A tiny class-conditional toy2d teacher, --guided: the real score is the CFG teacher at --dmd2.guidance (two
    teacher evaluations per example and update), the generator is conditional on the class with no w input, its own
    evaluation compares it with the CFG teacher at that w; a guided sweep is refused until it exists."""
    from fastdiff.distill import PRESETS, distill
    from fastdiff.errors import FastdiffError
    from fastdiff.train import PRESETS as TRAIN
    from fastdiff.train import train

    teacher = dataclasses.replace(TRAIN["toy2d"], cond="class", updates=60, hidden=32, layers=1, batch_size=64,
                                  out_dir=str(tmp_path / "teacher"), sample_every=10_000)
    train(teacher, progress=False)
    cfg = cfgs.replace(PRESETS["digits-guided"], {
        "teacher": str(tmp_path / "teacher"), "teacher_preset": "toy2d", "method": "dmd2", "batch_size": 64,
        "eval_samples": 64, "out_dir": str(tmp_path / "distill"), "bench": False,
        "dmd2.updates": 3, "dmd2.fake_updates": 2, "dmd2.guidance": 3.0})
    with pytest.raises(FastdiffError, match="pass --bench false"):
        distill(cfgs.replace(cfg, {"bench": True}), progress=False)
    run = distill(cfg, progress=False)
    student = fastdiff.load_student(run / "students" / "dmd2.pt")
    assert student.config["scalar_cond"] is False and student.config["cond"] == "class"
    assert student.cost["forward_equivalents_by_network"]["teacher"] == 3 * 64 * 2
    y = torch.zeros(4, dtype=torch.long)
    assert student.net(torch.zeros(4, 2), torch.full((4,), 0.5), y).shape == (4, 2)  # class input, no w
    assert [e["nfe"] for e in student.role["evaluation"]] == [1]
