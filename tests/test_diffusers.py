"""diffusers interop: teachers in, students out, and parity of fastdiff's samplers with diffusers' schedulers.

Every model here is a tiny random UNet2DModel built from a config in the test (no downloads). In CI (CI=true)
a missing diffusers is a failure, not a skip: .ci/run installs the `diffusers` extra.
"""
from __future__ import annotations

import copy
import json
import logging
import os

import pytest
import torch

try:
    import diffusers
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip('diffusers is not installed: pip install -e ".[diffusers]"', allow_module_level=True)

import fastdiff
from fastdiff.errors import FastdiffError
from fastdiff.interop import schedule_from_scheduler
from fastdiff.models.diffusers_unet import timesteps
from fastdiff.samplers import ddim, ddpm, distilled, dpm_solver_pp_2m, dpm_solver_pp_3m, initial_noise, unipc
from test_metrics import one_thread, shared_cache  # noqa: F401  (fixtures: one classifier cache, one CPU thread)

T = 1000


def tiny_unet(seed=0, **kw) -> "diffusers.UNet2DModel":
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), **kw)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    """A DDPMPipeline folder as save_pretrained writes it: linear betas, epsilon prediction, T = 1000."""
    path = tmp_path_factory.mktemp("diffusers") / "ddpm"
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler(num_train_timesteps=T)).save_pretrained(
        path)
    return path


@pytest.fixture(scope="module")
def teacher(pipe_dir):
    return fastdiff.load_model(pipe_dir, dataset="digits")


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def run_diffusers(sched, unet, x, **step_kw):
    with torch.no_grad():
        for tau in sched.timesteps:
            x = sched.step(unet(x, tau).sample, tau, x, **step_kw).prev_sample
    return x


def in_float64(sched, net):
    """diffusers' scheduler formulas on float64 alpha_bar (the float64 cumulative product of its own betas, which is
    what fastdiff's schedule holds) and the network in float64: any difference left is a difference of formulas."""
    sched = copy.deepcopy(sched)
    sched.alphas_cumprod = torch.cumprod(1 - sched.betas.double(), 0)
    sched.one = sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched, copy.deepcopy(net).double()


# --- the schedule and the time convention -------------------------------------------------------------------------

@pytest.mark.parametrize("config", [{}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
                                    {"beta_schedule": "squaredcos_cap_v2"}, {"trained_betas": [0.1, 0.2, 0.5, 0.9]},
                                    {"num_train_timesteps": 50, "beta_start": 1e-3, "beta_end": 0.05}])
def test_schedule_is_the_schedulers_own_betas(config):
    sched = diffusers.DDPMScheduler(**config)
    schedule, param, _ = schedule_from_scheduler(dict(sched.config))
    n = len(sched.betas)
    assert param == "eps" and schedule.T == n
    assert torch.equal(schedule.discrete_betas(), sched.betas.double())  # widened, not recomputed
    k = torch.arange(1, n + 1, dtype=torch.float64)
    # fastdiff's alpha_bar(k/T) is diffusers' alphas_cumprod[k-1] (diffusers multiplies in float32)
    torch.testing.assert_close(schedule.alpha_bar(k / n), sched.alphas_cumprod.double(), rtol=2e-6, atol=0)
    mid = schedule.alpha_bar((k[:-1] + 0.5) / n)  # log alpha_bar interpolated linearly between grid points
    torch.testing.assert_close(mid.log(), (schedule.alpha_bar(k[:-1] / n).log() + schedule.alpha_bar(k[1:] / n).log())
                               / 2, rtol=1e-12, atol=1e-12)


