"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): `python -m fastdiff.distill`.

With no arguments it runs the bundled default end to end on a CPU: train (or reuse) the `digits`
teacher, distill it round by round from `start_steps` down to 1 step, evaluate every round, then run
the FID-vs-steps sweep and write the report. Every round is resumable: kill it at any moment and
re-run the same command; it continues inside the current round from the last checkpoint.

Run dir layout: `config.json`, `state.pt` (the round in progress; the one before kept as `state.prev.pt`),
`rounds.csv` (one row per finished round), `students/student_N{N}.pt` (each a checkpoint loadable by
`fastdiff.load_student`, which records its own grid N: sample it with DDIM eta=0 on t_i = i/N). One process
at a time holds the run dir; SIGTERM/SIGINT stop it after the current update with a checkpoint (exit 143/130).
The sweep's results go to `--results-dir` (default runs/results, apart from the committed reference results),
and a results CSV that holds another teacher's sweep is refused unless `--append-results`.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from fastdiff import config as C
from fastdiff import distributed as D
from fastdiff import param as P
from fastdiff import runs
from fastdiff.checkpoint import CKPT_NAME, LoadedModel, load_model, load_resumable, load_student, save_checkpoint
from fastdiff.data import get_data, static_info
from fastdiff.errors import FastdiffError, run_cli
from fastdiff.guidance import guided_x0_eps
from fastdiff.io import atomic_path, write_text
from fastdiff.losses import snr_weight
from fastdiff.metrics import round_scorer
from fastdiff.schedules import Schedule
from fastdiff.train import PRESETS as TRAIN_PRESETS
from fastdiff.train import TrainConfig, build_network, config_from_argv, prepare_run_dir, resolve_device, train

log = logging.getLogger(__name__)

ROUND_FIELDS = ["round", "teacher_steps", "student_steps", "updates", "loss", "metric", "student_value",
                "teacher_ddim_value", "student_accuracy", "teacher_accuracy", "wall_clock_s"]
NON_RESULT_FIELDS = ("out_dir", "device", "ckpt_every", "eval_samples", "bench", "results_dir", "bench_steps",
                     "eval_guidance", "inception_weights", "deterministic", "append_results", "bench_samples",
                     "bench_samplers")
__all__ = ["DistillConfig", "PRESETS", "distill", "distill_target", "load_student", "main"]


@dataclass(frozen=True)
class DistillConfig:
    """A progressive-distillation run; `teacher_preset` names the TrainConfig preset of the teacher."""

    teacher: str = ""
    teacher_preset: str = "digits"
    teacher_steps: int = 0
    start_steps: int = 64
    rounds: int = 0
    steps_per_round: int = 500
    last_rounds_factor: int = 2
    param: str = "v"
    weighting: str = "snr-trunc"
    lr: float = 2e-4
    batch_size: int = 128
    seed: int = 0
    ckpt_every: int = 100
    eval_samples: int = 500
    out_dir: str = "runs/distill-digits"
    device: str = "auto"
    bench: bool = True
    bench_steps: tuple[int, ...] = ()
    bench_samples: int = 0
    bench_samplers: tuple[str, ...] = ()
    results_dir: str = "runs/results"
    append_results: bool = False
    guided: bool = False
    w_min: float = 0.0
    w_max: float = 4.0
    guided_base_updates: int = 1000
    eval_guidance: float = 2.0
    inception_weights: str = ""
    deterministic: bool = False


PRESETS = {
    # Sized for a 2-core CPU: the sweep stops at 64 steps, where DDIM has converged (10 and 20: DDIM's paper).
    "digits": DistillConfig(steps_per_round=400, bench_steps=(1, 2, 4, 8, 10, 16, 20, 32, 64)),
    "toy2d": DistillConfig(teacher_preset="toy2d", start_steps=64, steps_per_round=400, lr=5e-4, batch_size=512,
                           eval_samples=2000, out_dir="runs/distill-toy2d"),
    # Meng et al. 2023: a class-conditional teacher under classifier-free guidance, distilled first into one
    # network that takes the guidance weight w as an input, then progressively.
    "digits-guided": DistillConfig(teacher_preset="digits-cond", guided=True, start_steps=16, steps_per_round=300,
                                   guided_base_updates=800, out_dir="runs/distill-digits-guided",
                                   bench_steps=(1, 2, 4, 8, 16, 32)),
    # Salimans & Ho 2022 (CIFAR-10): 8192 -> 1 steps, 50k updates per round (100k for the last two),
    # Adam lr 5e-5 linearly annealed to 0, batch 128, no EMA during distillation.
    "cifar10": DistillConfig(teacher_preset="cifar10", start_steps=8192, steps_per_round=50_000, lr=5e-5,
                             ckpt_every=2000, eval_samples=10_000, out_dir="runs/distill-cifar10"),
}


