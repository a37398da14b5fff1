"""A method is one file: a toy distiller defined entirely here — a student and a critic trained twice per student
update, an EMA of the student, its own sampler — registered, then run through `python -m fastdiff.distill` (resume
included), the sweep, the report, `python -m fastdiff.sample`, and `python -m fastdiff.export` on a tiny diffusers
UNet2DModel teacher, without any change to fastdiff."""
from __future__ import annotations

import copy
import csv
import dataclasses
import os
import time

import pytest
import torch

import fastdiff
from fastdiff import registry, runs
from fastdiff.distill import protocol
from fastdiff.errors import FastdiffError, Preempted
from test_metrics import one_thread, shared_cache  # noqa: F401  (fixtures: one classifier cache, one CPU thread)

UPDATES = 6


def _two_step(net, x, ts, *, eta=None, variance="", **kw):
    """The toy students' sampler: DDIM eta = 0 on their own 2-step grid."""
    from fastdiff.samplers import ddim

    return ddim(net, x, ts, eta=0.0, **kw)


class Toy(protocol.Method):
    """Distils the teacher's x0^ at t ~ U[0.02, 1] into a 2-step student, beside a critic that learns the student's
    squared error (2 critic steps per student step) and nudges the student where it predicts large errors."""

    name = "toy"
    title = "a toy distiller (tests)"
    samplers = ("toy-2step",)

    def plan(self, cfg):
        return [f"toy: {UPDATES} updates, 2 critic steps each"]

    def update_cost(self, cfg):
        # per example: 1 teacher evaluation, the student's forward + backward and 2 critic steps on its output (each
        # a student forward, a critic forward + backward)
        return {"teacher": cfg.batch_size, "student": 3 * cfg.batch_size + 2 * cfg.batch_size,
                "critic": 2 * 3 * cfg.batch_size}

    def run(self, ctx):
        from fastdiff.losses import noised
        from fastdiff.models import build_model, network_from_dict
        from fastdiff.param import denoiser, to_x0_eps

        final = ctx.run / "students" / "toy.pt"
        if final.exists():
            return
        cfg = ctx.cfg
        student = build_model(network_from_dict(ctx.student_network)).to(ctx.device)
        student.load_state_dict(ctx.teacher0.net.state_dict())
        width = int(torch.tensor(ctx.teacher0.data_shape).prod())
        critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(width, 16), torch.nn.SiLU(),
                                     torch.nn.Linear(16, 1)).to(ctx.device)
        teacher = denoiser(ctx.teacher0.net.eval().requires_grad_(False), ctx.schedule, ctx.teacher0.param)
        gen = torch.Generator().manual_seed(cfg.seed + 99)
        torch.manual_seed(cfg.seed + 100)

        def batch():
            idx = torch.randint(len(ctx.x_all), (cfg.batch_size,), generator=gen)
            t = 0.02 + 0.98 * torch.rand(cfg.batch_size, generator=gen, dtype=torch.float64)
            z, _, a, s = noised(ctx.x_all[idx], t, ctx.schedule, gen)
            return z, t, a, s

        def x0_of(model, z, t, a, s):
            return to_x0_eps(model(z, t.to(z)), z, a, s, cfg.param)[0]

        def critic_loss(model):
            z, t, a, s = batch()
            with torch.no_grad():
                err = (x0_of(student, z, t, a, s) - teacher(z, t)[0]).flatten(1).pow(2).mean(1, keepdim=True)
            return (model(z) - err).pow(2).mean()

        def student_loss(model):
            z, t, a, s = batch()
            with torch.no_grad():
                target, weight = teacher(z, t)[0], 1 + critic(z).squeeze(1).clamp(0, 1)
            return (weight * (x0_of(model, z, t, a, s) - target).flatten(1).pow(2).mean(1)).mean()

        student.train()
        nets = {"critic": runs.Trained(critic, torch.optim.Adam(critic.parameters(), lr=1e-3), critic_loss, steps=2),
                "student": runs.Trained(student, torch.optim.Adam(student.parameters(), lr=cfg.lr), student_loss)}
        t0 = time.perf_counter()
        fitted = runs.fit(nets, total=UPDATES, lr_at=lambda u: cfg.lr, gen=gen, salt=cfg.seed + 99,
                          device=ctx.device, state_path=ctx.state_path, ckpt_every=2, label="toy",
                          resume=protocol.resume_state(ctx, "toy"), emas={"ema": ("student", 0.5)},
                          extra_state=lambda: {"kind": "distill-state", "config": ctx.student_cfg, "stage": "toy",
                                               "network": ctx.student_network},
                          on_step=None if ctx.on_step is None else lambda u: ctx.on_step(0, u), progress=False)
        ema = fitted.emas["ema"]
        evaluation = protocol.evaluate_student(ctx, ema, "toy-2step", "student", 2)
        protocol.save_student(ctx, "toy", ema, method=self, sampler="toy-2step", grid="student", steps=2,
                              cost=protocol.student_cost(ctx, self, UPDATES, time.perf_counter() - t0),
                              evaluation=evaluation)


