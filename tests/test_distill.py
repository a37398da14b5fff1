"""Progressive distillation: the target against closed forms, the CLI end to end, resume, guard rails."""
from __future__ import annotations

import csv
import dataclasses

import pytest
import torch

from fastdiff import config as cfgs
from fastdiff.param import append_dims
from fastdiff.analytic import GaussianDenoiser
from fastdiff.distill import PRESETS, DistillConfig, distill, distill_target, main, teacher_fn
from fastdiff.errors import run_cli
from fastdiff.schedules import Schedule

MU, STD, DIM = 0.3, 0.5, 6


def _gaussian_x0(z, t, schedule):
    """Closed-form E[x0 | z_t] for x0 ~ N(MU, STD^2 I)."""
    a, s = (append_dims(v, z.ndim) for v in schedule.alpha_sigma(t))
    return MU + a * STD**2 / (a**2 * STD**2 + s**2) * (z - a * MU)


def _ddim_closed(z, t_from, t_to, schedule):
    x0 = _gaussian_x0(z, t_from, schedule)
    a, s = (append_dims(v, z.ndim) for v in schedule.alpha_sigma(t_from))
    eps = (z - a * x0) / s
    a2, s2 = (append_dims(v, z.ndim) for v in schedule.alpha_sigma(t_to))
    return a2 * x0 + s2 * eps


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("teacher_param", ["eps", "x0", "v"])
def test_target_matches_two_closed_form_ddim_steps(kind, teacher_param):
    schedule = Schedule(kind, 1000)
    n = 8
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(1, n + 1, (64,), generator=gen).double() / n
    z = torch.randn(64, DIM, generator=gen, dtype=torch.float64)
    teacher = GaussianDenoiser(MU, STD, schedule, param=teacher_param)
    target = distill_target(z, t, teacher_fn(teacher, teacher_param, schedule), schedule, n)
    # Two DDIM steps with the exact denoiser, in closed form.
    z2 = _ddim_closed(_ddim_closed(z, t, t - 0.5 / n, schedule), t - 0.5 / n, t - 1.0 / n, schedule)
    # A student predicting x_tilde, stepped once by DDIM from t to t'' = t - 1/N, lands on z2.
    a, s = (append_dims(v, z.ndim) for v in schedule.alpha_sigma(t))
    a2, s2 = (append_dims(v, z.ndim) for v in schedule.alpha_sigma(t - 1.0 / n))
    one_step = a2 * target + s2 * (z - a * target) / s
    assert torch.allclose(one_step, z2, rtol=1e-9, atol=1e-9)
    # At t'' = 0 the target is the teacher's final x0 prediction, i.e. the two-step DDIM output itself.
    last = t == 1.0 / n
    assert last.any()
    assert torch.allclose(target[last], z2[last], rtol=1e-9, atol=1e-9)