def num_rounds(cfg: DistillConfig) -> int:
    full = int(math.log2(cfg.start_steps))
    return min(cfg.rounds, full) if cfg.rounds > 0 else full


def round_updates(cfg: DistillConfig, r: int) -> int:
    """Updates in round r (0-based); the paper doubles the last two rounds (to 1 and 2 steps)."""
    return cfg.steps_per_round * (cfg.last_rounds_factor if r >= num_rounds(cfg) - 2 else 1)


def validate(cfg: DistillConfig) -> None:
    if cfg.teacher_preset not in TRAIN_PRESETS:
        raise FastdiffError(f"unknown --teacher-preset {cfg.teacher_preset!r}; choose one of {', '.join(TRAIN_PRESETS)}")
    if cfg.start_steps < 2 or cfg.start_steps & (cfg.start_steps - 1):
        raise FastdiffError(f"--start-steps must be a power of two >= 2, got {cfg.start_steps}")
    if cfg.param not in P.PARAMS:
        raise FastdiffError(f"--param {cfg.param!r} is not one of {', '.join(P.PARAMS)}")
    if cfg.weighting not in ("snr-trunc", "snr+1"):
        raise FastdiffError(f"--weighting {cfg.weighting!r} is not one of snr-trunc, snr+1")
    for name in ("steps_per_round", "batch_size", "ckpt_every", "eval_samples", "last_rounds_factor"):
        if getattr(cfg, name) < 1:
            raise FastdiffError(f"--{name.replace('_', '-')} must be >= 1")
    from fastdiff.bench import SAMPLERS

    unknown = [name for name in cfg.bench_samplers if name not in SAMPLERS]
    if unknown:
        raise FastdiffError(f"--bench-samplers: unknown {', '.join(unknown)}; choose from {', '.join(SAMPLERS)}")
    if cfg.lr <= 0 or cfg.rounds < 0 or cfg.bench_samples < 0:
        raise FastdiffError("need --lr > 0, --rounds >= 0 and --bench-samples >= 0")


def distill_target(z_t, t, x0_fn, schedule: Schedule, n_student: int) -> torch.Tensor:
    """(B, ...) x_tilde: the x the student must predict at z_t so that one DDIM step hits two teacher steps.

    Salimans & Ho 2022, Algorithm 2: t' = t - 0.5/N, t'' = t - 1/N; z_t -> z_t' -> z_t'' by DDIM (eta=0,
    no clipping) with the teacher; x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t).
    `x0_fn(z, t)` returns the teacher's (x0_hat, eps_hat); t is (B,) float64.
    """
    def ddim_to(z, s_from, s_to):
        x0, eps = x0_fn(z, s_from)
        a, s = (P.append_dims(v.to(z), z.ndim) for v in schedule.alpha_sigma(s_to))
        return a * x0 + s * eps  # DDIM eta=0: x_s = alpha_s x0_hat + sigma_s eps_hat

    t1, t2 = t - 0.5 / n_student, t - 1.0 / n_student
    z2 = ddim_to(ddim_to(z_t, t, t1), t1, t2)
    a_t, s_t = schedule.alpha_sigma(t)
    a_2, s_2 = schedule.alpha_sigma(t2)
    ratio = s_2 / s_t
    num = z2 - P.append_dims((ratio).to(z_t), z_t.ndim) * z_t
    return num / P.append_dims((a_2 - ratio * a_t).to(z_t), z_t.ndim)


