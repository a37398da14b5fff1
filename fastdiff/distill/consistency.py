"""Consistency distillation's maths (Song et al. 2023, "Consistency Models", Alg. 2), adapted to fastdiff's VP time.

The consistency function f_theta(x_t, t) is the student's x0 prediction, with the boundary condition f(x, 0) = x:
- v-prediction: f = alpha x - sigma v, exact at t = 0 (alpha = 1, sigma = 0);
- x0-prediction: f = c_skip(t) x + (1 - c_skip(t)) F with c_skip = sigma_d^2 / (sigma~^2 + sigma_d^2),
  sigma~ = sigma_t/alpha_t (EDM's sigma; Song et al. 2023 sec. 3 with c_out = 1 - c_skip, so that a student
  initialised from an x0 teacher keeps its output where sigma~ >> sigma_d), sigma_d = 0.5;
- eps-prediction is refused: x0 = (x - sigma eps)/alpha divides by alpha ~ 0 at t = 1.

One update (Alg. 2): n ~ U{0..N-1} on the N+1 boundaries t_0 < ... < t_N (the karras grid, rho = 7, whose lowest
point is t = 1/T), x_{t_{n+1}} = alpha x0 + sigma z, ONE teacher ODE step to t_n (DDIM eta = 0, or Heun), and the
distance d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta-(x^_{t_n}, t_n)) with theta- the target network (an EMA of theta,
decay mu). d = pseudo-Huber sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(d_data) (Song & Dhariwal 2023,
"Improved Techniques for Training Consistency Models", sec. 3.3), or the squared L2 (mean over elements).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from fastdiff.distill.protocol import FORWARD, TRAINED, Method, get_method, register_method
from fastdiff.errors import FastdiffError
from fastdiff.grids import consistency_boundaries as boundaries  # noqa: F401  (the CD discretization)
from fastdiff.grids import consistency_grid
from fastdiff.losses import noised
from fastdiff.param import append_dims, c_skip, consistency_fn  # noqa: F401  (re-exported: the CD student)
from fastdiff.schedules import Schedule

HUBER_C = 0.00054  # times sqrt(d_data)


def ddim_step(x0_eps_fn: Callable, schedule: Schedule) -> Callable:
    """The teacher's one ODE step x_t -> x_s by DDIM eta = 0 (x_s = alpha_s x0^ + sigma_s eps^), unclipped;
    `x0_eps_fn(x, t)` is the teacher as fastdiff.param.denoiser gives it. t, s: (B,) float64."""
    def step(x, t, s):
        x0, eps = x0_eps_fn(x, t)
        a, sg = (append_dims(v.to(x), x.ndim) for v in schedule.alpha_sigma(s))
        return a * x0 + sg * eps

    return step


def heun_step(x0_eps_fn: Callable, schedule: Schedule) -> Callable:
    """The teacher's one ODE step by Heun (Karras et al. 2022 Alg. 1) in x~ = x/alpha, sigma~ = sigma/alpha: two
    teacher evaluations; the EDM variant Song et al. 2023 use for CD."""
    def step(x, t, s):
        a_t, s_t = (append_dims(v.to(x), x.ndim) for v in schedule.alpha_sigma(t))
        a_s, s_s = (append_dims(v.to(x), x.ndim) for v in schedule.alpha_sigma(s))
        x0, eps = x0_eps_fn(x, t)
        euler = a_s * x0 + s_s * eps  # DDIM eta=0 is the Euler step in (x~, sigma~)
        _, eps2 = x0_eps_fn(euler, s)
        # trapezoid in x~: x~_s = x~_t + (sigma~_s - sigma~_t) (eps + eps2)/2
        return a_s * (x / a_t + (s_s / a_s - s_t / a_t) * (eps + eps2) / 2)

    return step


def clipped(x0_eps_fn: Callable, schedule: Schedule) -> Callable:
    """The teacher with x0^ clamped to [-1, 1] and eps^ re-derived from it, as its clipped sampler steps; used for
    eps teachers on pixel data, whose x0^ = (x - sigma eps^)/alpha divides by alpha ~ 0.0125 at the top of the
    karras discretization (see fastdiff.distill.progressive.distill_target)."""
    def fn(x, t):
        x0, _ = x0_eps_fn(x, t)
        a, s = (append_dims(v.to(x), x.ndim) for v in schedule.alpha_sigma(t))
        x0 = x0.clamp(-1.0, 1.0)
        return x0, (x - a * x0) / s

    return fn


def distance(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """(B,) pseudo-Huber sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(d) (d elements per example), or the squared
    L2 distance as a mean over elements ("l2")."""
    diff = (a - b).flatten(1)
    if metric == "l2":
        return diff.pow(2).mean(1)
    if metric == "pseudo-huber":
        c = HUBER_C * diff.shape[1] ** 0.5
        return (diff.pow(2).sum(1) + c**2).sqrt() - c
    raise FastdiffError(f"unknown consistency distance {metric!r}; choose pseudo-huber or l2")


def cd_loss(student_f: Callable, target_f: Callable, teacher_step: Callable, x0: torch.Tensor, schedule: Schedule,
            ts: torch.Tensor, gen: torch.Generator, metric: str = "pseudo-huber") -> torch.Tensor:
    """(B,) d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta-(x^_{t_n}, t_n)) with n ~ U{0..N-1} per example (Alg. 2).

    ts: (N+1,) increasing boundaries (`boundaries`); x_{t_{n+1}} = alpha x0 + sigma z from `gen`; x^_{t_n} is one
    `teacher_step(x, t_{n+1}, t_n)`; the target side runs without gradients."""
    n = torch.randint(0, len(ts) - 1, (x0.shape[0],), generator=gen)
    t_hi, t_lo = ts[n + 1], ts[n]
    x_hi, *_ = noised(x0, t_hi, schedule, gen)
    with torch.no_grad():
        x_lo = teacher_step(x_hi, t_hi, t_lo)
        target = target_f(x_lo, t_lo)
    return distance(student_f(x_hi, t_hi), target, metric)


def sample_student(net, x, ts, **kw):
    """A consistency student's sampler: multistep consistency sampling (Song et al. 2023, Alg. 1) on its grid cd{N}."""
    from fastdiff.samplers import consistency

    return consistency(net, x, ts, **kw)


