"""Distillation of a teacher into few-step students: `python -m fastdiff.distill`.

- `config.py`: `DistillConfig`, its presets and checks.
- `progressive.py`: progressive distillation's target and loss (Salimans & Ho 2022, Algorithm 2).
- `guided.py`: guided distillation's w-conditioned first stage (Meng et al. 2023).
- `consistency.py`: consistency distillation (Song et al. 2023, Algorithm 2), its loop, snapshots and evaluation.
- `stages.py`: what the progressive stages share: the run context, the resumable loop of one stage, student files,
  the per-round evaluation.
- `cli.py`: the run (teacher, methods, sweep and report) and the command line.
"""
from fastdiff.checkpoint import load_student
from fastdiff.distill.cli import distill, main, sweep_and_report
from fastdiff.distill.config import PRESETS, DistillConfig, num_rounds, round_updates
from fastdiff.distill.progressive import distill_target, student_loss, teacher_fn

__all__ = ["DistillConfig", "PRESETS", "distill", "distill_target", "load_student", "main", "num_rounds",
           "round_updates", "student_loss", "sweep_and_report", "teacher_fn"]
