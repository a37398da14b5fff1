"""`python -m fastdiff.seeds --teacher-seeds 0,1 [distill options]`: the whole pipeline (teacher, students, sweep)
once per teacher seed, and the spread of every FID across them.

The FID intervals of a sweep (fastdiff.uncertainty) cover the sampling variance of the generated samples only. What
a reader also wants to know is how much a number moves when the teacher is trained again: each seed here trains its
teacher with that seed (weights, batches, noise; the train/test split and so the reference set stay the preset's),
distils it with the same distillation seed and sweeps it with the same per-index noise. The seed equal to the
preset's is the default run itself (reused when finished). Writes `<results-dir>/<name>-seeds.csv` (one row per
sampler, grid, NFE: the FID of each seed, their mean and max/min) and `<name>-seeds.md`.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from fastdiff import distributed as dist
from fastdiff import runs
from fastdiff.errors import FastdiffError, run_cli
from fastdiff.io import write_text
from fastdiff.registry import student_samplers
from fastdiff.results import CSV_NAME


def seed_config(cfg, seed: int):
    """The DistillConfig of teacher seed `seed`: the preset's run dir for the preset's seed, else `<out_dir>-tseed<S>`
    (the teacher's own run dir and the results folder get the seed too: see teacher_config and sweep_name)."""
    from fastdiff.train import PRESETS as TRAIN_PRESETS

    if seed == TRAIN_PRESETS[cfg.teacher_preset].seed:
        return dataclasses.replace(cfg, teacher_seed=-1)
    return dataclasses.replace(cfg, teacher_seed=seed, out_dir=f"{cfg.out_dir}-tseed{seed}")


def spread(frames: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """{seed: that seed's FID rows (read_results, latest sweep)} -> one row per (line, nfe) present for every seed:
    the FID per seed, the mean, max/min, and for students the ratio to that seed's teacher-best FID."""
    per_seed = []
    for seed, df in frames.items():
        fid = df[df.metric == "fid"].dropna(subset=["value", "nfe"])
        best = fid[~fid.sampler.isin(student_samplers())].value.min()
        per_seed.append(fid.assign(seed=seed, vs_best=fid.value / best)[["line", "sampler", "nfe", "seed", "value",
                                                                          "vs_best"]])
    long = pd.concat(per_seed)
    wide = long.pivot_table(index=["line", "sampler", "nfe"], columns="seed", values="value", aggfunc="first")
    wide = wide.dropna()  # rows every seed has
    ratio = long.pivot_table(index=["line", "sampler", "nfe"], columns="seed", values="vs_best", aggfunc="first")
    out = pd.DataFrame({f"fid_seed{s}": wide[s] for s in wide.columns})
    out["fid_mean"] = wide.mean(axis=1)
    out["fid_max_over_min"] = wide.max(axis=1) / wide.min(axis=1)
    for s in wide.columns:
        out[f"vs_teacher_best_seed{s}"] = ratio.loc[wide.index, s]
    return out.reset_index().sort_values(["sampler", "line", "nfe"])


def spread_markdown(table: pd.DataFrame, seeds: Sequence[int], name: str) -> str:
    from fastdiff.report.common import md_table

    cols = ["line", "nfe"] + [f"fid_seed{s}" for s in seeds] + ["fid_max_over_min"]
    rows = [[r[c] if c != "nfe" else int(r[c]) for c in cols] for _, r in table.iterrows()]
    students = table[table.sampler.isin(student_samplers()) & table.nfe.isin([1, 2, 4])]
    lines = [f"# {name}: the spread over teacher seeds {', '.join(map(str, seeds))}", "",
             "Written by `python -m fastdiff.seeds` from the results CSVs of each seed (latest sweep each). Each seed "
             "trains its own teacher (same data split, reference set, distillation seed and per-index sampling "
             "noise); the spread below is what the bootstrap intervals of one sweep do not cover.", "",
             md_table(["sampler (grid)", "NFE"] + [f"FID, teacher seed {s}" for s in seeds] + ["max / min"], rows),
             ""]
    if len(students):
        lines += ["**Students relative to their own teacher's best FID** (at any step count)", "",
                  md_table(["student", "NFE"] + [f"seed {s}" for s in seeds],
                           [[r.line, int(r.nfe)] + [r[f"vs_teacher_best_seed{s}"] for s in seeds]
                            for _, r in students.iterrows()]), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from fastdiff.distill.cli import distill, sweep_and_report
    from fastdiff.distill.config import PRESETS, DistillConfig, sweep_name, validate
    from fastdiff.report.common import read_results
    from fastdiff.report.readme import latest_sweep

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [part for a in argv for part in (a.split("=", 1) if a.startswith("--teacher-seeds=") else [a])]
    if "-h" in argv or "--help" in argv:
        print("usage: python -m fastdiff.seeds --teacher-seeds S1,S2,... [--dry-run] [any python -m fastdiff.distill "
              "option]\n\n" + __doc__.strip() + "\n\nThe distill options (python -m fastdiff.distill --help) apply to "
              "every seed's run.")
        return 0
    if "--teacher-seeds" not in argv or argv.index("--teacher-seeds") + 1 >= len(argv):
        raise FastdiffError("pass --teacher-seeds S1,S2,... (at least two), then any python -m fastdiff.distill option")
    i = argv.index("--teacher-seeds")
    try:
        seeds = [int(s) for s in argv[i + 1].split(",") if s.strip()]
    except ValueError:
        raise FastdiffError(f"--teacher-seeds: cannot read {argv[i + 1]!r} as comma-separated integers") from None
    if len(set(seeds)) < 2 or min(seeds) < 0:
        raise FastdiffError(f"--teacher-seeds needs at least two distinct seeds >= 0, got {argv[i + 1]!r}")
    dist.configure_cpu_threads()
    cfg, args = runs.config_from_argv(argv[:i] + argv[i + 2:], DistillConfig, PRESETS, "python -m fastdiff.seeds",
                                      "The pipeline over several teacher seeds, and the spread of its FIDs.")
    if cfg.teacher:
        raise FastdiffError("--teacher names one trained teacher; python -m fastdiff.seeds trains one per seed")
    if not cfg.bench:
        raise FastdiffError("python -m fastdiff.seeds needs the sweep (drop --bench false)")
    configs = {s: seed_config(cfg, s) for s in seeds}
    for c in configs.values():
        validate(c)
    if args.dry_run:  # each seed's plan (distill's own dry run: checks, writes nothing), then what would be written
        from fastdiff.distill.cli import dry_run

        for s, c in configs.items():
            print(f"teacher seed {s}:")
            dry_run(c)
        name = sweep_name(configs[seeds[0]])
        print(f"spread: {Path(cfg.results_dir) / f'{name}-seeds.csv'} and .md")
        return 0
    with dist.init_from_env(cfg.device), runs.graceful_stop():
        for s, c in configs.items():
            print(f"teacher seed {s}: {c.out_dir} -> {Path(c.results_dir) / sweep_name(c)}")
            sweep_and_report(distill(c), c)
    if not dist.is_main():
        return 0
    frames = {s: latest_sweep(read_results(Path(c.results_dir) / sweep_name(c) / CSV_NAME))
              for s, c in configs.items()}
    name = sweep_name(configs[seeds[0]])
    table = spread(frames)
    out = Path(cfg.results_dir)
    write_text(out / f"{name}-seeds.csv", table.to_csv(index=False))
    write_text(out / f"{name}-seeds.md", spread_markdown(table, seeds, name) + "\n")
    print(f"spread over teacher seeds {seeds}: {out / f'{name}-seeds.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