@dataclass(frozen=True)
class CDOptions:
    """Consistency distillation's options: `DistillConfig.cd`, `--cd.<field>` (or the flat name of before)."""

    updates: int = 0  # optimiser updates of consistency distillation (0: the PD rounds' total, equal cost)
    steps: int = 18  # N: the karras discretization (rho = 7) has N + 1 boundaries
    target_ema: float = 0.95  # mu of the target network theta- (0: theta- = theta, as in iCT)
    ema_decay: float = 0.99  # EMA of the weights that is saved and evaluated (apart from theta-; 0: the raw weights)
    eval_every: int = 0  # updates between extra student snapshots with cd.csv rows (besides the PD students' costs)
    metric: Literal["pseudo-huber", "l2"] = "pseudo-huber"  # the distance d (LPIPS needs weights not here)
    solver: Literal["ddim", "heun"] = "ddim"  # the teacher's one ODE step per update


# their names when DistillConfig was flat (still accepted: --cd-updates, config.json files of before)
CDOptions.FLAT = {"updates": "cd_updates", "steps": "cd_steps", "target_ema": "target_ema",
                  "ema_decay": "cd_ema_decay", "eval_every": "cd_eval_every", "metric": "cd_metric",
                  "solver": "cd_solver"}


def cd_total(cfg) -> int:
    """Updates of consistency distillation: --cd.updates, or (0) the PD rounds' total, so that the two methods
    get the same number of optimiser updates of the same batch."""
    return cfg.cd.updates or _pd_budgets(cfg)[-1]


def _pd_budgets(cfg) -> list[int]:
    """The cumulative updates of the progressive students of this config (the equal-cost points CD snapshots at,
    whether or not PD runs here)."""
    return get_method("pd").budgets(cfg)


def cd_snapshots(cfg) -> list[int]:
    """The updates at which CD saves a student and writes its cd.csv rows: every PD student's cumulative cost (the
    equal-cost comparison), every --cd.eval-every updates, and the last one."""
    total = cd_total(cfg)
    every = list(range(cfg.cd.eval_every, total, cfg.cd.eval_every)) if cfg.cd.eval_every else []
    return sorted({u for u in _pd_budgets(cfg) + every if u < total} | {total})


# --- the training stage -------------------------------------------------------------------------------------------

