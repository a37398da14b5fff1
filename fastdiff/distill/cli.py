"""The distillation command, `python -m fastdiff.distill`: a teacher, its students by every method asked for, their
evaluation, and the sweep and report that compare them.

`--method`: registered methods (fastdiff.distill.protocol), joined by ',' and run in order: pd (progressive
distillation, Salimans & Ho 2022, Alg. 2: rounds from `start_steps` down to 1 step, each halving the student's grid;
fastdiff.distill.pd), cd (consistency distillation, Song et al. 2023, Alg. 2) or pd,cd (also written pd+cd: both from
the same teacher at equal cost: CD gets the PD rounds' total updates and is evaluated at each PD student's cumulative
cost);
`--guided` first distils a classifier-free-guided teacher into a student that takes w as its input (Meng et al. 2023),
then runs the method(s) on it. With no arguments it runs the bundled default (preset `digits`: PD and CD) end to end
on a CPU: train (or reuse) the `digits` teacher, distil and evaluate, then the sweep (DDPM on the full grid, strided
DDPM, DDIM, the ODE solvers and both students over 1-64 steps) and the report.

Every stage is resumable: kill it at any moment and re-run the same command; it continues inside the current round
(or CD's updates) from the last checkpoint. Run dir layout: `config.json`, `state.pt` (the stage in progress; the one
before kept as `state.prev.pt`), `rounds.csv` (one row per finished PD round), `cd.csv` (CD's evaluations),
`students/student_N{N}.pt` (a PD student, loadable by `fastdiff.load_student`, which records its own grid N: sample
it with DDIM eta=0 on t_i = i/N), `students/cd.pt` (the CD student; `cd_u{updates}.pt` its snapshots),
`students/guided_base.pt` (a guided run's w-conditioned first stage). One process at a time holds the run dir;
SIGTERM/SIGINT stop it after the current update with a checkpoint (exit 143/130). The sweep's results go to
`--results-dir` (default runs/results, apart from the committed reference results), and a results CSV that holds
another teacher's sweep is refused unless `--append-results`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

from fastdiff import config as cfgs
from fastdiff import distributed as dist
from fastdiff import registry, runs
from fastdiff.checkpoint import CKPT_NAME, LoadedModel, load_model, resolve_path
from fastdiff.conditioning import Conditioner
from fastdiff.data import data_seed, static_info
from fastdiff.bench import GUIDANCE_SWEEP, BenchConfig, run_sweep
from fastdiff.bench import PRESETS as BENCH_PRESETS
from fastdiff.distill.config import (NON_RESULT_FIELDS, PRESETS, DistillConfig, dataset_of,
                                     fields_of_other_methods, methods_of, sweep_name, validate)
from fastdiff.distill.protocol import parse_methods, write_training_points
from fastdiff.distill.stages import DistillRun
from fastdiff.errors import FastdiffError
from fastdiff.io import write_text
from fastdiff.metrics import round_scorer
from fastdiff.interop import is_diffusers_source
from fastdiff.report import write_report
from fastdiff.results import AUTOENCODER_INFO
from fastdiff.train import PRESETS as TRAIN_PRESETS
from fastdiff.train import TrainConfig, train, training_data

log = logging.getLogger(__name__)


def resolve_teacher(cfg: DistillConfig, progress: bool) -> Path:
    """The teacher checkpoint: --teacher if given, else train (or reuse) the preset's teacher."""
    if not cfg.teacher:
        tcfg = teacher_config(cfg)
        if tcfg.autoencoder:
            ensure_autoencoder(tcfg.autoencoder, cfg.device, progress)
        train(tcfg, progress=progress)
    return resolve_path_only(cfg)


def ensure_autoencoder(folder: str, device: str, progress: bool) -> None:
    """A latent teacher preset's autoencoder: trained here (its preset of fastdiff.autoencoder, the one whose run dir
    is `folder`) unless `folder` already holds one; FastdiffError for a missing folder no preset makes."""
    from fastdiff.autoencoder import PRESETS as AE_PRESETS, train_autoencoder

    made_by = [p for p in AE_PRESETS.values() if Path(p.out_dir) == Path(folder)]
    if (Path(folder) / AUTOENCODER_INFO).is_file() or not made_by:
        return  # a finished run, or the user's own folder (fastdiff.latent says what is wrong with it if anything)
    train_autoencoder(dataclasses.replace(made_by[0], device=device), progress=progress)