def teacher_fn(model: LoadedModel | torch.nn.Module, param: str, schedule: Schedule, cond: dict | None = None):
    """Teacher as (z, t float64) -> (x0_hat, eps_hat), through fastdiff.param (eps, x0 or v teachers).

    `cond` holds extra network inputs for this batch (class labels y, guidance weight w of a guided student).
    """
    net = model.net if isinstance(model, LoadedModel) else model
    cond = cond or {}

    def fn(z, t):
        a, s = (v.to(z) for v in schedule.alpha_sigma(t))
        return P.to_x0_eps(net(z, t.to(z), **cond), z, a, s, param)

    return fn


def student_loss(student, target_fn, x0, schedule, cfg: DistillConfig, n_student: int | None, gen,
                 cond: dict | None = None):
    """(B,) w(lambda_t)·||x_tilde - x_hat_student(z_t)||^2.

    Progressive rounds (n_student = N): t = i/N, i ~ U{1..N}, x_tilde from two teacher DDIM steps. The guided
    first stage (n_student None, Meng et al. 2023): t ~ U[1e-3, 1], x_tilde = the guided teacher's x0_hat.
    `target_fn(z, t) -> (x0_hat, eps_hat)` is the teacher for this batch.
    """
    b = x0.shape[0]
    if n_student is None:
        t = 1e-3 + (1 - 1e-3) * torch.rand(b, generator=gen, dtype=torch.float64)
    else:
        t = torch.randint(1, n_student + 1, (b,), generator=gen).double() / n_student
    eps = torch.randn(x0.shape, generator=gen).to(x0)
    a, s = (v.to(x0) for v in schedule.alpha_sigma(t))
    z_t = P.append_dims(a, x0.ndim) * x0 + P.append_dims(s, x0.ndim) * eps
    with torch.no_grad():
        target = (target_fn(z_t, t)[0] if n_student is None
                  else distill_target(z_t, t, target_fn, schedule, n_student))
    x_hat, _ = P.to_x0_eps(student(z_t, t.to(x0), **(cond or {})), z_t, a, s, cfg.param)
    w = snr_weight(schedule.logsnr(t).to(x0), cfg.weighting)
    return w * (target - x_hat).pow(2).mean(tuple(range(1, x0.ndim)))


def sample_model(model, n_steps: int, n: int, shape, schedule, param, seed, device, grid="student", guidance=None):
    """n samples with per-index noise: DDIM eta=0 on `grid` with `n_steps` steps (CFG weight `guidance`)."""
    from fastdiff.samplers import ddim, make_grid, randn_like_per_sample, sample_generators

    net = model.net if isinstance(model, LoadedModel) else model
    x = randn_like_per_sample((n, *shape), sample_generators(seed, range(n)), torch.float32, device)
    with torch.no_grad():
        return ddim(net, x, make_grid(grid, n_steps, schedule), schedule=schedule, param=param,
                    clip=len(shape) > 1, guidance=guidance).x


class RoundLog:
    """rounds.csv, rewritten atomically: one row per finished round, never duplicated."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = list(csv.DictReader(open(path, newline=""))) if path.exists() else []

    def done(self, r: int) -> bool:
        return any(int(row["round"]) == r for row in self.rows)

    def add(self, row: dict) -> None:
        self.rows = [x for x in self.rows if int(x["round"]) != row["round"]] + [row]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, ROUND_FIELDS)
            writer.writeheader()
            writer.writerows(sorted(self.rows, key=lambda x: int(x["round"])))


def resolve_teacher(cfg: DistillConfig, progress: bool) -> Path:
    """The teacher checkpoint: --teacher if given, else train (or reuse) the preset's teacher."""
    if cfg.teacher:
        return Path(cfg.teacher) / CKPT_NAME if Path(cfg.teacher).is_dir() else Path(cfg.teacher)
    return train(_teacher_config(cfg), progress=progress) / CKPT_NAME


def _teacher_config(cfg: DistillConfig) -> TrainConfig:
    tcfg = TRAIN_PRESETS[cfg.teacher_preset]
    return dataclasses.replace(tcfg, device=cfg.device, deterministic=cfg.deterministic,
                               **({"steps": cfg.teacher_steps} if cfg.teacher_steps else {}))