def test_network_time_is_tau_equals_tT_minus_1(teacher, x_T):
    """t = k/T in float32 (as samplers pass it) calls the UNet at exactly timestep k - 1."""
    k = torch.tensor([1, 2, 250, 500, 999, 1000])
    tau = timesteps((k.double() / T).float(), T, discrete=True)
    assert torch.equal(tau, (k - 1).float())
    x = x_T[:1].expand(len(k), -1, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(teacher.net(x, (k.double() / T).float()), teacher.net.unet(x, k - 1).sample,
                                   rtol=0, atol=0)


def test_discrete_teacher_is_clamped_at_timestep_0_with_a_warning(teacher, x_T, caplog):
    net = copy.deepcopy(teacher.net)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        out = net(x_T[:2], torch.tensor([0.2 / T, 0.5 / T]))
        ref = net.unet(x_T[:2], torch.zeros(2)).sample
    assert torch.equal(out, ref) and "clamped to timestep 0" in caplog.text
    torch.testing.assert_close(timesteps(torch.tensor([0.5 / T]), T, discrete=False), torch.tensor([-0.5]))  # kept


# --- sampler parity ---------------------------------------------------------------------------------------------

def ddim_pairs(sched, N):
    """diffusers' DDIM steps from tau to tau - T//N (its rule for every spacing), as fastdiff two-point grids."""
    out = []
    for tau in sched.timesteps.tolist():
        prev = tau - T // N
        out.append(torch.tensor([(tau + 1) / T, (prev + 1) / T if prev >= 0 else 0.0], dtype=torch.float64))
    return out


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("N", [10, 7])
def test_ddim_parity(teacher, x_T, spacing, N):
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    sched.set_timesteps(N)
    pairs = ddim_pairs(sched, N)
    # diffusers' DDIM steps to tau - T//N whatever the spacing: a grid only when that is the next timestep
    is_grid = all(torch.equal(a[1], b[0]) for a, b in zip(pairs, pairs[1:])) and pairs[-1][1] == 0
    assert is_grid == (spacing == "leading" or (spacing == "trailing" and T % N == 0))

    def fastdiff_run(net, x):
        with torch.no_grad():
            if is_grid:  # one call over the whole grid
                ts = torch.cat([p[:1] for p in pairs] + [torch.zeros(1, dtype=torch.float64)])
                return ddim(net, x, ts, schedule=teacher.schedule, param="eps", clip=True).x
            for ts in pairs:  # the documented difference: step by step, the state moved to tau - T//N
                x = ddim(net, x, ts, schedule=teacher.schedule, param="eps", clip=True).x
            return x

    s64, unet64 = in_float64(sched, teacher.net.unet)
    net64 = copy.deepcopy(teacher.net).double()
    ref64 = run_diffusers(s64, unet64, x_T.double(), eta=0.0, use_clipped_model_output=True)
    assert rel(fastdiff_run(net64, x_T.double()), ref64) < 1e-12
    ref32 = run_diffusers(sched, teacher.net.unet, x_T, eta=0.0, use_clipped_model_output=True)
    # float32: both sit ~1e-5 from their float64 result (x0 = (x - sigma eps)/alpha with 1/alpha ~ 156 at t = 1)
    assert rel(fastdiff_run(teacher.net, x_T), ref32) < 2e-5
    assert rel(ref32, ref64.float()) < 2e-5


def test_ddim_default_keeps_the_unclipped_eps(teacher, x_T):
    """diffusers' DDIM (use_clipped_model_output=False, its default) moves along the network's eps after clipping
    x0; fastdiff re-derives eps from the clipped x0 (GLIDE, and diffusers with use_clipped_model_output=True)."""
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    sched.set_timesteps(4)
    ts = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    with torch.no_grad():
        ours = ddim(teacher.net, x_T, ts, schedule=teacher.schedule, param="eps", clip=True).x
    assert rel(ours, run_diffusers(sched, teacher.net.unet, x_T, eta=0.0, use_clipped_model_output=True)) < 5e-5
    assert rel(ours, run_diffusers(sched, teacher.net.unet, x_T, eta=0.0)) > 1e-2  # the random UNet clips often


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_parity(teacher, x_T, variance):
    taus = [999, 799, 499, 199, 49, 0]
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, variance_type=variance)
    sched.set_timesteps(timesteps=taus)
    ts = torch.tensor([(t + 1) / T for t in taus] + [0.0], dtype=torch.float64)
    s64, unet64 = in_float64(sched, teacher.net.unet)
    net64 = copy.deepcopy(teacher.net).double()
    kw = dict(schedule=teacher.schedule, param="eps", clip=True, variance=variance.split("_")[1])
    with torch.no_grad():
        ours64 = ddpm(net64, x_T.double(), ts, generator=torch.Generator().manual_seed(5), **kw).x
        ours32 = ddpm(teacher.net, x_T, ts, generator=torch.Generator().manual_seed(5), **kw).x
    ref64 = run_diffusers(s64, unet64, x_T.double(), generator=torch.Generator().manual_seed(5))
    ref32 = run_diffusers(sched, teacher.net.unet, x_T, generator=torch.Generator().manual_seed(5))
    assert rel(ours64, ref64) < 1e-12
    assert rel(ours32, ref32) < 2e-5


