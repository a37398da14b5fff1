"""Progressive distillation as a method (Salimans & Ho 2022, Alg. 2; guided: Meng et al. 2023): rounds from
`start_steps` down to 1 step, each halving the student's grid; a guided run first distils the CFG teacher into a
w-conditioned network (fastdiff.distill.guided). Its maths: fastdiff.distill.progressive; the loop of one stage:
fastdiff.distill.stages. Students: students/student_N{N}.pt, sampler `distilled` (DDIM eta = 0 on i/N); rounds.csv
holds each round's evaluation."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from fastdiff import config as cfgs
from fastdiff import distributed as dist
from fastdiff.distill.guided import guided_base
from fastdiff.distill.protocol import FORWARD, TRAINED, Method, register_method
from fastdiff.distill.stages import (DistillRun, evaluate_round, finished_student, save_student, train_stage,
                                    training_cost)
from fastdiff.models import build_model, network_from_dict
from fastdiff.errors import FastdiffError
from fastdiff.runs import RoundLog

if TYPE_CHECKING:
    from fastdiff.distill.config import DistillConfig

log = logging.getLogger(__name__)

ROUND_FIELDS = ["round", "teacher_steps", "student_steps", "updates", "loss", "metric", "student_value",
                "teacher_ddim_value", "student_accuracy", "teacher_accuracy", "wall_clock_s"]


@dataclass(frozen=True)
class PDOptions:
    """Progressive distillation's options: `DistillConfig.pd`, `--pd.<field>` (or the flat name of before)."""

    start_steps: int = 64  # sampling steps of the first teacher grid N0 (a power of two); rounds halve it
    rounds: int = 0  # rounds to run (0: down to 1 step)
    updates_per_round: int = 500  # optimiser updates per round
    last_rounds_factor: int = 2  # the last two rounds get this many times the updates (the paper's 100k vs 50k)
    weighting: Literal["snr-trunc", "snr+1"] = "snr-trunc"  # x-space loss weight max(SNR, 1) or SNR + 1
    guided_base_updates: int = 1000  # updates of a guided run's w-conditioned first stage (Meng et al. 2023)


# their names when DistillConfig was flat (still accepted: --start-steps, config.json files of before)
PDOptions.FLAT = {name: name for name in ("start_steps", "rounds", "updates_per_round", "last_rounds_factor",
                                          "weighting", "guided_base_updates")}


def num_rounds(cfg: DistillConfig) -> int:
    full = int(math.log2(cfg.pd.start_steps))
    return min(cfg.pd.rounds, full) if cfg.pd.rounds > 0 else full


def round_updates(cfg: DistillConfig, r: int) -> int:
    """Updates in round r (0-based); the paper doubles the last two rounds (to 1 and 2 steps)."""
    return cfg.pd.updates_per_round * (cfg.pd.last_rounds_factor if r >= num_rounds(cfg) - 2 else 1)


def pd_costs(cfg: DistillConfig) -> list[int]:
    """Optimiser updates, cumulative from the teacher, at which each progressive student is done (round order); a
    guided run's w-conditioned first stage counts too. (Progressive.budgets: other methods snapshot there.)"""
    base = cfg.pd.guided_base_updates if cfg.guided else 0
    return [base + sum(round_updates(cfg, i) for i in range(r + 1)) for r in range(num_rounds(cfg))]