@pytest.fixture
def toy_method():
    entry = registry.register_sampler(registry.SamplerEntry(
        "toy-2step", _two_step, "own", label="toy students (own {grid} grid)", graphable=True, model="toy",
        student_label="toy student", short="toy", diffusers="DDIMScheduler", method_title=Toy.title,
        refusal="a stock DDIMScheduler reproduces the grid i/N only when N divides T",
        description="a toy distiller's 2-step student"))
    method = protocol.register_method(Toy())
    yield method
    protocol.unregister_method(method.name)
    registry.unregister_sampler(entry.name)


def _load_state_ok(run):
    from fastdiff.checkpoint import load_checkpoint

    return load_checkpoint(run / "state.pt")


def test_a_toy_method_runs_end_to_end_from_one_file(tmp_path, toy_method, shared_cache, capsys):
    from fastdiff.checkpoint import load_checkpoint
    from fastdiff.distill import distill, sweep_and_report
    from fastdiff.distill.cli import main as distill_main
    from fastdiff.errors import run_cli
    from fastdiff.report import write_report
    from fastdiff.sample import main as sample_main
    from test_distill import _tiny_toy

    cfg = _tiny_toy(tmp_path, method="toy", eval_samples=64, batch_size=64)
    # --method takes it like any registered name; the dry run shows its plan
    assert run_cli(distill_main, ["--preset", "toy2d", "--teacher", cfg.teacher, "--method", "toy",
                                  "--out-dir", str(tmp_path / "dry"), "--dry-run"]) == 0
    assert "stages: toy: 6 updates, 2 critic steps each" in capsys.readouterr().out
    assert run_cli(distill_main, ["--preset", "toy2d", "--teacher", cfg.teacher, "--method", "toy,nope",
                                  "--out-dir", str(tmp_path / "bad")]) == 2
    assert "--method: unknown 'nope'; choose from pd, cd, dmd2, toy" in capsys.readouterr().err

    ref = distill(dataclasses.replace(cfg, out_dir=str(tmp_path / "ref")), progress=False)

    def stop_at_3(r, update):
        if update == 3:
            runs.request_stop(15)

    with runs.graceful_stop(), pytest.raises(Preempted):
        distill(cfg, progress=False, on_step=stop_at_3)
    state = _load_state_ok(tmp_path / "distill")
    assert state["stage"] == "toy" and state["update"] == 3 and set(state["modules"]) == {"critic", "student"}
    seen = []
    run = distill(cfg, progress=False, on_step=lambda r, u: seen.append(u))
    assert seen == [4, 5, 6]  # resumed after update 3
    a, b = load_checkpoint(run / "students" / "toy.pt"), load_checkpoint(ref / "students" / "toy.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # bit for bit
    student = fastdiff.load_student(run / "students" / "toy.pt")
    assert (student.method, student.sampler, student.role["steps"]) == ("toy", "toy-2step", 2)
    assert student.cost["forward_equivalents"] == UPDATES * 64 * (1 + 5 + 6)
    assert student.role["evaluation"]["nfe"] == 2

    # the sweep (its sampler joins the preset's), the report and the README's summary name it as the registry does
    report = sweep_and_report(run, dataclasses.replace(cfg, results_dir=str(tmp_path / "res"), bench=True,
                                                       bench_samples=64, bench_steps=(1, 2),
                                                       bench_samplers=("ddim", "toy-2step")))
    rows = list(csv.DictReader(open(tmp_path / "res" / "toy2d" / "fid_vs_steps.csv")))
    toy_rows = [r for r in rows if r["sampler"] == "toy-2step"]
    assert {(r["grid"], r["steps"], r["nfe"]) for r in toy_rows} == {("student", "2", "2")}
    assert {r["train_updates"] for r in toy_rows} == {str(UPDATES)}
    assert "toy students (own student grid)" in report.read_text()
    # its student's own evaluation is a training point (read from the checkpoint), beside the sweep and in the report
    points = list(csv.DictReader(open(tmp_path / "res" / "toy2d" / "training.csv")))
    assert [(r["method"], r["short"], r["nfe"], r["updates"]) for r in points] == [("toy", "TOY", "2", str(UPDATES))]
    assert float(points[0]["forward_equivalents"]) == UPDATES * 64 * (1 + 5 + 6)
    assert "| toy: FID at updates (forward-equivalents) |" in report.read_text()
    assert "toy students (own student grid)" in write_report(tmp_path / "res").read_text()

    # fastdiff.sample follows the sampler the checkpoint names
    out = tmp_path / "toy.png"
    assert sample_main(["--model", str(run / "students" / "toy.pt"), "--n", "8", "--out", str(out)]) == 0
    assert out.is_file() and "NFE 2" in capsys.readouterr().out


def test_a_toy_student_of_a_diffusers_teacher_exports_with_its_method_and_evaluation(tmp_path, toy_method,
                                                                                       shared_cache):
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.distill.cli import main as distill_main
    from fastdiff.export import main as export_main
    from test_diffusers import T, tiny_unet

    pipe_dir = tmp_path / "ddpm"
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler(num_train_timesteps=T)).save_pretrained(
        pipe_dir)
    run = tmp_path / "run"
    assert distill_main(["--teacher", str(pipe_dir), "--dataset", "digits", "--method", "toy", "--batch-size", "8",
                         "--eval-samples", "16", "--bench", "false", "--out-dir", str(run)]) == 0
    assert export_main([str(run), "--out", str(tmp_path / "export"), "--check", "4"]) == 0  # checked in export
    card = (tmp_path / "export" / "README.md").read_text()
    student = fastdiff.load_student(run / "students" / "toy.pt")
    evaluation = student.role["evaluation"]
    assert "| method | a toy distiller (tests) |" in card and "| steps N | 2 |" in card
    assert f"{evaluation['metric']} {evaluation['student_value']} (teacher DDIM at 2 steps" in card
    assert "diffusers DDIMPipeline max rel diff" in card
    back = fastdiff.load_model(tmp_path / "export")
    assert back.hash == student.hash and back.steps == 2