def check_teacher(teacher: LoadedModel, cfg: DistillConfig) -> None:
    """Refuse a teacher whose schedule or data shape doesn't match the preset."""
    expected = TRAIN_PRESETS[cfg.teacher_preset]
    shape, _ = static_info(expected.dataset, expected.image_size)
    tcfg = teacher.config
    if tcfg["schedule"] != expected.schedule or tuple(teacher.data_shape) != tuple(shape):
        raise FastdiffError(
            f"teacher {teacher.path} (schedule {tcfg['schedule']}, data shape {tuple(teacher.data_shape)}) does not match "
            f"preset {cfg.teacher_preset!r} (schedule {expected.schedule}, data shape {shape}); "
            "pass --teacher-preset matching the teacher or another --teacher")
    if teacher.kind != "teacher":
        raise FastdiffError(f"{teacher.path} is a {teacher.kind} checkpoint; --teacher needs a teacher")
    if cfg.guided and tcfg.get("cond") != "class":
        raise FastdiffError(f"--guided needs a class-conditional teacher (trained with --cond class); {teacher.path} "
                            "is unconditional: use --teacher-preset digits-cond or another --teacher")


def check_results_folder(cfg: DistillConfig) -> None:
    """Before any work: refuse a results CSV holding another teacher's sweep (unless --append-results), so that a
    run never mixes its rows into another's. Without a teacher checkpoint yet, any earlier rows are another's."""
    if not cfg.bench or cfg.append_results or not D.is_main():
        return
    from fastdiff.bench import results_csv_path
    from fastdiff.results import teacher_hashes

    csv_path = results_csv_path(cfg.results_dir, sweep_name(cfg))
    held = teacher_hashes(csv_path)
    if not held:
        return
    teacher = resolve_path_only(cfg)
    mine = load_model(teacher).hash if teacher.is_file() else None
    if held - {mine}:
        raise FastdiffError(f"{csv_path} holds the sweep of teacher {', '.join(sorted(held))}; this run's teacher is "
                            f"{mine or 'not trained yet'}: pass --append-results to add its rows to that file, or "
                            "choose another --results-dir")


def resolve_path_only(cfg: DistillConfig) -> Path:
    """The teacher checkpoint path resolve_teacher will use, without training anything."""
    if cfg.teacher:
        return Path(cfg.teacher) / CKPT_NAME if Path(cfg.teacher).is_dir() else Path(cfg.teacher)
    return Path(_teacher_config(cfg).out_dir) / CKPT_NAME


def sweep_name(cfg: DistillConfig) -> str:
    """The results folder of the run's sweep: the data set's name, `-guided` for a guided family."""
    dataset = TRAIN_PRESETS[cfg.teacher_preset].dataset.partition(":")[0]
    return f"{dataset}-guided" if cfg.guided else dataset


@dataclass
class _Run:
    """What every stage of one distillation run shares."""

    cfg: DistillConfig
    run: Path
    device: torch.device
    schedule: Schedule
    tcfg: TrainConfig
    teacher0: LoadedModel
    x_all: torch.Tensor
    y_all: torch.Tensor | None
    num_classes: int
    student_cfg: dict
    progress: bool
    on_step: Callable[[int, int], None] | None
    scorer: tuple[str, Callable[[torch.Tensor], float]] | None = None

    @property
    def state_path(self) -> Path:
        return self.run / "state.pt"


def _batch_cond(ctx: _Run, idx, gen) -> dict:
    """Extra network inputs of a guided run: the examples' labels and a guidance weight w ~ U[w_min, w_max]."""
    if not ctx.cfg.guided:
        return {}
    w = ctx.cfg.w_min + (ctx.cfg.w_max - ctx.cfg.w_min) * torch.rand(len(idx), generator=gen)
    return {"y": ctx.y_all[idx], "w": w.to(ctx.x_all)}


