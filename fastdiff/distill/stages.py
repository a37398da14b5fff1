"""What every stage of a distillation run shares: the run's context, the resumable optimiser loop of one stage, the
student files, and the per-round evaluation (the student against the teacher's DDIM at the same step count)."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from fastdiff import distributed as dist
from fastdiff import runs
from fastdiff.checkpoint import LoadedModel, load_model, load_resumable
from fastdiff.distill.progressive import student_loss, teacher_fn
from fastdiff.distill.protocol import accuracy_columns
from fastdiff.errors import FastdiffError
from fastdiff.guidance import guided_x0_eps
from fastdiff.runs import RoundLog
from fastdiff.samplers import make_grid, sample
from fastdiff.schedules import Schedule
from fastdiff.train import TrainConfig

if TYPE_CHECKING:  # not at import: fastdiff.distill.config imports the methods, which import this module
    from fastdiff.distill.config import DistillConfig

log = logging.getLogger(__name__)


def sample_model(model, n_steps: int, n: int, shape, schedule, param, seed, device, grid="student", guidance=None, *,
                 clip: bool, rng: str = "philox"):
    """n samples with per-index noise (generator `rng`, fastdiff.noise): DDIM eta=0 on `grid` with `n_steps` steps
    (CFG weight `guidance`; x0^ clipped to [-1, 1] with `clip`)."""
    net = model.net if isinstance(model, LoadedModel) else model
    return sample(net, n, shape, make_grid(grid, n_steps, schedule), schedule=schedule, param=param, seed=seed,
                  device=device, clip=clip, guidance=guidance, rng=rng)


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
    conditioner: object  # fastdiff.conditioning.Conditioner: a batch's condition from its labels (class or text)
    student_cfg: dict  # the students' TrainConfig, as a dict
    student_network: dict  # the students' network, as checkpoints describe it
    progress: bool
    on_step: Callable[[int, int], None] | None
    scorer: tuple[str, Callable[[torch.Tensor], float]] | None = None

    @property
    def state_path(self) -> Path:
        return self.run / "state.pt"

    @property
    def clip(self) -> bool:
        """Whether x0^ is clipped to [-1, 1] (pixel images; not points, not latents)."""
        return self.teacher0.clip

    @functools.cached_property
    def latent_payload(self) -> dict:
        """What every student checkpoint of a latent teacher carries: its autoencoder (fastdiff.latent)."""
        codec = self.teacher0.codec
        return {"autoencoder": codec.to_payload()} if codec is not None else {}

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples as scored: a latent teacher's decoded by its autoencoder, others as they are."""
        return self.teacher0.codec.decode(x) if self.teacher0.codec is not None else x


def batch_cond(ctx: DistillRun, idx, gen) -> dict:
    """Extra network inputs of a guided run: the examples' condition (labels, or a random caption of each label) and
    a guidance weight w ~ U[w_min, w_max]."""
    if not ctx.cfg.guided:
        return {}
    w = ctx.cfg.w_min + (ctx.cfg.w_max - ctx.cfg.w_min) * torch.rand(len(idx), generator=gen)
    return {"y": ctx.conditioner(ctx.y_all[idx], gen), "w": w.to(ctx.x_all)}


def train_stage(ctx: DistillRun, r: int, student, teacher_net, teacher_param: str, n_student: int | None, total: int,
                label: str) -> tuple[float, float]:
    """Train `student` for `total` updates of stage r through runs.fit (resumable from state.pt); -> (mean of the last
    50 losses, wall-clock s). Progressive rounds (n_student = N) match two DDIM steps of the teacher; the guided
    first stage (n_student None) matches the CFG teacher at a w drawn per example. A stop request ends it after
    the current update with state.pt written (Preempted)."""
    cfg = ctx.cfg
    teacher_net.eval().requires_grad_(False)
    student.train().requires_grad_(True)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    salt = cfg.seed * 7919 + r * 104729
    gen = torch.Generator().manual_seed(salt + dist.rank())
    torch.manual_seed(salt + 1 + dist.rank())  # dropout draws from the global stream: seeded per stage, saved by fit
    state = load_resumable(ctx.state_path, map_location=ctx.device)
    local_batch = dist.local_batch_size(cfg.batch_size)
    # an eps teacher's x0_hat is clipped in the target on pixel data, as its sampler clips it (distill_target)
    clip_target = teacher_param == "eps" and ctx.clip

    def loss_fn(model) -> torch.Tensor:
        idx = torch.randint(len(ctx.x_all), (local_batch,), generator=gen).to(ctx.device)
        cond = batch_cond(ctx, idx, gen)
        if n_student is None:  # the guided first stage: match the CFG teacher at the sampled w
            target_fn = guided_x0_eps(teacher_net, teacher_param, ctx.schedule, cond["y"], cond["w"], ctx.num_classes)
        else:
            target_fn = teacher_fn(teacher_net, teacher_param, ctx.schedule, cond)
        return student_loss(model, target_fn, ctx.x_all[idx], ctx.schedule, cfg, n_student, gen, cond,
                            clip_target).mean()

    fitted = runs.fit(
        student, opt, total=total, loss_fn=loss_fn, gen=gen, salt=salt, device=ctx.device,
        lr_at=lambda update: cfg.lr * (1 - update / total),  # Salimans & Ho 2022, sec. 5: annealed linearly to 0
        state_path=ctx.state_path, ckpt_every=cfg.ckpt_every, label=label,
        resume=state if state is not None and state.get("stage") is None and state.get("round") == r else None,
        extra_state=lambda: {"kind": "distill-state", "config": ctx.student_cfg, "network": ctx.student_network,
                             "round": r},
        on_step=None if ctx.on_step is None else lambda update: ctx.on_step(r, update), progress=ctx.progress)
    student.eval().requires_grad_(False)
    return fitted.loss, fitted.seconds