def test_a_method_is_refused_unless_registered_and_named_once():
    with pytest.raises(FastdiffError, match="names a method twice"):
        protocol.parse_methods("pd,pd")
    with pytest.raises(FastdiffError, match="unknown 'dmd'"):
        protocol.parse_methods("dmd")
    assert [m.name for m in protocol.parse_methods("pd+cd")] == ["pd", "cd"]  # the spelling of before
    with pytest.raises(FastdiffError, match="registered already"):
        protocol.register_method(copy.copy(protocol.get_method("pd")))


def test_an_installed_package_adds_its_method_through_an_entry_point(tmp_path, monkeypatch):
    """`[project.entry-points."fastdiff.methods"] plug = "plug_method"`: the module is imported on the first look at
    either registry, so `python -m fastdiff.distill --method plug` (and the report's labels) know it."""
    import importlib.metadata
    import sys

    (tmp_path / "plug_method.py").write_text(
        "from fastdiff import registry\n"
        "from fastdiff.distill import protocol\n"
        "class Plug(protocol.Method):\n"
        "    name, samplers = 'plug', ('plug-1step',)\n"
        "registry.register_sampler(registry.SamplerEntry('plug-1step', lambda *a, **k: None, 'own', model='plug'))\n"
        "protocol.register_method(Plug())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = [importlib.metadata.EntryPoint("plug", "plug_method", registry.PLUGIN_GROUP)]
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: found if group == registry.PLUGIN_GROUP else [])
    monkeypatch.setattr(registry, "_plugins_loaded", [])
    try:
        assert "plug" in protocol.method_names() and registry.samplers_of("plug") == ("plug-1step",)
        assert "plug-1step" in registry.student_samplers()
    finally:
        protocol.unregister_method("plug")
        registry.unregister_sampler("plug-1step")
        sys.modules.pop("plug_method", None)
    found[:] = [importlib.metadata.EntryPoint("broken", "no_such_module_here", registry.PLUGIN_GROUP)]
    monkeypatch.setattr(registry, "_plugins_loaded", [])
    with pytest.raises(FastdiffError, match="plugin 'broken' .* failed to import: ModuleNotFoundError"):
        registry.sampler_names()


