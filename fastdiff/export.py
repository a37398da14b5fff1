"""`python -m fastdiff.export RUN_OR_CKPT --out DIR`: a fastdiff model as a diffusers pipeline folder.

RUN_OR_CKPT is a student checkpoint (`students/student_N4.pt`), a distillation run dir (its fewest-step student,
or `--steps N`), or a teacher run dir / checkpoint. Only the diffusers architectures export (the mapping is the
identity: the network *is* a UNet2DModel, or a UNet2DConditionModel with its CLIP text encoder): the
`diffusers-unet2d` ones as a DDIMPipeline folder (model_index.json, unet/, scheduler/), the students of a latent
text-to-image pipeline teacher (`diffusers-cond`) in the StableDiffusionPipeline layout they came from (unet/ with
the w input as time_cond_proj_dim, vae/, text_encoder/, tokenizer/, scheduler/). A student exports when its N divides
T, so that a stock DDIMScheduler with trailing spacing reproduces its grid t_i = i/N. scheduler_config.json carries
the `_fastdiff` block (exact schedule, param, N) and README.md is a model card. See fastdiff.interop for the
conventions.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Sequence

from fastdiff.errors import FastdiffError, run_cli


def pick(source: str, steps: int) -> Path:
    """The checkpoint RUN_OR_CKPT names: a file as is; a distillation run dir's student (N = steps, else the fewest
    steps) among its swept students whose sampler a stock diffusers scheduler reproduces (fastdiff.registry); a
    teacher run dir's checkpoint.pt."""
    from fastdiff import registry
    from fastdiff.checkpoint import load_checkpoint, role_of
    from fastdiff.interop import is_diffusers_source

    p = Path(source)
    if is_diffusers_source(p) and p.exists():
        raise FastdiffError(f"{source} is a diffusers folder already; export takes a fastdiff checkpoint or run dir")
    students = p / "students"
    if p.is_dir() and students.is_dir():
        found, refused = {}, set()
        for f in sorted(students.glob("*.pt")):
            role = role_of(load_checkpoint(f), f)
            if not role or not role["swept"] or not role["sampler"]:
                continue
            if not registry.sampler(role["sampler"]).exports(int(role["steps"])):
                refused.add(role["sampler"])
                continue
            found.setdefault(int(role["steps"]), f)
        if not found:
            why = f" ({', '.join(sorted(refused))} students do not export)" if refused else ""
            raise FastdiffError(f"{students} holds no exportable student yet{why}; finish a round first")
        n = steps or min(found)
        if n not in found:
            raise FastdiffError(f"{source} has no {n}-step student; it has N = {', '.join(map(str, sorted(found)))}")
        return found[n]
    if steps:
        raise FastdiffError("--steps picks a student of a distillation run dir; pass the run dir, or a checkpoint "
                            "without --steps")
    return p / "checkpoint.pt" if p.is_dir() else p


def own_evaluation(ckpt_path: Path, ckpt: dict, steps: int | None) -> str:
    """The student's own evaluation from its checkpoint (its `role`'s evaluation: metric, value, the teacher's DDIM
    at the same N), or, for a progressive student of fastdiff before 0.7, from its run's rounds.csv; else '-'."""
    row = (ckpt.get("role") or {}).get("evaluation")
    if isinstance(row, list):  # one per NFE (a multistep student's): the one at its own N
        row = next((r for r in row if int(r["nfe"]) == steps), row[-1] if row else None)
    rounds = ckpt_path.parent.parent / "rounds.csv"
    if row is None and steps and rounds.is_file() and not ckpt.get("role"):
        with open(rounds, newline="") as f:
            row = next((r for r in csv.DictReader(f) if r.get("student_steps") == str(steps)), None)
    if not row:
        return "-"
    return (f"{row['metric']} {row['student_value']} (teacher DDIM at {steps} steps: {row['teacher_ddim_value']}; "
            f"{row.get('samples', 'its run')} samples; one estimate, no interval)")


def method_of(model, ckpt: dict) -> str:
    """How the model card names the method that made `model` (a student: its sampler's method, guided or not)."""
    from fastdiff import registry

    if model.kind != "student":
        return "-"
    entry = registry.find(model.sampler)
    title = (entry.method_title if entry and entry.method_title else model.method or "distillation")
    return f"guided {title} after a w-conditioned first stage (Meng et al. 2023)" if ckpt.get("guided") else title


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", metavar="RUN_OR_CKPT", help="a student/teacher checkpoint or a run dir")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist)")
    parser.add_argument("--check", type=int, default=16, help="images to sample from the written folder with "
                        "fastdiff and diffusers before it is kept (default 16; 0: no check)")
    parser.add_argument("--steps", type=int, default=0, help="the student N of a distillation run dir (default: "
                        "the fewest)")
    args = parser.parse_args(argv)
    from fastdiff import registry
    from fastdiff.checkpoint import load_checkpoint, load_model
    from fastdiff.interop import export

    path = pick(args.source, args.steps)
    model = load_model(path)
    ckpt = load_checkpoint(path)
    if model.kind == "student":
        entry = registry.find(model.sampler)
        if entry is None or not entry.exports(int(model.role["steps"] or model.steps or 0)):
            why = entry.refusal if entry is not None else f"it has no sampler fastdiff knows ({model.sampler!r})"
            raise FastdiffError(f"{path}: a {entry.student_label if entry else 'student'} does not export to a stock "
                                f"diffusers pipeline: {why}; sample it with python -m fastdiff.sample")
    extra = {"method": method_of(model, ckpt), "quality": own_evaluation(path, ckpt, model.steps)}
    if ckpt.get("teacher"):
        try:
            extra["teacher"] = f"{load_model(ckpt['teacher'], dataset=model.dataset).hash} ({ckpt['teacher']})"
        except FastdiffError:
            extra["teacher"] = f"{ckpt['teacher']} (not readable here)"
    if args.check < 0:
        raise FastdiffError("--check must be >= 0 (0: no check)")
    out, checked = export(model, args.out, extra, check=args.check)
    layout = "StableDiffusionPipeline" if model.codec is not None else "DDIMPipeline"
    print(f"exported {model.kind} {path} -> {out} (diffusers {layout}"
          + (f", {model.steps} step{'s' if model.steps != 1 else ''}" if model.steps else "") + ")")
    if checked:
        print(f"checked: {json.dumps(checked)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