def run_rounds(ctx: DistillRun) -> None:
    """The guided first stage (if any), then every progressive round N -> N/2, each skipped once finished."""
    cfg, run, device = ctx.cfg, ctx.run, ctx.device
    rounds = RoundLog(run / "rounds.csv", ROUND_FIELDS)
    (run / "students").mkdir(exist_ok=True)
    t_run = time.perf_counter()
    if all(rounds.done(r) for r in range(num_rounds(cfg))):
        log.info("%s already finished all %d rounds; nothing to distill", run, num_rounds(cfg))
    teacher_net, teacher_param = ctx.teacher0.net, ctx.teacher0.param
    if cfg.guided:
        teacher_net, teacher_param = guided_base(ctx, rounds), cfg.param
    for r in range(num_rounds(cfg)):
        n_student = cfg.pd.start_steps // 2 ** (r + 1)
        student_path = run / "students" / f"student_N{n_student}.pt"
        done = finished_student(ctx, rounds, r, student_path)
        if done is not None:
            teacher_net, teacher_param = done, cfg.param
            continue
        student = build_model(network_from_dict(ctx.student_network)).to(device)
        student.load_state_dict(teacher_net.state_dict())
        total = round_updates(cfg, r)
        loss, wall = train_stage(ctx, r, student, teacher_net, teacher_param, n_student, total,
                                 f"round {r + 1}/{num_rounds(cfg)}: {2 * n_student}->{n_student} steps")
        cost = training_cost(ctx, rounds, r, total, wall)
        row = evaluate_round(student, ctx, n_student) if dist.is_main() and not rounds.done(r) else None
        done_row = row or next((x for x in rounds.rows if int(x["round"]) == r), None)
        save_student(ctx, student_path, student, n_student, r, total, cost,
                     None if done_row is None else {**{k: done_row[k] for k in ("metric", "student_value",
                                                                                "teacher_ddim_value")},
                                                    "samples": cfg.eval_samples, "nfe": n_student})
        if row is not None:
            rounds.add({"round": r, "teacher_steps": 2 * n_student, "student_steps": n_student, "updates": total,
                        "loss": f"{loss:.6f}", "wall_clock_s": f"{wall:.1f}", **row})
            log.info("round %d/%d: %d-step student %s=%s (teacher DDIM %d steps: %s)", r + 1, num_rounds(cfg),
                     n_student, row["metric"], row["student_value"], n_student, row["teacher_ddim_value"])
        dist.barrier()
        teacher_net, teacher_param = student, cfg.param
    log.info("distillation finished in %.1f s", time.perf_counter() - t_run)


class Progressive(Method):
    name = "pd"
    title = "progressive distillation (Salimans & Ho 2022)"
    samplers = ("distilled",)
    options = PDOptions
    label, short = "progressive", "PD"
    training_log = "rounds.csv"

    def validate(self, cfg: DistillConfig) -> None:
        n0 = cfg.pd.start_steps
        if n0 < 2 or n0 & (n0 - 1):
            raise FastdiffError(f"--pd.start-steps must be a power of two >= 2, got {n0}")
        for name in ("updates_per_round", "last_rounds_factor"):
            cfgs.check_range(cfg, f"pd.{name}", cfgs.get(cfg, f"pd.{name}") >= 1, ">= 1")
        cfgs.check_range(cfg, "pd.guided_base_updates", cfg.pd.guided_base_updates >= 1, ">= 1")
        most = int(math.log2(n0))
        cfgs.check_range(cfg, "pd.rounds", 0 <= cfg.pd.rounds <= most,
                         f"in [0, {most}] for --pd.start-steps {n0} (0: down to 1 step)")

    def check_teacher(self, teacher, cfg: DistillConfig) -> None:
        """A discrete teacher (timesteps 0..T-1) is called at t - 0.5/N0 >= 1/T in round 1: N0 <= T/2."""
        T = teacher.schedule.T if teacher.network and teacher.network.get("discrete") else 0
        if T and 2 * cfg.pd.start_steps > T:
            raise FastdiffError(f"--pd.start-steps {cfg.pd.start_steps} is too fine for {teacher.path}, a discrete "
                                f"teacher with T = {T}: its half-step 0.5/N0 must be >= 1/T, so N0 <= {T // 2} (the "
                                f"largest power of two: {2 ** (T // 2).bit_length() // 2})")

    def plan(self, cfg: DistillConfig) -> list[str]:
        first = [f"guided first stage: {cfg.pd.guided_base_updates} updates"] if cfg.guided else []
        n0 = cfg.pd.start_steps
        return first + [f"{n0 // 2 ** r}->{n0 // 2 ** (r + 1)} steps: "
                        f"{round_updates(cfg, r)} updates" for r in range(num_rounds(cfg))]

    def run(self, ctx: DistillRun) -> None:
        run_rounds(ctx)

    def budgets(self, cfg: DistillConfig) -> list[int]:
        return pd_costs(cfg)

    def update_cost(self, cfg: DistillConfig) -> dict[str, float]:
        """Per update and example: 2 teacher evaluations (two DDIM steps; the guided stage's conditional and
        unconditional halves), 1 student forward + backward."""
        return {"teacher": 2 * FORWARD * cfg.batch_size, "student": TRAINED * cfg.batch_size}


register_method(Progressive())