def _train_stage(ctx: _Run, r: int, student, teacher_net, teacher_param: str, n_student: int | None, total: int,
                 label: str) -> tuple[float, float]:
    """Train `student` for `total` updates of stage r (resumable from state.pt); -> (recent loss, wall-clock s).

    A stop request ends it after the current update with state.pt written (Preempted)."""
    cfg = ctx.cfg
    teacher_net.eval().requires_grad_(False)
    student.train().requires_grad_(True)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    salt = cfg.seed * 7919 + r * 104729
    gen = torch.Generator().manual_seed(salt + D.rank())
    torch.manual_seed(salt + 1 + D.rank())  # dropout draws from the global stream: seeded per stage, saved below
    updates, round_wall, recent = 0, 0.0, []
    state = load_resumable(ctx.state_path, map_location=ctx.device)
    if state is not None and state["round"] == r:
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        updates, round_wall, recent = state["step"], state["wall_clock_s"], list(state.get("recent", []))
        rng = state["rng"]
        runs.restore_rng(rng if isinstance(rng, dict) else {"data": rng, "torch": [torch.get_rng_state()]},
                         gen, ctx.device, salt, updates)
        log.info("resuming %s at update %d/%d", label, updates, total)
    model = D.wrap_ddp(student, ctx.device)
    local_batch = D.local_batch_size(cfg.batch_size)
    t0, saved = time.perf_counter() - round_wall, updates

    def save() -> None:
        nonlocal saved
        rng = runs.capture_rng(gen, ctx.device)  # a collective: every rank
        if D.is_main() and saved != updates:
            save_checkpoint(ctx.state_path, {"kind": "distill-state", "config": ctx.student_cfg,
                                             "model": student.state_dict(), "round": r, "step": updates,
                                             "optimizer": opt.state_dict(), "rng": rng, "recent": recent,
                                             "wall_clock_s": time.perf_counter() - t0}, keep_previous=True)
        saved = updates

    # The bar closes on any exit, so that an error line starts on a line of its own.
    with tqdm(total=total, initial=updates, desc=label, disable=not ctx.progress or not D.is_main(),
              dynamic_ncols=True) as bar:
        while updates < total:
            for group in opt.param_groups:  # Salimans & Ho 2022, sec. 5: the learning rate annealed linearly to 0
                group["lr"] = cfg.lr * (1 - updates / total)
            idx = torch.randint(len(ctx.x_all), (local_batch,), generator=gen).to(ctx.device)
            cond = _batch_cond(ctx, idx, gen)
            if n_student is None:  # the guided first stage: match the CFG teacher at the sampled w
                target_fn = guided_x0_eps(teacher_net, teacher_param, ctx.schedule, cond["y"], cond["w"],
                                          ctx.num_classes)
            else:
                target_fn = teacher_fn(teacher_net, teacher_param, ctx.schedule, cond)
            loss = student_loss(model, target_fn, ctx.x_all[idx], ctx.schedule, cfg, n_student, gen, cond).mean()
            if not torch.isfinite(loss):
                raise FastdiffError(f"distillation loss became {loss.item()} in {label} at update {updates}; "
                                    f"the last good checkpoint {ctx.state_path} is kept — lower --lr and re-run")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            updates += 1
            recent = (recent + [loss.item()])[-50:]
            bar.update(1)
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
            # The state at the end of the stage is kept too: a student file lost later is rebuilt from it.
            if updates % cfg.ckpt_every == 0 or updates == total:
                save()
            if ctx.on_step is not None:
                ctx.on_step(r, updates)
            if updates < total:
                runs.stop_if_requested(ctx.device, save, f"in {label} at update {updates}/{total}; "
                                                         f"checkpoint {ctx.state_path}")
    student.eval().requires_grad_(False)
    return sum(recent) / max(len(recent), 1), time.perf_counter() - t0


def _save_student(ctx: _Run, path: Path, student, n_student: int | None, r: int, updates: int) -> None:
    if D.is_main():
        save_checkpoint(path, {"kind": "student", "config": ctx.student_cfg, "param": ctx.cfg.param, "steps": n_student,
                               "data_shape": list(ctx.teacher0.data_shape), "model": student.state_dict(), "round": r,
                               "updates": updates, "teacher": str(ctx.teacher0.path), "guided": ctx.cfg.guided})


def _finished_student(ctx: _Run, rounds: "RoundLog", r: int, path: Path):
    """The network of a finished stage r, or None when the stage must run (again): not finished, or its student
    file is unreadable (then the stage resumes from its last state and writes the file anew)."""
    if not (rounds.done(r) and path.exists()):
        return None
    try:
        return load_model(path, ctx.device).net
    except FastdiffError as err:
        log.warning("%s; rebuilding it from the round's last state", str(err).split(";")[0])
        return None