def teacher_config(cfg: DistillConfig) -> TrainConfig:
    """The TrainConfig of the teacher trained here: the preset's, with --teacher-updates and --teacher-seed (another
    seed trains into its own run dir, `<out_dir>-seed<S>`, on the preset's data split)."""
    tcfg = TRAIN_PRESETS[cfg.teacher_preset]
    if cfg.teacher_seed >= 0 and cfg.teacher_seed != tcfg.seed:
        tcfg = dataclasses.replace(tcfg, seed=cfg.teacher_seed, split_seed=data_seed(tcfg),
                                   out_dir=f"{tcfg.out_dir}-seed{cfg.teacher_seed}")
    return dataclasses.replace(tcfg, device=cfg.device, deterministic=cfg.deterministic,
                               **({"updates": cfg.teacher_updates} if cfg.teacher_updates else {}))


def load_teacher(path, cfg: DistillConfig, device="cpu") -> LoadedModel:
    """The teacher at `path` (a fastdiff checkpoint, or a diffusers model trained on --dataset)."""
    return load_model(path, device, dataset=cfg.dataset, data_root=cfg.data_root)


def teacher_exists(path: Path) -> bool:
    return path.is_file() or is_diffusers_source(path)


def check_teacher(teacher: LoadedModel, cfg: DistillConfig) -> None:
    """Refuse a teacher that does not fit the run: a schedule or data shape other than the preset's (a fastdiff
    teacher), a student, a guided run without classes, or one a method of the run cannot distil
    (Method.check_teacher: e.g. PD's first grid finer than a discrete teacher's T allows)."""
    _check_teacher_fits(teacher, cfg)
    for method in parse_methods(cfg.method):
        method.check_teacher(teacher, cfg)


def _check_teacher_fits(teacher: LoadedModel, cfg: DistillConfig) -> None:
    if teacher.network and teacher.network.get("discrete"):  # a diffusers teacher: timesteps 0..T-1 only
        if cfg.guided and teacher.config.get("cond") != "text":
            raise FastdiffError("--guided needs a conditional teacher; diffusers UNet2DModel teachers are loaded "
                                "unconditional (a text-to-image pipeline folder loads text-conditioned)")
        if teacher.kind != "teacher":
            raise FastdiffError(f"{teacher.path} is an exported {teacher.kind}; --teacher needs a teacher")
        return
    if cfg.dataset and cfg.dataset != teacher.dataset:
        raise FastdiffError(f"--dataset {cfg.dataset} contradicts teacher {teacher.path}, trained on "
                            f"{teacher.dataset}; --dataset names the data of a diffusers teacher: drop it for a "
                            "fastdiff checkpoint")
    expected = TRAIN_PRESETS[cfg.teacher_preset]
    shape, _ = static_info(expected.dataset, expected.image_size)
    tcfg = teacher.config
    space = lambda latent: "latent" if latent else "pixel"  # noqa: E731
    if (tcfg["schedule"] != expected.schedule or tuple(teacher.image_shape) != tuple(shape)
            or (teacher.codec is not None) != bool(expected.autoencoder)):
        raise FastdiffError(
            f"teacher {teacher.path} (schedule {tcfg['schedule']}, data shape {tuple(teacher.image_shape)}, "
            f"{space(teacher.codec is not None)} space) does not match preset {cfg.teacher_preset!r} (schedule "
            f"{expected.schedule}, data shape {shape}, {space(expected.autoencoder)} space); "
            "pass --teacher-preset matching the teacher or another --teacher")
    if teacher.kind != "teacher":
        raise FastdiffError(f"{teacher.path} is a {teacher.kind} checkpoint; --teacher needs a teacher")
    if cfg.guided and tcfg.get("cond") not in ("class", "text"):
        raise FastdiffError(f"--guided needs a conditional teacher (trained with --cond class or text); {teacher.path} "
                            "is unconditional: use --teacher-preset digits-cond or digits-text, or another --teacher")