def test_bad_input_exit_2(tmp_path, capsys):
    out = tmp_path / "d"
    assert run_cli(main, ["--start-steps", "6", "--out-dir", str(out)]) == 2
    assert run_cli(main, ["--preset", "nope", "--out-dir", str(out)]) == 2
    assert run_cli(main, ["--teacher", str(tmp_path / "missing.pt"), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error:") for line in err)
    assert not out.exists()


def _tiny_toy(tmp_path, **kw) -> DistillConfig:
    from fastdiff.train import PRESETS as TRAIN

    teacher_cfg = dataclasses.replace(TRAIN["toy2d"], updates=300, hidden=64, layers=2,
                                      out_dir=str(tmp_path / "teacher"),
                                      sample_every=10_000)
    from fastdiff.train import train

    train(teacher_cfg, progress=False)
    base = cfgs.replace(PRESETS["toy2d"], {"teacher": str(tmp_path / "teacher"), "pd.start_steps": 4,
                                           "pd.updates_per_round": 30, "ckpt_every": 10, "eval_samples": 100,
                                           "bench": False, "out_dir": str(tmp_path / "distill")})
    return cfgs.replace(base, kw)


@pytest.mark.slow
def test_resume_inside_a_round_gives_complete_table(tmp_path):
    cfg = _tiny_toy(tmp_path)

    class Kill(Exception):
        pass

    def kill(r, updates):
        if r == 1 and updates == 25:
            raise Kill

    with pytest.raises(Kill):
        distill(cfg, progress=False, on_step=kill)
    seen = []
    run = distill(cfg, progress=False, on_step=lambda r, u: seen.append((r, u)))
    # Resumed in round 1 from the checkpoint at update 20 (at most one checkpoint interval lost).
    assert seen[0] == (1, 21)
    rows = list(csv.DictReader(open(run / "rounds.csv")))
    assert [int(r["round"]) for r in rows] == [0, 1]
    assert [int(r["updates"]) for r in rows] == [30 * 2, 30 * 2]  # the last two rounds are doubled
    assert sorted(p.name for p in (run / "students").iterdir()) == ["student_N1.pt", "student_N2.pt"]
    # A finished run re-run does nothing.
    again = []
    distill(cfg, progress=False, on_step=lambda r, u: again.append(r))
    assert again == []
    from fastdiff.distill import load_student

    student = load_student(run / "students" / "student_N2.pt")
    assert student.steps == 2 and student.kind == "student"
    # what each student cost, cumulative from the teacher: the 1-step one includes the 2-step one's round
    from fastdiff.checkpoint import load_checkpoint

    c1, c2 = (load_checkpoint(run / "students" / f"student_N{n}.pt")["cost"] for n in (1, 2))
    assert (c2["updates"], c1["updates"]) == (60, 120)
    assert c1["teacher_evals"] == 2 * cfg.batch_size * 120 and c1["student_passes"] == cfg.batch_size * 120
    assert c1["forward_equivalents"] == (2 + 3) * cfg.batch_size * 120  # a backward = 2 forwards
    assert c1["wall_clock_s"] > c2["wall_clock_s"] > 0 and c1["device"] == "cpu"


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["snr-trunc", "snr+1"])
def test_a_student_that_outputs_the_target_has_zero_loss(param, weighting):
    """student_loss end to end on the exact Gaussian teacher: a student whose output (in its parameterization) is
    the closed-form x_tilde of two teacher DDIM steps scores 0, and one that outputs the teacher's x0_hat does not."""
    from fastdiff.distill import student_loss
    from fastdiff.param import target

    schedule, n = Schedule("cosine", 1000), 4
    teacher = GaussianDenoiser(0.3, 0.5, schedule, "v")
    target_fn = teacher_fn(teacher, "v", schedule)
    cfg = cfgs.replace(DistillConfig(), {"param": param, "pd.weighting": weighting})

    def exact_student(z, t):
        x_tilde = distill_target(z, t, target_fn, schedule, n)
        alpha, sigma = schedule.alpha_sigma(t)
        eps = (z - append_dims(alpha, z.ndim) * x_tilde) / append_dims(sigma, z.ndim)
        return target(x_tilde, eps, alpha, sigma, param)

    x0 = teacher.sample((64, 3), torch.Generator().manual_seed(0))
    loss = student_loss(exact_student, target_fn, x0, schedule, cfg, n, torch.Generator().manual_seed(1))
    assert loss.shape == (64,) and float(loss.max()) < 1e-20
    lazy = lambda z, t: target(*target_fn(z, t), *schedule.alpha_sigma(t), param)  # noqa: E731  (one step only)
    assert float(student_loss(lazy, target_fn, x0, schedule, cfg, n, torch.Generator().manual_seed(1)).mean()) > 1e-6


def test_dry_run_plans_the_rounds_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(main, ["--preset", "toy2d", "--start-steps", "8", "--updates-per-round", "10", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "to train: preset 'toy2d'" in out and "8->4 steps: 10 updates; 4->2 steps: 20 updates" in out
    assert list(tmp_path.iterdir()) == []
    # the bundled default: both methods, CD at PD's total and evaluated where each PD student is done
    assert run_cli(main, ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2->1 steps: 400 updates; consistency distillation: 1200 updates" in out
    assert "evaluation at updates 100, 200, 300, 400, 800, 1200)" in out and list(tmp_path.iterdir()) == []


def test_a_run_dir_of_another_config_is_refused_before_any_teacher_is_trained(tmp_path, capsys, monkeypatch):
    """Found by trying it: distill trained a whole teacher, then refused its run dir. Also: more rounds than
    --start-steps allows is an error, not silently fewer rounds."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text('{"start_steps": 4}')
    assert run_cli(main, ["--preset", "toy2d", "--start-steps", "8", "--out-dir", "d"]) == 2
    assert run_cli(main, ["--preset", "toy2d", "--start-steps", "4", "--rounds", "5", "--out-dir", "e"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "holds a different config (" in err[0] and "pd.start_steps: 4 -> 8" in err[0]
    assert err[1] == "error: --pd.rounds must be in [0, 2] for --pd.start-steps 4 (0: down to 1 step), got 5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no runs/teacher-toy2d


def test_method_options_are_sections_and_their_flat_names_of_before_still_work(tmp_path):
    """`cfg.pd` / `cfg.cd` hold each method's options (`--cd.updates`); the flat options of before (`--cd-updates`,
    `--target-ema`, `--start-steps`) set the same fields, config.json nests them, and a run dir whose config.json a
    flat-config fastdiff wrote is the same run (and refused once a section's field differs)."""
    import json

    from fastdiff.distill.cli import check_distill_dir
    from fastdiff.errors import FastdiffError
    from fastdiff.runs import config_from_argv

    new, _ = config_from_argv(["--cd.updates", "7", "--pd.start-steps", "8", "--cd.target-ema", "0.5"], DistillConfig,
                              PRESETS, "p", "d")
    old, _ = config_from_argv(["--cd-updates", "7", "--start-steps", "8", "--target-ema", "0.5"], DistillConfig,
                              PRESETS, "p", "d")
    assert new == old and (new.cd.updates, new.pd.start_steps, new.cd.target_ema) == (7, 8, 0.5)
    assert new.pd.updates_per_round == PRESETS["digits"].pd.updates_per_round == 100  # the preset's, kept
    assert cfgs.from_dict(DistillConfig, cfgs.to_dict(new)) == new

    cfg = dataclasses.replace(new, out_dir=str(tmp_path / "run"), teacher=str(tmp_path / "t.pt"))
    resolved = check_distill_dir(cfg)
    assert resolved["cd"]["updates"] == 7 and "cd_updates" not in resolved  # what config.json holds now
    flat_name = {path: name for name, path in cfgs.renamed_fields(DistillConfig).items()}
    written_before = {flat_name.get(k, k): v for k, v in cfgs.flatten(resolved).items()}
    assert written_before["cd_updates"] == 7 and written_before["start_steps"] == 8
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(written_before))
    check_distill_dir(cfg)  # the same run
    assert cfgs.from_dict(DistillConfig, written_before) == cfgs.from_dict(DistillConfig, resolved)
    with pytest.raises(FastdiffError, match=r"cd.updates: 7 -> 9"):
        check_distill_dir(cfgs.replace(cfg, {"cd.updates": 9}))