def test_strided_ddpm_ending_above_0_adds_noise_in_diffusers(teacher, x_T):
    """DDPMScheduler adds noise whenever its timestep is > 0: on a strided grid ending at tau = 99 its last step
    (to alpha_bar = 1) adds N(0, 1 - alpha_bar_99) under fixed_large; fastdiff never adds noise on the step to 0."""
    taus = [999, 499, 99]
    sched, unet64 = in_float64(diffusers.DDPMScheduler(num_train_timesteps=T, variance_type="fixed_large"),
                               teacher.net.unet)
    sched.set_timesteps(timesteps=taus)
    gen = torch.Generator().manual_seed(3)
    ref = run_diffusers(sched, unet64, x_T.double(), generator=gen)
    gen2 = torch.Generator().manual_seed(3)
    ts = torch.tensor([(t + 1) / T for t in taus] + [0.0], dtype=torch.float64)
    with torch.no_grad():
        ours = ddpm(copy.deepcopy(teacher.net).double(), x_T.double(), ts, schedule=teacher.schedule, param="eps",
                    clip=True, generator=gen2, variance="large").x
    z_last = torch.randn(x_T.shape, generator=gen2, dtype=torch.float64)  # the draw fastdiff skips
    var = 1 - teacher.schedule.alpha_bar(100 / T)
    torch.testing.assert_close(ref - ours, var.sqrt() * z_last, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("order, taus", [(2, [999, 599, 299, 99, 19]), (2, list(range(999, 0, -100))),
                                         (3, [999, 599, 299, 99, 19]), (3, list(range(999, 0, -100))),
                                         (3, list(range(999, 0, -66)))])
def test_dpm_solver_pp_multistep_parity(teacher, x_T, order, taus):
    """DPM-Solver++(2M) and (3M) against DPMSolverMultistepScheduler(solver_order=2|3). 3M: orders 1, 2, 3, ..., 3,
    then the step to sigma = 0, which diffusers takes at first order whatever the grid (final_sigmas_type="zero":
    sigma_t/sigma_s x + alpha_t (1 - e^{-inf}) x0 = x0_hat, fastdiff returns x0_hat); below 15 steps (5 and 10
    here) lower_order_final also makes the step before it second order, from 15 on (16 here) it stays third order.
    float32 on both sides, as diffusers computes the update in float32 whatever the input dtype: both are ~1e-7
    from exact (x0_hat = (x - sigma eps)/alpha, 1/alpha ~ 156 at t = 1)."""
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, algorithm_type="dpmsolver++",
                                                  solver_order=order, final_sigmas_type="zero")
    sched.set_timesteps(timesteps=taus)
    ts = torch.tensor([(t + 1) / T for t in taus] + [0.0], dtype=torch.float64)
    solver = dpm_solver_pp_2m if order == 2 else dpm_solver_pp_3m
    with torch.no_grad():
        ours = solver(teacher.net, x_T, ts, schedule=teacher.schedule, param="eps").x
    assert rel(ours, run_diffusers(sched, teacher.net.unet, x_T)) < 1e-6


def unipc_scheduler(order: int, variant: str, spacing: str, steps: int):
    """diffusers' UniPC in data prediction on the grid of `spacing`: its set_timesteps takes no custom timesteps (as
    of 0.42), so the grid is read back from it, tau -> t = (tau + 1)/T, then 0."""
    sched = diffusers.UniPCMultistepScheduler(num_train_timesteps=T, solver_order=order, solver_type=variant,
                                              predict_x0=True, final_sigmas_type="zero", lower_order_final=True,
                                              timestep_spacing=spacing)
    sched.set_timesteps(steps)
    ts = torch.tensor([(t + 1) / T for t in sched.timesteps.tolist()] + [0.0], dtype=torch.float64)
    return sched, ts


