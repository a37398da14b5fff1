"""What every stage of a distillation run shares: the run's context, the resumable optimiser loop of one stage, the
student files, and the per-round evaluation (the student against the teacher's DDIM at the same step count)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from fastdiff import distributed as D
from fastdiff import runs
from fastdiff.checkpoint import LoadedModel, load_model, load_resumable, save_checkpoint
from fastdiff.distill.config import DistillConfig
from fastdiff.distill.progressive import student_loss, teacher_fn
from fastdiff.errors import FastdiffError
from fastdiff.guidance import guided_x0_eps
from fastdiff.runs import RoundLog
from fastdiff.schedules import Schedule
from fastdiff.train import TrainConfig

log = logging.getLogger(__name__)


def sample_model(model, n_steps: int, n: int, shape, schedule, param, seed, device, grid="student", guidance=None):
    """n samples with per-index noise: DDIM eta=0 on `grid` with `n_steps` steps (CFG weight `guidance`)."""
    from fastdiff.samplers import ddim, make_grid, randn_like_per_sample, sample_generators

    net = model.net if isinstance(model, LoadedModel) else model
    x = randn_like_per_sample((n, *shape), sample_generators(seed, range(n)), torch.float32, device)
    with torch.no_grad():
        return ddim(net, x, make_grid(grid, n_steps, schedule), schedule=schedule, param=param,
                    clip=len(shape) > 1, guidance=guidance).x


@dataclass
class DistillRun:
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
    student_cfg: dict  # the students' TrainConfig, as a dict
    student_network: dict  # the students' network, as checkpoints describe it
    progress: bool
    on_step: Callable[[int, int], None] | None
    scorer: tuple[str, Callable[[torch.Tensor], float]] | None = None

    @property
    def state_path(self) -> Path:
        return self.run / "state.pt"


def batch_cond(ctx: DistillRun, idx, gen) -> dict:
    """Extra network inputs of a guided run: the examples' labels and a guidance weight w ~ U[w_min, w_max]."""
    if not ctx.cfg.guided:
        return {}
    w = ctx.cfg.w_min + (ctx.cfg.w_max - ctx.cfg.w_min) * torch.rand(len(idx), generator=gen)
    return {"y": ctx.y_all[idx], "w": w.to(ctx.x_all)}


def train_stage(ctx: DistillRun, r: int, student, teacher_net, teacher_param: str, n_student: int | None, total: int,
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
                                             "network": ctx.student_network,
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
            cond = batch_cond(ctx, idx, gen)
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


def save_student(ctx: DistillRun, path: Path, student, n_student: int | None, r: int, updates: int) -> None:
    if D.is_main():
        save_checkpoint(path, {"kind": "student", "config": ctx.student_cfg, "network": ctx.student_network,
                               "param": ctx.cfg.param, "steps": n_student,
                               "data_shape": list(ctx.teacher0.data_shape), "model": student.state_dict(), "round": r,
                               "updates": updates, "teacher": str(ctx.teacher0.path), "guided": ctx.cfg.guided})


def finished_student(ctx: DistillRun, rounds: RoundLog, r: int, path: Path):
    """The network of a finished stage r, or None when the stage must run (again): not finished, or its student
    file is unreadable (then the stage resumes from its last state and writes the file anew)."""
    if not (rounds.done(r) and path.exists()):
        return None
    try:
        return load_model(path, ctx.device).net
    except FastdiffError as err:
        log.warning("%s; rebuilding it from the round's last state", str(err).split(";")[0])
        return None


def evaluate_round(student, ctx: DistillRun, n_student: int) -> dict:
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
