"""`python -m fastdiff.margin --teacher-seed S [distill options]`: the margin δ that "as good as the teacher" is
measured with — the KID between the best samplers of two teachers trained with different seeds on the same data.

Why this δ: a distilled student (or a fast sampler) that is closer to its teacher than two independently trained
teachers are to each other is as good as the teacher: the difference left is below what retraining moves. Both
teachers are sampled by the sweep's anchor sampler (DDIM at its most steps) on the teacher reference's own noise
(`teacher_samples` of them: fastdiff.bench.teacher_reference, cached per teacher; the second teacher on the next
seed's noise, so that the two sets are independent), and δ is the unbiased KID between the two sets, with its
two-sample jackknife interval. The preset's teacher is the one its default run trains (reused
when there); the other is trained here with seed S on the same data split (`<teacher run dir>-seed<S>`). Writes
`<results-dir>/<name>/margin.json`, which the report's answer reads (fastdiff.report.answer). Costly (a second
teacher): run once for committed results, not in the default.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import sys
from pathlib import Path
from typing import Sequence

from fastdiff import distributed as dist
from fastdiff import runs
from fastdiff.errors import FastdiffError, run_cli
from fastdiff.io import write_text
from fastdiff.results import MARGIN_NAME


def teacher_samples_features(path: Path, bcfg, device):
    """(the teacher's hash, (n, d) features of its teacher reference's samples, (m, d) features of the held-out
    reference, the teacher reference's name, the extractor id) for the teacher checkpoint at `path`."""
    from fastdiff.bench import anchor_spec, family_specs, teacher_features, teacher_reference
    from fastdiff.features import extract_features, resolve_extractor
    from fastdiff.sweep import load_family

    bcfg = dataclasses.replace(bcfg, model=str(path), distill_dir="")
    family = load_family(bcfg, device)
    ref = teacher_reference(bcfg, family, anchor_spec(bcfg, family_specs(bcfg, family)))
    if ref is None:
        raise FastdiffError("the margin needs the sweep's KID and a teacher reference (bench preset with metrics kid "
                            "and teacher_samples > 0, an unguided family)")
    extractor = resolve_extractor(bcfg.extractor, family.dataset, family.scored_shape,
                                  inception_weights=bcfg.inception_weights, data_root=bcfg.data_root)
    held_out = extract_features(family.reference.x, extractor, device).numpy()
    return (family.teacher.hash, teacher_features(bcfg, family, ref, extractor, device), held_out, ref.name,
            extractor.id, family.reference.name)


def measure(cfg, progress: bool = True) -> Path:
    """Train (or reuse) both teachers, sample them, write margin.json; -> its path."""
    import torch

    from fastdiff import __version__
    from fastdiff.distances import KIDReference
    from fastdiff.distill.cli import resolve_teacher, sweep_config
    from fastdiff.distill.config import sweep_name
    from fastdiff.results import git_commit

    base = dataclasses.replace(cfg, teacher_seed=-1)
    device = runs.resolve_device(cfg.device)
    bcfg = sweep_config(base, base.out_dir)
    # the second teacher on other noise (seed + 1): samples of both teachers from the same x_T would be paired, and
    # the two-sample KID assumes independent sets (paired ones read as closer than they are)
    got = [teacher_samples_features(resolve_teacher(c, progress), dataclasses.replace(bcfg, seed=bcfg.seed + k),
                                    device) for k, c in enumerate((base, cfg))]
    (hash_a, a, held_out, ref_name, extractor, reference), (hash_b, b, _, ref_name_b, *_) = got
    delta = KIDReference(a).kid(b)
    lo, hi = delta.interval()
    held = KIDReference(held_out)  # its kernel matrix once, for both teachers
    levels = {h: held.kid(f).est for h, f in ((hash_a, a), (hash_b, b))}
    from fastdiff.train import PRESETS as TRAIN_PRESETS

    seeds = [TRAIN_PRESETS[cfg.teacher_preset].seed, cfg.teacher_seed]
    record = {"delta": delta.est, "delta_interval_95": [lo, hi], "metric": "kid",
              "what": f"the KID between teachers of seeds {seeds[0]} and {seeds[1]} (same data), sampled by "
                      f"`{ref_name}` and `{ref_name_b}`",
              "teachers": dict(zip(map(str, seeds), (hash_a, hash_b))), "samples_per_teacher": len(a),
              "teacher_references": [ref_name, ref_name_b], "extractor": extractor,
              "held_out_kid": {"reference": reference, **levels},
              "fastdiff_commit": git_commit(), "fastdiff_version": __version__, "torch_version": torch.__version__,
              "device": str(device), "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds")}
    out = Path(cfg.results_dir) / sweep_name(base) / MARGIN_NAME
    write_text(out, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from fastdiff.distill.config import PRESETS, DistillConfig, sweep_name, validate
    from fastdiff.train import PRESETS as TRAIN_PRESETS

    dist.configure_cpu_threads()
    cfg, args = runs.config_from_argv(argv, DistillConfig, PRESETS, "python -m fastdiff.margin",
                                      "The margin delta: KID between the best samplers of two teachers of different "
                                      "seeds (run once; the report's answer reads it).")
    preset_seed = TRAIN_PRESETS[cfg.teacher_preset].seed
    if cfg.teacher:
        raise FastdiffError("--teacher names one trained teacher; the margin trains the preset's teacher and one of "
                            "--teacher-seed")
    if cfg.teacher_seed < 0 or cfg.teacher_seed == preset_seed:
        raise FastdiffError(f"pass --teacher-seed S, a seed other than the preset teacher's ({preset_seed})")
    validate(cfg)
    out = Path(cfg.results_dir) / sweep_name(dataclasses.replace(cfg, teacher_seed=-1)) / MARGIN_NAME
    if args.dry_run:
        print(f"teachers: seeds {preset_seed} and {cfg.teacher_seed} of preset {cfg.teacher_preset!r} (trained if "
              f"missing); margin -> {out}")
        return 0
    if dist.world_size() > 1:
        raise FastdiffError("python -m fastdiff.margin runs in one process (no torchrun)")
    with runs.graceful_stop():
        path = measure(cfg)
    record = json.loads(path.read_text())
    lo, hi = record["delta_interval_95"]
    print(f"margin delta = {record['delta']:.4g} KID [{lo:.4g}, {hi:.4g}] ({record['what']}) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