EVAL_NFE = (1, 2, 4)
CD_FIELDS = ["updates", "nfe", "times", "metric", "student_value", "teacher_ddim_value", "loss", "teacher_evals",
             "student_passes", "wall_clock_s", "student_accuracy", "teacher_accuracy"]


def cd_cost(ctx, updates: int, wall: float) -> dict:
    """What a consistency student cost after `updates` updates (`wall` s of training), per example: 1 teacher ODE
    step (2 evaluations for Heun, twice that for a guided teacher's conditional and unconditional halves), 1
    target-network forward, 1 student forward + backward (`Consistency.update_cost`, counted by
    protocol.student_cost); the teacher's own training is not included."""
    from fastdiff.distill.protocol import student_cost

    method = get_method("cd")
    return {**student_cost(ctx, method, updates, wall),
            "target_evals": int(method.update_cost(ctx.cfg)["target"] * updates / FORWARD)}


def snapshot_path(run, updates: int):
    return run / "students" / f"cd_u{updates:06d}.pt"


def run_consistency(ctx) -> None:
    """Consistency distillation of ctx's teacher (Song et al. 2023, Alg. 2) through runs.fit, resumable from
    state.pt (with the target network theta- and the weights EMA). The saved and evaluated student is the EMA of
    the weights (decay cd_ema_decay), separate from theta- (decay target_ema). At every update of
    `cd_snapshots` (each PD student's cumulative updates, every cd_eval_every, the last):
    students/cd_u{updates}.pt and cd.csv rows (FID of 1/2/4-step consistency sampling beside the teacher's
    DDIM at the same NFE, with the cost so far); the last one is also students/cd.pt.

    Guided (LCM-style, Luo et al. 2023): the student takes w as an input (`w_student`), and each update draws a
    condition and a w ~ U[w_min, w_max] per example; the teacher's ODE step is the classifier-free-guided teacher's
    at that w, and the student and target networks are evaluated at the same condition and w."""
    import copy
    import time

    from fastdiff import distributed as dist
    from fastdiff import runs
    from fastdiff.checkpoint import load_resumable
    from fastdiff.distill.protocol import save_student
    from fastdiff.distill.guided import w_student
    from fastdiff.distill.stages import batch_cond
    from fastdiff.guidance import conditional, guided_x0_eps
    from fastdiff.models import build_model, network_from_dict
    from fastdiff.param import denoiser
    from fastdiff.runs import RoundLog

    cfg, device, schedule = ctx.cfg, ctx.device, ctx.schedule
    total, snapshots = cd_total(cfg), set(cd_snapshots(cfg))
    final = ctx.run / "students" / "cd.pt"
    log = RoundLog(ctx.run / "cd.csv", CD_FIELDS, key=("updates", "nfe"))
    if final.exists() and all(log.done((total, nfe)) for nfe in EVAL_NFE):
        return
    if cfg.guided:
        student = w_student(ctx)
    else:
        student = build_model(network_from_dict(ctx.student_network)).to(device)
        student.load_state_dict(ctx.teacher0.net.state_dict())  # the teacher's EMA weights
    target = copy.deepcopy(student).eval().requires_grad_(False)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    teacher = ctx.teacher0.net.eval().requires_grad_(False)

    def teacher_step(cond: dict) -> Callable:
        """The teacher's ODE step, guided at the batch's condition and w when `cond` has them."""
        fn = (guided_x0_eps(teacher, ctx.teacher0.param, schedule, cond["y"], cond["w"], ctx.num_classes) if cond
              else denoiser(teacher, schedule, ctx.teacher0.param))
        if ctx.teacher0.param == "eps" and ctx.clip:
            fn = clipped(fn, schedule)
        return (heun_step if cfg.cd.solver == "heun" else ddim_step)(fn, schedule)

    plain_step = teacher_step({})
    ts = boundaries(schedule, cfg.cd.steps).to(device)
    salt = cfg.seed * 7919 + 31337
    gen = torch.Generator().manual_seed(salt + dist.rank())
    torch.manual_seed(salt + 1 + dist.rank())
    state = load_resumable(ctx.state_path, map_location=device)
    resume = state if state is not None and state.get("stage") == "cd" else None
    timing = {"start": time.perf_counter() - (resume["wall_clock_s"] if resume else 0.0),
              "eval_s": resume.get("eval_s", 0.0) if resume else 0.0,
              "loss": list(resume.get("cd_losses", [])) if resume else []}  # the last 50, for cd.csv
    if resume is not None:
        target.load_state_dict(resume["target"])
        ema.load_state_dict(resume["ema"])
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    local_batch = dist.local_batch_size(cfg.batch_size)
    meta = {"steps": cfg.cd.steps, "target_ema": cfg.cd.target_ema, "ema_decay": cfg.cd.ema_decay,
            "metric": cfg.cd.metric, "solver": cfg.cd.solver, "t_top": float(ts[-1])}

    def loss_fn(model) -> torch.Tensor:
        idx = torch.randint(len(ctx.x_all), (local_batch,), generator=gen).to(device)
        cond = batch_cond(ctx, idx, gen)
        on = (lambda net: conditional(net, cond["y"], cond["w"])) if cond else (lambda net: net)  # noqa: E731
        f = consistency_fn(on(model), schedule, cfg.param)
        f_target = consistency_fn(on(target), schedule, cfg.param)
        step_fn = teacher_step(cond) if cond else plain_step
        return cd_loss(f, f_target, step_fn, ctx.x_all[idx], schedule, ts.cpu(), gen, cfg.cd.metric).mean()

    def snapshot(update: int) -> None:
        """students/cd_u{update}.pt and its cd.csv rows (rank 0); the evaluation's time is not training cost."""
        t_eval = time.perf_counter()
        cost = cd_cost(ctx, update, t_eval - timing["start"] - timing["eval_s"])
        recent = timing["loss"][-50:]
        rows = evaluate_cd(ctx, ema, log, update, sum(recent) / max(len(recent), 1), cost)
        evaluation = [{k: row[k] for k in ("nfe", "metric", "student_value", "teacher_ddim_value")} for row in rows]
        # (the top-level steps: 1 of fastdiff before 0.7, which its model id covers; the role's steps is its N)
        for path, swept in ((snapshot_path(ctx.run, update), False),) + (((final, True),) if update == total else ()):
            save_student(ctx, path, ema, method="cd", sampler="consistency", grid=f"cd{cfg.cd.steps}",
                         steps=cfg.cd.steps, cost=cost, evaluation=evaluation, swept=swept,
                         extra={"steps": 1, "updates": update, "cd": meta})
        timing["eval_s"] += time.perf_counter() - t_eval

    def after_update(update, loss, lr, grad_norm) -> None:
        with torch.no_grad():  # theta- <- mu theta- + (1 - mu) theta; the weights EMA likewise with its own decay
            for pt, pe, p in zip(target.parameters(), ema.parameters(), student.parameters()):
                pt.lerp_(p, 1 - cfg.cd.target_ema)
                pe.lerp_(p, 1 - cfg.cd.ema_decay)
        timing["loss"] = timing["loss"][-49:] + [loss]
        if dist.is_main() and update in snapshots:
            snapshot(update)

    student.train().requires_grad_(True)
    runs.fit(student, opt, total=total, loss_fn=loss_fn, gen=gen, salt=salt, device=device,
             lr_at=lambda update: cfg.lr, state_path=ctx.state_path, ckpt_every=cfg.ckpt_every,
             label="consistency distillation", resume=resume, after_update=after_update,
             extra_state=lambda: {"kind": "distill-state", "config": ctx.student_cfg, "stage": "cd",
                                  "network": ctx.student_network, "target": target.state_dict(),
                                  "ema": ema.state_dict(), "eval_s": timing["eval_s"],
                                  "cd_losses": timing["loss"][-50:]},
             on_step=None if ctx.on_step is None else lambda update: ctx.on_step(0, update),
             progress=ctx.progress)
    if dist.is_main() and not final.exists():  # a run stopped after its last update, before the snapshot
        snapshot(total)
    dist.barrier()