def check_results_folder(cfg: DistillConfig) -> None:
    """Before any work: refuse a results CSV holding another teacher's sweep (unless --append-results), so that a
    run never mixes its rows into another's. Without a teacher checkpoint yet, any earlier rows are another's."""
    if not cfg.bench or cfg.append_results or not dist.is_main():
        return
    from fastdiff.bench import results_csv_path
    from fastdiff.results import teacher_hashes

    csv_path = results_csv_path(cfg.results_dir, sweep_name(cfg))
    held = teacher_hashes(csv_path)
    if not held:
        return
    teacher = resolve_path_only(cfg)
    mine = load_teacher(teacher, cfg).hash if teacher_exists(teacher) else None
    if held - {mine}:
        raise FastdiffError(f"{csv_path} holds the sweep of teacher {', '.join(sorted(held))}; this run's teacher is "
                            f"{mine or 'not trained yet'}: pass --append-results to add its rows to that file, or "
                            "choose another --results-dir")


def absolute_teacher(config: dict) -> dict:
    """A run dir's config.json with its teacher as an absolute path (fastdiff before 0.2 stored it as typed, relative
    to the folder distill ran in; compared from the same folder, the two mean the same file)."""
    if config.get("teacher"):
        return {**config, "teacher": str(Path(config["teacher"]).resolve())}
    return config


def resolve_path_only(cfg: DistillConfig) -> Path:
    """The teacher checkpoint path (or diffusers folder or hub id) resolve_teacher will use, training nothing."""
    return resolve_path(cfg.teacher) if cfg.teacher else Path(teacher_config(cfg).out_dir) / CKPT_NAME


def check_distill_dir(cfg: DistillConfig, prepare: bool = False) -> dict:
    """-> the run's resolved config (with the teacher's absolute path); FastdiffError if cfg.out_dir holds another
    one. With `prepare`, also create the run dir and check it can be written."""
    teacher = resolve_path_only(cfg)
    hub_id = is_diffusers_source(teacher) and not teacher.exists()
    resolved = {**cfgs.to_dict(cfg), "teacher": str(teacher if hub_id else teacher.resolve()),
                "method": "+".join(methods_of(cfg))}  # one spelling of the methods: pd,cd is the pd+cd of before
    check = runs.prepare_run_dir if prepare else runs.check_run_dir
    ignore = NON_RESULT_FIELDS + fields_of_other_methods(cfg)  # e.g. CD's, in a PD-only run
    # compared field by field (sections as dotted paths); a config.json of before names the methods' options flat
    check(Path(cfg.out_dir), cfgs.flatten(resolved), ignore, cfgs.flatten(cfgs.to_dict(DistillConfig())),
          cfgs.renamed_fields(DistillConfig), lambda old: cfgs.flatten(absolute_teacher(old)))
    return resolved