@pytest.mark.parametrize("spacing, steps", [("trailing", 5), ("linspace", 10)])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_parity(teacher, x_T, order, variant, spacing, steps):
    """diffusers runs the corrector at the start of each step() after the first, on the model output at the state
    the previous predictor reached, and never after the last step: fastdiff's trajectory holds the corrected states,
    the corrected state at the last positive grid point is diffusers' `last_sample` after its last step().

    The step to sigma = 0: diffusers evaluates its order-1 (lower_order_final) UniP formula at sigma_t = 0, i.e.
    h = inf: sigma_t/sigma_s x vanishes and alpha_t (1 - e^{-h}) m0 = m0, the x0_hat of its last model output
    (`model_outputs[-1]`), which is what fastdiff returns. With bh1, B(h) = -h = -inf multiplies the zero residual
    of an order-1 step, and diffusers (0.42.1) returns NaN; fastdiff returns that same x0_hat for both variants.

    float64 first (the scheduler's sigmas recomputed in float64 from the float64 alpha_bar, as in `in_float64`; its
    set_timesteps rounds them to float32): the same formulas to ~3e-15. Then float32 as a user runs it: < 1e-6.
    """
    def compare(sched, unet, net, x, tol):
        ref = run_diffusers(sched, unet, x)
        with torch.no_grad():
            ours = unipc(net, x, ts, schedule=teacher.schedule, param="eps", order=order, variant=variant,
                         return_trajectory=True)
        assert ours.nfe == steps and len(ours.trajectory) == steps + 1
        assert rel(ours.trajectory[-2], sched.last_sample) < tol
        assert rel(ours.x, sched.model_outputs[-1]) < tol
        if torch.isfinite(ref).all():
            assert rel(ours.x, ref) < tol
        else:
            assert variant == "bh1"

    sched, ts = unipc_scheduler(order, variant, spacing, steps)
    s64, unet64 = in_float64(sched, teacher.net.unet)
    s64.sigmas = torch.cat([((1 - s64.alphas_cumprod) / s64.alphas_cumprod).sqrt()[s64.timesteps],
                            torch.zeros(1, dtype=torch.float64)])
    compare(s64, unet64, copy.deepcopy(teacher.net).double(), x_T.double(), 1e-12)
    compare(sched, teacher.net.unet, teacher.net, x_T, 1e-6)


# --- distillation and export, end to end --------------------------------------------------------------------------