def test_a_run_dir_of_pd_plus_cd_is_the_run_of_pd_comma_cd(tmp_path):
    """config.json stores one spelling of the methods: a run dir written as pd+cd (every run dir before the protocol)
    is the same run as --method pd,cd; another list of methods is another run."""
    import json

    from fastdiff.distill.cli import check_distill_dir
    from fastdiff.distill.config import PRESETS

    cfg = dataclasses.replace(PRESETS["toy2d"], teacher=str(tmp_path / "t.pt"), out_dir=str(tmp_path / "run"),
                              method="pd+cd")
    resolved = check_distill_dir(cfg, prepare=True)
    assert resolved["method"] == "pd+cd"
    (tmp_path / "run" / "config.json").write_text(json.dumps(resolved))
    check_distill_dir(dataclasses.replace(cfg, method="pd,cd"))
    check_distill_dir(dataclasses.replace(cfg, method=" pd , cd"))
    with pytest.raises(FastdiffError, match="holds a different config .*method: 'pd\\+cd' -> 'cd\\+pd'"):
        check_distill_dir(dataclasses.replace(cfg, method="cd,pd"))


def test_an_installed_methods_options_become_its_config_section(tmp_path):
    """A method an installed package registers (entry point) brings its options dataclass: `cfg.<name>`, its
    `--<name>.<field>` options with their comments as --help, and its own checks (exit 2, one line). In a fresh
    process: the section exists once the entry point is seen before fastdiff.distill.config is first imported."""
    import subprocess
    import sys

    (tmp_path / "plug_opts.py").write_text(
        "from dataclasses import dataclass\n"
        "from fastdiff import config as cfgs\n"
        "from fastdiff.distill import protocol\n"
        "@dataclass(frozen=True)\n"
        "class Opts:\n"
        "    critic_updates: int = 2  # critic updates per generator update\n"
        "class PlugOpts(protocol.Method):\n"
        "    name, options = 'plugopts', Opts\n"
        "    def validate(self, cfg):\n"
        "        cfgs.check_range(cfg, 'plugopts.critic_updates', cfg.plugopts.critic_updates >= 1, '>= 1')\n"
        "protocol.register_method(PlugOpts())\n")
    info = tmp_path / "plug_opts-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plug-opts\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fastdiff.methods]\nplugopts = plug_opts\n")
    script = (
        "import contextlib, io\n"
        "from fastdiff.distill.config import DistillConfig, PRESETS\n"
        "from fastdiff.distill.cli import main\n"
        "from fastdiff.errors import run_cli\n"
        "from fastdiff.runs import config_from_argv\n"
        "cfg, _ = config_from_argv(['--method', 'plugopts', '--plugopts.critic-updates', '5'], DistillConfig, PRESETS,"
        " 'p', 'd')\n"
        "print('section', cfg.plugopts.critic_updates, DistillConfig().plugopts.critic_updates)\n"
        "help = io.StringIO()\n"
        "with contextlib.redirect_stdout(help), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "print('help', 'critic updates per generator update' in help.getvalue())\n"
        "print('rc', run_cli(main, ['--method', 'plugopts', '--plugopts.critic-updates', '0', '--dry-run']))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=240)
    assert "section 5 2" in out.stdout and "help True" in out.stdout and "rc 2" in out.stdout, out.stderr[-2000:]
    assert "error: --plugopts.critic-updates must be >= 1, got 0" in out.stderr