def distill(cfg: DistillConfig, progress: bool = True, on_step: Callable[[int, int], None] | None = None) -> Path:
    """Run (or resume) every round; returns the run dir. Holds the run dir's lock throughout."""
    validate(cfg)
    device = runs.resolve_device(cfg.device)
    runs.set_deterministic(cfg.deterministic)
    check_results_folder(cfg)
    with dist.same_outcome():  # a run dir of another config is refused before any teacher is trained
        resolved = check_distill_dir(cfg) if dist.is_main() else None
    teacher_path = resolve_teacher(cfg, progress)
    with contextlib.ExitStack() as held:
        with dist.same_outcome():  # a run dir refused or locked on rank 0, a teacher or data missing on one node
            teacher0 = load_teacher(teacher_path, cfg, device)
            check_teacher(teacher0, cfg)
            if dist.is_main():  # again: another process may have written it while the teacher trained
                check_distill_dir(cfg, prepare=True)
            run = Path(cfg.out_dir)
            held.enter_context(runs.run_lock(run))
            tcfg = cfgs.from_dict(TrainConfig, teacher0.config)
            data = training_data(tcfg, teacher0.codec, run)  # a latent teacher's: the latents of its autoencoder
            scorer = (round_scorer(tcfg.dataset, teacher0.image_shape, data_root=tcfg.data_root,
                                   seed=data_seed(tcfg),
                                   device=device, inception_weights=cfg.inception_weights) if dist.is_main() else None)
        if dist.is_main():
            write_text(run / "config.json", json.dumps(resolved, indent=2, sort_keys=True) + "\n")
        dist.barrier()
        student_tcfg = dataclasses.replace(tcfg, param=cfg.param, scalar_cond=cfg.guided)
        # the teacher's network, with a guidance-weight input for guided students; initialised from its weights
        student_network = {**teacher0.network, "scalar_cond": cfg.guided}
        ctx = DistillRun(cfg=cfg, run=run, device=device, schedule=teacher0.schedule, tcfg=tcfg, teacher0=teacher0,
                         x_all=data.x.to(device), y_all=data.y.to(device) if data.y is not None else None,
                         num_classes=data.num_classes,
                         conditioner=Conditioner(tcfg.cond, data.num_classes, teacher0.net, device),
                         student_cfg=cfgs.to_dict(student_tcfg),
                         student_network=student_network, progress=progress,
                         on_step=on_step, scorer=scorer)
        for method in parse_methods(cfg.method):  # in order; each marks its stage in state.pt
            method.run(ctx)
    return run


FULL_EXTRA_STEPS = (10, 20)  # --full: the DDIM paper's step counts
# Only in the --full sweep: the samplers that add least to "which few-step method" (and the default's 45-minute budget
# has no room for): DDIM eta = 1 (stochastic, far behind DDIM at few steps), DPM-Solver++(3M) beside (2M), and the
# UniPC variants beside diffusers' default (order 2, bh2). The default keeps DDPM ancestral on the full grid (T NFE:
# the reference every fast sampler is measured against) and strided DDPM beside DDIM.
# (the registry's `full_only` entries: ddim-eta1, dpm++3m, unipc2-bh1, unipc3-bh1, unipc3-bh2)
FULL_ONLY_SAMPLERS = tuple(n for n in registry.sampler_names() if registry.sampler(n).full_only)


def sweep_plan(dcfg: DistillConfig) -> str:
    """What the sweep at the end runs: its samplers and step counts (as sweep_and_report chooses them)."""
    cfg = sweep_config(dcfg, dcfg.out_dir)
    return f"samplers {', '.join(cfg.samplers)}; steps {', '.join(map(str, cfg.steps))}"


def sweep_config(dcfg: DistillConfig, run_dir) -> BenchConfig:
    """The BenchConfig of the sweep that ends `python -m fastdiff.distill`: the bench preset of the teacher preset's
    data set (digits/toy2d/cifar10), the run's teacher and students, its seed/device, and `bench_steps`,
    `bench_samplers`, `bench_samples`, `bench_teacher_samples` where set. Without --full (and --bench-samplers) the
    sweep leaves out FULL_ONLY_SAMPLERS; --full runs them and adds 10 and 20 steps."""
    dataset = dataset_of(dcfg)
    base = BENCH_PRESETS.get(dataset, BenchConfig())
    own = tuple(n for m in parse_methods(dcfg.method) for n in m.samplers)  # the samplers of the run's students
    if dcfg.guided:  # the guided family: DDIM on the CFG teacher vs the w-conditioned students, over w
        base = dataclasses.replace(base, samplers=("ddim",) + own, spacings=("linspace",), guidance=GUIDANCE_SWEEP)
    steps = {"steps": tuple(dcfg.bench_steps)} if dcfg.bench_steps else {}
    if dcfg.bench_samplers:
        steps["samplers"] = tuple(dcfg.bench_samplers)
    elif not dcfg.full and not dcfg.guided:
        steps["samplers"] = tuple(s for s in base.samplers if s not in FULL_ONLY_SAMPLERS)
    chosen = steps.get("samplers", base.samplers)
    if not dcfg.bench_samplers and any(n not in chosen for n in own):  # a method's students join a preset's sweep
        steps["samplers"] = tuple(chosen) + tuple(n for n in own if n not in chosen)
    if dcfg.full:
        steps["steps"] = tuple(sorted(set(steps.get("steps", base.steps)) | set(FULL_EXTRA_STEPS)))
    if dcfg.bench_samples:
        steps.update(n_samples=dcfg.bench_samples, batch_size=min(base.batch_size, dcfg.bench_samples))
    if dcfg.bench_teacher_samples:
        steps["teacher_samples"] = dcfg.bench_teacher_samples
    return dataclasses.replace(base, model="", distill_dir=str(run_dir), seed=dcfg.seed, device=dcfg.device,
                               name=sweep_name(dcfg), out_dir=dcfg.results_dir, append=dcfg.append_results,
                               inception_weights=dcfg.inception_weights, dataset=dcfg.dataset, noise=dcfg.noise,
                               data_root=dcfg.data_root, **steps)