def _guided_base(ctx: _Run, rounds: "RoundLog") -> torch.nn.Module:
    """Stage one of guided distillation: one network s(z, t, y, w) matching the CFG teacher at every w."""
    path = ctx.run / "students" / "guided_base.pt"
    done = _finished_student(ctx, rounds, -1, path)
    if done is not None:
        return done
    student = build_network(C.from_dict(TrainConfig, ctx.student_cfg)).to(ctx.device)
    missing, unexpected = student.load_state_dict(ctx.teacher0.net.state_dict(), strict=False)
    if unexpected or not all(k.startswith("embed.scalar") for k in missing):
        raise FastdiffError(f"teacher {ctx.teacher0.path} does not fit a w-conditioned student (missing {missing}, "
                            f"unexpected {unexpected}); pass a teacher trained by python -m fastdiff.train")
    # Zero the w-embedding's output layer: the student starts as the conditional teacher (w = 1 behaviour).
    torch.nn.init.zeros_(student.embed.scalar[-1].weight)
    torch.nn.init.zeros_(student.embed.scalar[-1].bias)
    loss, wall = _train_stage(ctx, -1, student, ctx.teacher0.net, ctx.teacher0.param, None,
                              ctx.cfg.guided_base_updates, "guided stage 1: w-conditioned student")
    _save_student(ctx, path, student, None, -1, ctx.cfg.guided_base_updates)
    if D.is_main() and not rounds.done(-1):
        rounds.add({"round": -1, "teacher_steps": "", "student_steps": "", "updates": ctx.cfg.guided_base_updates,
                    "loss": f"{loss:.6f}", "wall_clock_s": f"{wall:.1f}",
                    **evaluate_round(student, ctx, ctx.cfg.start_steps)})
    D.barrier()
    return student


def distill(cfg: DistillConfig, progress: bool = True, on_step: Callable[[int, int], None] | None = None) -> Path:
    """Run (or resume) every round; returns the run dir. Holds the run dir's lock throughout."""
    validate(cfg)
    device = resolve_device(cfg.device)
    runs.set_deterministic(cfg.deterministic)
    check_results_folder(cfg)
    teacher_path = resolve_teacher(cfg, progress)
    resolved = {**C.to_dict(cfg), "teacher": str(teacher_path)}
    with contextlib.ExitStack() as held:
        with D.same_outcome():  # a run dir refused or locked on rank 0, a teacher or data missing on one node
            teacher0 = load_model(teacher_path, device)
            check_teacher(teacher0, cfg)
            run = (prepare_run_dir(cfg.out_dir, resolved, NON_RESULT_FIELDS, C.to_dict(DistillConfig())) if D.is_main()
                   else Path(cfg.out_dir))
            held.enter_context(runs.run_lock(run))
            tcfg = C.from_dict(TrainConfig, teacher0.config)
            data = get_data(tcfg.dataset, "train", tcfg.data_root, tcfg.seed, tcfg.image_size)
            scorer = (round_scorer(tcfg.dataset, tuple(teacher0.data_shape), data_root=tcfg.data_root, seed=tcfg.seed,
                                   device=device, inception_weights=cfg.inception_weights) if D.is_main() else None)
        if D.is_main():
            write_text(run / "config.json", json.dumps(resolved, indent=2, sort_keys=True) + "\n")
        D.barrier()
        ctx = _Run(cfg, run, device, teacher0.schedule, tcfg, teacher0, data.x.to(device),
                   data.y.to(device) if data.y is not None else None, data.num_classes,
                   C.to_dict(dataclasses.replace(tcfg, param=cfg.param, scalar_cond=cfg.guided)), progress, on_step,
                   scorer)
        _rounds(ctx)
    return run