def test_diffusers_teacher_to_exported_student_round_trip(pipe_dir, teacher, tmp_path, shared_cache):
    """tiny diffusers teacher -> one progressive round (eps teacher, v student) -> export -> diffusers reloads it and
    samples what fastdiff samples on the same noise."""
    from fastdiff.distill.cli import main as distill_main
    from fastdiff.export import main as export_main

    run = tmp_path / "run"
    assert distill_main(["--teacher", str(pipe_dir), "--dataset", "digits", "--method", "pd", "--start-steps", "8",
                         "--rounds", "1", "--updates-per-round", "3", "--batch-size", "8", "--eval-samples", "16",
                         "--bench", "false", "--out-dir", str(run)]) == 0
    student = fastdiff.load_student(run / "students" / "student_N4.pt")
    assert student.param == "v" and student.schedule == teacher.schedule and student.network == teacher.network
    assert export_main([str(run), "--out", str(tmp_path / "export")]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert "progressive distillation" in card and teacher.hash in card and "| steps N | 4 |" in card
    # the student's own evaluation, from its checkpoint, beside the teacher's DDIM at its N
    evaluation = fastdiff.load_student(run / "students" / "student_N4.pt").role["evaluation"]
    assert f"{evaluation['metric']} {evaluation['student_value']} (teacher DDIM at 4 steps: " in card
    back = fastdiff.load_model(tmp_path / "export")
    assert (back.kind, back.steps, back.param, back.schedule) == ("student", 4, "v", teacher.schedule)
    assert back.hash == student.hash  # one model id for the checkpoint and its exported folder
    x, _ = initial_noise(range(6), (1, 8, 8), 0, "cpu")
    with torch.no_grad():
        ours = distilled(student.net, x, 4, schedule=student.schedule, param="v", clip=True).x
        again = distilled(back.net, x, 4, schedule=back.schedule, param="v", clip=True).x
    assert torch.equal(ours, again)
    pipe = diffusers.DDIMPipeline.from_pretrained(tmp_path / "export")
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    theirs = run_diffusers(pipe.scheduler, pipe.unet, x, eta=0.0, use_clipped_model_output=True)
    assert rel(theirs, ours) < 1e-5


def test_a_consistency_student_is_refused_by_export_with_the_reason(pipe_dir, tmp_path, shared_cache):
    """A CD student samples from its own t_top (< 1) and re-noises between steps: no stock diffusers scheduler runs
    that, so export refuses it (a file or a run dir holding only it) and writes nothing."""
    from fastdiff.distill.cli import main as distill_main
    from fastdiff.export import main as export_main

    run = tmp_path / "run"
    assert distill_main(["--teacher", str(pipe_dir), "--dataset", "digits", "--method", "cd", "--start-steps", "8",
                         "--rounds", "1", "--cd-updates", "2", "--cd-steps", "4", "--batch-size", "8",
                         "--eval-samples", "16", "--bench", "false", "--out-dir", str(run)]) == 0
    student = fastdiff.load_student(run / "students" / "cd.pt")
    assert (student.method, student.sampler, student.role["grid"], student.role["swept"]) == (
        "cd", "consistency", "cd4", True)
    assert [row["nfe"] for row in student.role["evaluation"]] == [1, 2, 4]
    with pytest.raises(FastdiffError, match=r"consistency \(CD\) student does not export .*starts at the top of its "
                                            r"training discretization"):
        export_main([str(run / "students" / "cd.pt"), "--out", str(tmp_path / "cd")])
    with pytest.raises(FastdiffError, match="no exportable student yet \\(consistency students do not export\\)"):
        export_main([str(run), "--out", str(tmp_path / "cd")])
    assert not (tmp_path / "cd").exists()


def test_native_diffusers_arch_trains_and_exports_its_teacher(tmp_path):
    from fastdiff.export import main as export_main
    from fastdiff.train import main as train_main

    run = tmp_path / "teacher"
    assert train_main(["--preset", "digits-diffusers", "--channels", "8", "--updates", "2", "--batch-size", "4",
                       "--sample-every", "1000", "--out-dir", str(run)]) == 0
    ours = fastdiff.load_model(run)
    assert export_main([str(run), "--out", str(tmp_path / "export")]) == 0
    back = fastdiff.load_model(tmp_path / "export")  # the _fastdiff block: the exact (continuous cosine) schedule
    assert back.schedule == ours.schedule and back.kind == "teacher" and not back.network["discrete"]
    assert back.hash == ours.hash
    x, _ = initial_noise(range(3), (1, 8, 8), 0, "cpu")
    ts = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(ddim(ours.net, x, ts, schedule=ours.schedule, param="v", clip=True).x,
                           ddim(back.net, x, ts, schedule=back.schedule, param="v", clip=True).x)


def test_eps_teacher_target_is_clipped_like_its_sampler(teacher):
    """Round 1 from an eps teacher: its x0_hat = (z - sigma eps_hat)/alpha divides by alpha(1) = 0.0064, so the
    unclipped target at t = 1 is amplified noise; clipped (as its DDIM sampler clips), the target is that of the
    teacher's clipped steps: in [-1, 1] when both of its x0_hat are."""
    from fastdiff.distill.progressive import distill_target, teacher_fn
    from fastdiff.losses import noised

    x0 = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    t = torch.ones(16, dtype=torch.float64)
    z, *_ = noised(x0, t, teacher.schedule, torch.Generator().manual_seed(2))
    fn = teacher_fn(teacher, "eps", teacher.schedule)
    with torch.no_grad():
        raw = distill_target(z, t, fn, teacher.schedule, 4)
        clipped = distill_target(z, t, fn, teacher.schedule, 4, clip=True)
    assert raw.abs().max() > 20 and clipped.abs().max() <= 1 + 1e-4


def test_bench_sweeps_a_diffusers_teacher(pipe_dir, teacher, tmp_path, shared_cache):
    from fastdiff.bench import main as bench_main
    from test_bench import read_rows

    out = tmp_path / "results"
    assert bench_main(["--model", str(pipe_dir), "--dataset", "digits", "--samplers", "ddim", "--spacings",
                       "trailing", "--steps", "2,4", "--n-samples", "8", "--batch-size", "8", "--metrics", "fid",
                       "--out-dir", str(out), "--device", "cpu"]) == 0
    rows = read_rows(out / "digits" / "fid_vs_steps.csv")
    assert {(r["sampler"], int(r["steps"])) for r in rows} == {("ddim", 2), ("ddim", 4)}
    assert {r["model_hash"] for r in rows} == {teacher.hash}


def test_bare_unet_folder_with_its_scheduler_config(tmp_path, pipe_dir, teacher):
    bare = tmp_path / "bare"
    tiny_unet().save_pretrained(bare)
    diffusers.DDPMScheduler(num_train_timesteps=T).save_pretrained(bare)  # scheduler_config.json beside config.json
    model = fastdiff.load_model(bare, dataset="digits")
    assert model.hash == teacher.hash and model.schedule == teacher.schedule  # the same weights and schedule
    pickled = tmp_path / "bin"  # .bin weights (torch.load with weights_only=True inside diffusers)
    tiny_unet().save_pretrained(pickled, safe_serialization=False)
    diffusers.DDPMScheduler(num_train_timesteps=T).save_pretrained(pickled)
    assert (pickled / "diffusion_pytorch_model.bin").is_file()
    assert fastdiff.load_model(pickled, dataset="digits").hash == teacher.hash
    alone = tmp_path / "alone"
    tiny_unet().save_pretrained(alone)
    with pytest.raises(FastdiffError, match="without a scheduler config"):
        fastdiff.load_model(alone, dataset="digits")


def test_distill_dry_run_of_a_diffusers_teacher_writes_nothing(pipe_dir, tmp_path, capsys):
    from fastdiff.distill.cli import main as distill_main

    out = tmp_path / "run"
    assert distill_main(["--teacher", str(pipe_dir), "--dataset", "digits", "--start-steps", "256", "--out-dir",
                         str(out), "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert f"teacher: {pipe_dir}" in said and "256->128 steps" in said and "digits-diffusers" in said
    assert not out.exists()


# --- bad input: exit 2, one line, nothing written -----------------------------------------------------------------

def write_pipeline(path, unet=None, **sched):
    diffusers.DDPMPipeline(unet=unet or tiny_unet(), scheduler=diffusers.DDPMScheduler(**sched)).save_pretrained(path)
    return path


@pytest.mark.parametrize("sched, match", [({"thresholding": True}, "thresholding"),
                                          ({"rescale_betas_zero_snr": True}, "zero terminal SNR"),
                                          ({"variance_type": "learned"}, "learned"),
                                          ({"clip_sample": False}, "clip_sample")])
def test_refused_scheduler_keys(tmp_path, sched, match):
    path = write_pipeline(tmp_path / "p", **sched)
    with pytest.raises(FastdiffError, match=match):
        fastdiff.load_model(path, dataset="digits")


@pytest.mark.parametrize("variance", ["learned", "learned_range", "fixed_medium"])
def test_only_a_learned_or_unknown_variance_is_refused(variance):
    with pytest.raises(FastdiffError, match="learned variance" if "learned" in variance else "not supported"):
        schedule_from_scheduler({"variance_type": variance})


@pytest.mark.parametrize("cls", ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"])
def test_a_pipeline_saved_with_a_dpm_solver_scheduler_loads_as_with_its_ddim_one(tmp_path, cls):
    """DPM-Solver's schedulers write `variance_type: null` (no variance); the pipeline loads, with the same schedule and
    parameterisation as its DDIM config gives."""
    ddim_cfg = diffusers.DDIMScheduler(num_train_timesteps=T).config
    swapped = getattr(diffusers, cls).from_config(ddim_cfg)
    assert swapped.config.variance_type is None
    path = tmp_path / "p"
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=swapped).save_pretrained(path)
    assert json.loads((path / "scheduler" / "scheduler_config.json").read_text())["variance_type"] is None
    model = fastdiff.load_model(path, dataset="digits")
    schedule, param, _ = schedule_from_scheduler(dict(ddim_cfg))
    assert model.param == param == "eps"
    assert torch.equal(model.schedule.alpha_bar(torch.linspace(0, 1, 11, dtype=torch.float64)),
                       schedule.alpha_bar(torch.linspace(0, 1, 11, dtype=torch.float64)))


def test_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FastdiffError, match="does not exist; pass a run dir .* or a diffusers folder"):
        fastdiff.load_model(tmp_path, dataset="digits")


def test_refused_prediction_type():
    with pytest.raises(FastdiffError, match="prediction_type"):
        schedule_from_scheduler({"prediction_type": "flow"})


def test_unsupported_model_class_names_the_supported_one(tmp_path):
    path = tmp_path / "cond"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel", "sample_size": 8}))
    (path / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    with pytest.raises(FastdiffError, match="UNet3DConditionModel.*not supported.*UNet2DModel.*UNet2DConditionModel"):
        fastdiff.load_model(path, dataset="digits")
    # a text-to-image UNet alone: it loads from its pipeline folder only (text encoder, tokenizer, autoencoder)
    (path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "sample_size": 8}))
    with pytest.raises(FastdiffError, match="UNet2DConditionModel is loaded from its pipeline folder"):
        fastdiff.load_model(path, dataset="digits")


def test_data_set_must_fit_the_model(pipe_dir):
    with pytest.raises(FastdiffError, match="--dataset"):
        fastdiff.load_model(pipe_dir)
    with pytest.raises(FastdiffError, match="1x8x8 images but data set 'cifar10'"):
        fastdiff.load_model(pipe_dir, dataset="cifar10")


def test_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FastdiffError, match="'google/ddpm-cifar10-32' is no local path, and the Hugging Face hub"):
        fastdiff.load_model("google/ddpm-cifar10-32", dataset="cifar10")


