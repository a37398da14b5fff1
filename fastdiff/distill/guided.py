"""Guided distillation's first stage (Meng et al. 2023): one network s(z, t, y, w) that matches the conditional (class
or text) teacher under classifier-free guidance at every weight w ~ U[w_min, w_max]; the progressive rounds then
start from it, the students taking w as an input. `w_student` is also the start of guided consistency distillation."""
from __future__ import annotations

import torch

from fastdiff import distributed as dist
from fastdiff.distill.stages import (DistillRun, evaluate_round, finished_student, save_student, train_stage,
                                    training_cost)
from fastdiff.errors import FastdiffError
from fastdiff.runs import RoundLog
from fastdiff.models import build_model, network_from_dict


def w_student(ctx: DistillRun) -> torch.nn.Module:
    """The teacher's network with a guidance-weight input w (fastdiff's U-Net: the w embedding; a diffusers
    UNet2DConditionModel: time_cond_proj_dim, as LCM), initialised from the teacher's weights with the w input's
    output layer zeroed (`zero_w_input`): it starts as the conditional teacher (w = 1 behaviour) at every w."""
    student = build_model(network_from_dict(ctx.student_network)).to(ctx.device)
    missing, unexpected = student.load_state_dict(ctx.teacher0.net.state_dict(), strict=False)
    if unexpected or not all(k.startswith(student.W_INPUT) for k in missing):
        raise FastdiffError(f"teacher {ctx.teacher0.path} does not fit a w-conditioned student (missing {missing}, "
                            f"unexpected {unexpected}); pass a teacher trained by python -m fastdiff.train")
    student.zero_w_input()
    return student


def guided_base(ctx: DistillRun, rounds: RoundLog) -> torch.nn.Module:
    """Stage one of guided distillation: one network s(z, t, y, w) matching the CFG teacher at every w."""
    path = ctx.run / "students" / "guided_base.pt"
    done = finished_student(ctx, rounds, -1, path)
    if done is not None:
        return done
    student = w_student(ctx)
    loss, wall = train_stage(ctx, -1, student, ctx.teacher0.net, ctx.teacher0.param, None,
                              ctx.cfg.pd.guided_base_updates, "guided stage 1: w-conditioned student")
    save_student(ctx, path, student, None, -1, ctx.cfg.pd.guided_base_updates,
                 training_cost(ctx, rounds, -1, ctx.cfg.pd.guided_base_updates, wall))
    if dist.is_main() and not rounds.done(-1):
        rounds.add({"round": -1, "teacher_steps": "", "student_steps": "", "updates": ctx.cfg.pd.guided_base_updates,
                    "loss": f"{loss:.6f}", "wall_clock_s": f"{wall:.1f}",
                    **evaluate_round(student, ctx, ctx.cfg.pd.start_steps)})
    dist.barrier()
    return student