def _rounds(ctx: _Run) -> None:
    """The guided first stage (if any), then every progressive round N -> N/2, each skipped once finished."""
    cfg, run, device = ctx.cfg, ctx.run, ctx.device
    rounds = RoundLog(run / "rounds.csv")
    (run / "students").mkdir(exist_ok=True)
    t_run = time.perf_counter()
    if all(rounds.done(r) for r in range(num_rounds(cfg))):
        log.info("%s already finished all %d rounds; nothing to distill", run, num_rounds(cfg))
    teacher_net, teacher_param = ctx.teacher0.net, ctx.teacher0.param
    if cfg.guided:
        teacher_net, teacher_param = _guided_base(ctx, rounds), cfg.param
    for r in range(num_rounds(cfg)):
        n_student = cfg.start_steps // 2 ** (r + 1)
        student_path = run / "students" / f"student_N{n_student}.pt"
        done = _finished_student(ctx, rounds, r, student_path)
        if done is not None:
            teacher_net, teacher_param = done, cfg.param
            continue
        student = build_network(C.from_dict(TrainConfig, ctx.student_cfg)).to(device)
        student.load_state_dict(teacher_net.state_dict())
        total = round_updates(cfg, r)
        loss, wall = _train_stage(ctx, r, student, teacher_net, teacher_param, n_student, total,
                                  f"round {r + 1}/{num_rounds(cfg)}: {2 * n_student}->{n_student} steps")
        _save_student(ctx, student_path, student, n_student, r, total)
        if D.is_main() and not rounds.done(r):
            row = evaluate_round(student, ctx, n_student)
            rounds.add({"round": r, "teacher_steps": 2 * n_student, "student_steps": n_student, "updates": total,
                        "loss": f"{loss:.6f}", "wall_clock_s": f"{wall:.1f}", **row})
            log.info("round %d: %d-step student %s=%s (teacher DDIM %d steps: %s)", r, n_student, row["metric"],
                     row["student_value"], n_student, row["teacher_ddim_value"])
        D.barrier()
        teacher_net, teacher_param = student, cfg.param
    log.info("distillation finished in %.1f s", time.perf_counter() - t_run)


def evaluate_round(student, ctx: _Run, n_student: int) -> dict:
    """Score the N-step student and the teacher's N-step DDIM on the same per-index noise.

    Guided runs sample class k % num_classes for index k at w = eval_guidance (the teacher through CFG,
    the student through its w input) and also report the classifier's accuracy on the asked-for class.
    """
    from fastdiff.guidance import conditional, guided
    from fastdiff.metrics import class_accuracy

    cfg, teacher = ctx.cfg, ctx.teacher0
    shape, n = tuple(teacher.data_shape), cfg.eval_samples
    kw = dict(n_steps=n_student, n=n, shape=shape, schedule=ctx.schedule, seed=cfg.seed, device=ctx.device)
    row = {}
    if cfg.guided:
        y = torch.arange(n, device=ctx.device) % ctx.num_classes
        w = torch.full((n,), cfg.eval_guidance, device=ctx.device)
        x_student = sample_model(conditional(student, y, w), param=cfg.param, **kw)
        x_teacher = sample_model(guided(teacher.net, y, ctx.num_classes), param=teacher.param,
                                 guidance=cfg.eval_guidance, **kw)
        if len(shape) == 3:  # the project's classifier exists for labelled image data sets
            row = {"student_accuracy": f"{class_accuracy(x_student, y, ctx.tcfg.dataset):.4f}",
                   "teacher_accuracy": f"{class_accuracy(x_teacher, y, ctx.tcfg.dataset):.4f}"}
    else:
        x_student = sample_model(student, param=cfg.param, **kw)
        x_teacher = sample_model(teacher, param=teacher.param, **kw)
    name, score = ctx.scorer
    return {"metric": name, "student_value": f"{score(x_student):.6g}", "teacher_ddim_value": f"{score(x_teacher):.6g}",
            **row}


def main(argv: Sequence[str] | None = None) -> int:
    D.configure_cpu_threads()
    cfg, _ = config_from_argv(argv, DistillConfig, PRESETS, "python -m fastdiff.distill",
                              "Progressively distill a teacher into few-step students, then benchmark and report.")
    t0 = time.perf_counter()
    with D.init_from_env(cfg.device), runs.graceful_stop():
        run = distill(cfg)
        if cfg.bench:
            from fastdiff.bench import bench_after_distill

            bench_after_distill(run, cfg)
        D.barrier()
        if D.is_main():  # inside: once the process group is gone every process counts as rank 0
            print(f"done: students in {run / 'students'}, per-round table {run / 'rounds.csv'} "
                  f"(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
