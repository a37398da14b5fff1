"""Distillation of a teacher into few-step students: `python -m fastdiff.distill`.

- `config.py`: `DistillConfig`, its presets and checks.
- `progressive.py`: progressive distillation's target and loss (Salimans & Ho 2022, Algorithm 2), and its students'
  sampler (registered in fastdiff.registry).
- `guided.py`: guided distillation's w-conditioned first stage (Meng et al. 2023).
- `consistency.py`: consistency distillation (Song et al. 2023, Algorithm 2), its loop, snapshots, evaluation and
  its students' sampler.
- `stages.py`: what the progressive stages share: the run context, the resumable loop of one stage, student files,
  the per-round evaluation.
- `cli.py`: the run (teacher, methods, sweep and report) and the command line.

The names below load on first use, so that a method module (and the sampler registry, which imports the built-in
methods' modules) can be imported without the command line and the sweep it runs.
"""
import importlib

_WHERE = {"load_student": "fastdiff.checkpoint", "distill": "fastdiff.distill.cli", "main": "fastdiff.distill.cli",
          "sweep_and_report": "fastdiff.distill.cli", "PRESETS": "fastdiff.distill.config",
          "DistillConfig": "fastdiff.distill.config", "num_rounds": "fastdiff.distill.pd",
          "round_updates": "fastdiff.distill.pd", "distill_target": "fastdiff.distill.progressive",
          "student_loss": "fastdiff.distill.progressive", "teacher_fn": "fastdiff.distill.progressive"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'fastdiff.distill' has no attribute {name!r}")