def test_missing_extra_names_the_pip_command(pipe_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(FastdiffError, match=r'pip install -e "\.\[diffusers\]"'):
        fastdiff.load_model(pipe_dir, dataset="digits")


def test_start_steps_too_fine_for_a_discrete_teacher(pipe_dir, tmp_path, capsys):
    from fastdiff.distill.cli import main as distill_main
    from fastdiff.errors import run_cli

    out = tmp_path / "run"
    assert run_cli(distill_main, ["--teacher", str(pipe_dir), "--dataset", "digits", "--start-steps", "512",
                                  "--bench", "false", "--out-dir", str(out)]) == 2
    assert "N0 <= 500 (the largest power of two: 256)" in capsys.readouterr().err and not out.exists()


def test_unexportable_students(tmp_path, capsys):
    from fastdiff.errors import run_cli
    from fastdiff.export import main as export_main
    from fastdiff.train import main as train_main

    run = tmp_path / "native"
    assert train_main(["--preset", "digits", "--channels", "8", "--updates", "1", "--batch-size", "4",
                       "--sample-every", "1000", "--out-dir", str(run)]) == 0
    assert run_cli(export_main, [str(run), "--out", str(tmp_path / "e")]) == 2
    assert "no exact diffusers counterpart" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FastdiffError, match="'runs/missing/checkpoint.pt' does not exist|'runs/missing' does not"):
        fastdiff.load_model("runs/missing")


def test_export_of_a_diffusers_folder_and_a_contradicting_dataset_are_refused(pipe_dir, tmp_path, capsys):
    from fastdiff.distill.cli import main as distill_main
    from fastdiff.errors import run_cli
    from fastdiff.export import main as export_main
    from fastdiff.train import main as train_main

    assert run_cli(export_main, [str(pipe_dir), "--out", str(tmp_path / "e")]) == 2
    assert "is a diffusers folder already" in capsys.readouterr().err and not (tmp_path / "e").exists()
    teacher = tmp_path / "teacher"
    assert train_main(["--preset", "digits", "--channels", "8", "--updates", "1", "--batch-size", "4",
                       "--sample-every", "1000", "--out-dir", str(teacher)]) == 0
    assert run_cli(distill_main, ["--teacher", str(teacher), "--dataset", "cifar10", "--out-dir",
                                  str(tmp_path / "d"), "--bench", "false"]) == 2
    assert "--dataset cifar10 contradicts teacher" in capsys.readouterr().err and not (tmp_path / "d").exists()