def evaluate_cd(ctx, student, log, updates: int, loss: float, cost: dict) -> list[dict]:
    """-> the cd.csv rows it adds at `updates`: the student's 1-, 2- and 4-step consistency sampling and the
    teacher's DDIM at the same NFE, on the same per-index noise, scored with the round metric, with the cost so far. Guided: both at
    w = eval_guidance on the evaluation conditions, with the accuracy on the asked-for digit."""
    from fastdiff.distill.protocol import accuracy_columns
    from fastdiff.distill.stages import guided_pair, sample_model
    from fastdiff.samplers import consistency, initial_noise

    cfg, shape, n = ctx.cfg, tuple(ctx.teacher0.data_shape), ctx.cfg.eval_samples
    name, score = ctx.scorer
    student_model, teacher_model, guidance = student, ctx.teacher0, None
    if cfg.guided:
        student_model, teacher_model, guidance = guided_pair(ctx, student, n)
    rows = []
    for nfe in EVAL_NFE:
        ts = consistency_grid(ctx.schedule, cfg.cd.steps, nfe)
        x, gens = initial_noise(range(n), shape, cfg.seed, ctx.device, rng=cfg.noise)
        with torch.no_grad():
            xs = consistency(student_model, x, ts.to(torch.float64), schedule=ctx.schedule, param=cfg.param,
                             clip=ctx.clip, generator=gens).x
        xt = sample_model(teacher_model, nfe, n, shape, ctx.schedule, ctx.teacher0.param, cfg.seed, ctx.device,
                          guidance=guidance, clip=ctx.clip, rng=cfg.noise)
        xs, xt = ctx.decode(xs), ctx.decode(xt)
        rows.append({"updates": updates, "nfe": nfe, "times": " ".join(f"{t:.6g}" for t in ts.tolist()),
                     "metric": name, "student_value": f"{score(xs):.6g}", "teacher_ddim_value": f"{score(xt):.6g}",
                     "loss": f"{loss:.6g}", "teacher_evals": cost["teacher_evals"],
                     "student_passes": cost["student_passes"], "wall_clock_s": f"{cost['wall_clock_s']:.1f}",
                     **(accuracy_columns(ctx, xs, xt) if cfg.guided else {})})
        log.add(rows[-1])
    return rows