def sweep_and_report(run_dir, dcfg: DistillConfig) -> Path:
    """The sweep (`sweep_config`) and report that end `python -m fastdiff.distill`. -> report.md."""
    cfg = sweep_config(dcfg, run_dir)
    csv_path = run_sweep(cfg)
    if not dist.is_main():
        return Path(cfg.out_dir) / "report.md"
    # the methods' own evaluation while training, beside the sweep: the report's FID-vs-training-cost figure
    write_training_points(run_dir, parse_methods(dcfg.method), csv_path.parent)
    autoencoder = Path(TRAIN_PRESETS[dcfg.teacher_preset].autoencoder or "-") / AUTOENCODER_INFO
    if not dcfg.teacher and autoencoder.is_file():  # a latent family: its autoencoder's reconstruction floor beside it
        write_text(csv_path.parent / AUTOENCODER_INFO, autoencoder.read_text())
    return write_report(cfg.out_dir)


def dry_run(cfg: DistillConfig) -> int:
    """Check `cfg` (teacher, run dir, results folder) and print the plan; trains nothing, writes nothing."""
    validate(cfg)
    runs.resolve_device(cfg.device)
    check_results_folder(cfg)
    teacher = resolve_path_only(cfg)
    if cfg.teacher or teacher_exists(teacher):  # a --teacher that is missing is refused by load_model
        check_teacher(load_teacher(teacher, cfg), cfg)
    check_distill_dir(cfg)
    plan = [line for method in parse_methods(cfg.method) for line in method.plan(cfg)]
    autoencoder = TRAIN_PRESETS[cfg.teacher_preset].autoencoder
    first = (f", after its autoencoder {autoencoder} (python -m fastdiff.autoencoder)"
             if autoencoder and not (Path(autoencoder) / AUTOENCODER_INFO).is_file() else "")
    print(f"teacher: {teacher}" + ("" if teacher_exists(teacher) else
                                   f" (to train: preset {cfg.teacher_preset!r}{first})"))
    print("stages: " + "; ".join(plan) + f" in {cfg.out_dir}")
    print(f"sweep: {'off' if not cfg.bench else f'{cfg.results_dir}/{sweep_name(cfg)}: {sweep_plan(cfg)}'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    dist.configure_cpu_threads()
    cfg, args = runs.config_from_argv(argv, DistillConfig, PRESETS, "python -m fastdiff.distill",
                                      "Distil a teacher into few-step students (progressive and/or consistency distillation), then benchmark and "
                                      "report.")
    if args.dry_run:
        return dry_run(cfg)
    t0 = time.perf_counter()
    with dist.init_from_env(cfg.device), runs.graceful_stop():
        run = distill(cfg)
        if cfg.bench:
            sweep_and_report(run, cfg)
        dist.barrier()
        if dist.is_main():  # inside: once the process group is gone every process counts as rank 0
            logs = [str(run / m.training_log) for m in parse_methods(cfg.method) if m.training_log]
            print(f"done: students in {run / 'students'}" + (f", their evaluation in {', '.join(logs)}" if logs else "")
                  + f" (total {time.perf_counter() - t0:.0f} s)")
    return 0