def training_cost(ctx: DistillRun, rounds: RoundLog, r: int, updates: int, wall: float) -> dict:
    """What the student of stage r cost to make, cumulative from the teacher: this stage (`updates`, `wall` s) plus
    every finished stage before it in rounds.csv (the guided first stage is round -1). Per update each example costs
    2 teacher network evaluations (two DDIM steps of progressive distillation; the conditional and unconditional
    halves of the guided stage) and 1 student forward + backward pass: 5 forward-equivalents (a backward = 2 forwards;
    fastdiff.distill.pd.Progressive.update_cost, counted by protocol.student_cost). The teacher's own training is not
    included."""
    from fastdiff.distill.protocol import get_method, student_cost

    earlier = [row for row in rounds.rows if int(row["round"]) < r]
    total_updates = updates + sum(int(row["updates"]) for row in earlier)
    return student_cost(ctx, get_method("pd"), total_updates, wall + sum(float(row["wall_clock_s"]) for row in earlier))


def save_student(ctx: DistillRun, path: Path, student, n_student: int | None, r: int, updates: int,
                 cost: dict | None = None, evaluation: dict | None = None) -> None:
    """students/<name>.pt (rank 0): a checkpoint fastdiff.load_student reads, with its grid N, the schedule,
    `cost`, what it took to make it (`training_cost`), and its role (fastdiff.checkpoint.role_of): method pd, sampler
    distilled on grid student with N steps, and `evaluation`, its own score beside the teacher's DDIM at N steps."""
    from fastdiff.distill.protocol import save_student as save

    save(ctx, path, student, method="pd", sampler="distilled" if n_student else None,
         grid="student" if n_student else "", steps=n_student, cost=cost, evaluation=evaluation,
         swept=bool(n_student), extra={"round": r, "updates": updates})


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

    Guided runs sample class k % num_classes for index k (a text teacher: the held-out paraphrase
    `fastdiff.text.eval_prompt(k)` asking for that digit) at w = eval_guidance (the teacher through CFG, the
    student through its w input) and also report the classifier's accuracy on the asked-for digit.
    """
    cfg, teacher = ctx.cfg, ctx.teacher0
    shape, n = tuple(teacher.data_shape), cfg.eval_samples
    kw = dict(n_steps=n_student, n=n, shape=shape, schedule=ctx.schedule, seed=cfg.seed, device=ctx.device,
              clip=ctx.clip, rng=cfg.noise)
    student_model, teacher_model, guidance = student, teacher, None
    if cfg.guided:
        student_model, teacher_model, guidance = guided_pair(ctx, student, n)
    x_student = sample_model(student_model, param=cfg.param, **kw)
    x_teacher = sample_model(teacher_model, param=teacher.param, guidance=guidance, **kw)
    x_student, x_teacher = ctx.decode(x_student), ctx.decode(x_teacher)
    name, score = ctx.scorer
    return {"metric": name, "student_value": f"{score(x_student):.6g}", "teacher_ddim_value": f"{score(x_teacher):.6g}",
            **(accuracy_columns(ctx, x_student, x_teacher) if cfg.guided else {})}


def guided_pair(ctx: DistillRun, student, n: int):
    """-> (student model, teacher model, teacher's CFG weight) of a guided evaluation of samples 0..n-1: the
    w-conditioned student at w = eval_guidance, the teacher guided through the sampler at that w."""
    from fastdiff.conditioning import eval_condition
    from fastdiff.guidance import conditional, guided

    y = eval_condition(ctx.tcfg.cond, ctx.teacher0.net, range(n), ctx.num_classes, ctx.device)
    w = torch.full((n,), ctx.cfg.eval_guidance, device=ctx.device)
    return conditional(student, y, w), guided(ctx.teacher0.net, y, ctx.num_classes), ctx.cfg.eval_guidance