class Consistency(Method):
    name = "cd"
    title = "consistency distillation (Song et al. 2023)"
    samplers = ("consistency",)
    options = CDOptions
    uses = ("pd",)  # equal cost: snapshots at the progressive students' budgets (and --cd.updates 0: PD's total)
    label, short = "consistency", "CD"
    training_log = "cd.csv"

    def validate(self, cfg) -> None:
        from fastdiff import config as cfgs

        if cfg.param == "eps":
            raise FastdiffError("--method cd needs --param v or x0: an eps consistency function x0 = (x - sigma "
                                "eps)/alpha divides by alpha ~ 0 at t = 1")
        cfgs.check_range(cfg, "cd.updates", cfg.cd.updates >= 0, ">= 0 (0: the PD rounds' total)")
        cfgs.check_range(cfg, "cd.steps", cfg.cd.steps >= 1, ">= 1")
        cfgs.check_range(cfg, "cd.target_ema", 0 <= cfg.cd.target_ema < 1, "in [0, 1)")
        cfgs.check_range(cfg, "cd.ema_decay", 0 <= cfg.cd.ema_decay < 1, "in [0, 1)")
        cfgs.check_range(cfg, "cd.eval_every", cfg.cd.eval_every >= 0, ">= 0 (0: only at the end)")
        get_method("pd").validate(cfg)  # its budgets are CD's snapshots

    def budgets(self, cfg) -> list[int]:
        return cd_snapshots(cfg)

    def plan(self, cfg) -> list[str]:
        return [(f"guided (LCM-style, w ~ U[{cfg.w_min:g}, {cfg.w_max:g}]) " if cfg.guided else "")
                + f"consistency distillation: {cd_total(cfg)} updates on {cfg.cd.steps} karras steps "
                f"({cfg.cd.solver} teacher step, {cfg.cd.metric}, target EMA {cfg.cd.target_ema}; students and 1/2/4-NFE "
                f"evaluation at updates {', '.join(map(str, cd_snapshots(cfg)))})"]

    def run(self, ctx) -> None:
        run_consistency(ctx)

    def update_cost(self, cfg) -> dict[str, float]:
        """Per update and example: the teacher's ODE step (1 evaluation, 2 for Heun, twice that guided), 1
        target-network evaluation, 1 student forward + backward."""
        per_step = (2 if cfg.cd.solver == "heun" else 1) * (2 if cfg.guided else 1)
        return {"teacher": per_step * FORWARD * cfg.batch_size, "target": FORWARD * cfg.batch_size,
                "student": TRAINED * cfg.batch_size}


register_method(Consistency())
