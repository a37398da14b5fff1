"""The answer in one table: how many NFE (and how much sampling time) each sampler and each student family needs to
reach a given quality, relative to the sweep's anchor row, from the CSV's paired-bootstrap ratio intervals only.

A line *reaches* level L (FID within L× the anchor's) at the smallest NFE whose upper 95 % bound of FID/FID_anchor
is ≤ L (pessimistic: the quality is established); the lower bound gives the optimistic NFE. The speed-up of the best
student over the best training-free solver at L is NFE_solver / NFE_student (both pessimistic), with the interval
[optimistic solver / pessimistic student, pessimistic solver / optimistic student]: conservative, since the two
ends need not be attained together.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from fastdiff.report.common import STUDENT_SAMPLERS, _save, md_table

LEVELS = (1.1, 1.3, 2.0)


def with_timing(fid: pd.DataFrame, folder: Path) -> tuple[pd.DataFrame, str]:
    """The FID rows with `ms` per sample — from the folder's timing.csv (the separate timing pass) where it has the
    row, else from the FID run — and a sentence saying which."""
    fid = fid.assign(ms=1000 * fid.wall_clock_s_total / fid.n_samples)
    path = folder / "timing.csv"
    if not path.exists():
        return fid, "sampling wall-clock per sample from the FID run itself (no separate timing pass)"
    t = pd.read_csv(path, dtype=str, keep_default_na=False)
    ms = {(r.model_hash, r.sampler, r.grid, int(r.steps)): float(r.ms_per_sample) for r in t.itertuples()}
    timed = [ms.get((r.model_hash, r.sampler, r.grid, int(r.steps))) for r in fid.itertuples()]
    fid = fid.assign(ms=[m if m is not None else f for m, f in zip(timed, fid.ms)])
    first = t.iloc[0]
    return fid, (f"sampling wall-clock per sample from the separate timing pass (timing.csv: median of "
                 f"{first.repeats} interleaved repeats, batch {first.batch}, {first.threads} threads, "
                 f"{first.cpu_model}, load {first.load_before} → {first.load_after}, {first.device})")


def reached(fid: pd.DataFrame, level: float) -> pd.DataFrame:
    """Per line: the pessimistic and optimistic NFE at which FID/anchor reaches `level`, and the ms per sample of
    the pessimistic row (column `ms`, else from the FID run; NaN where never)."""
    rows = []
    for line, g in fid.groupby("line"):
        g = g.sort_values("nfe")
        hi, lo = g[g.ratio_high <= level], g[g.ratio_low <= level]
        first = hi.iloc[0] if len(hi) else None
        rows.append({"line": line, "student": g.sampler.iloc[0] in STUDENT_SAMPLERS,
                     "nfe": float(first.nfe) if first is not None else float("nan"),
                     "nfe_optimistic": float(lo.nfe.iloc[0]) if len(lo) else float("nan"),
                     "ms": (first.ms if "ms" in g else 1000 * first.wall_clock_s_total / first.n_samples)
                     if first is not None else float("nan")})
    return pd.DataFrame(rows)


def speedup(table: pd.DataFrame) -> tuple[float, float, float, str, str] | None:
    """(speed-up, low, high, best student line, best solver line) at one level, or None if either side never
    reaches it."""
    students, solvers = table[table.student].dropna(subset=["nfe"]), table[~table.student].dropna(subset=["nfe"])
    if students.empty or solvers.empty:
        return None
    s, t = students.loc[students.nfe.idxmin()], solvers.loc[solvers.nfe.idxmin()]
    s_opt, t_opt = table[table.student].nfe_optimistic.min(), table[~table.student].nfe_optimistic.min()
    return t.nfe / s.nfe, t_opt / s.nfe, t.nfe / s_opt, s.line, t.line


def answer_section(fid: pd.DataFrame, folder: Path, results_dir: Path, tag: str) -> list[str]:
    """The time-to-quality table, the speed-ups and their plot; [] when the rows carry no ratio intervals."""
    fid = fid.dropna(subset=["ratio_low", "ratio_high"])
    if fid.empty:
        return []
    anchor = fid.ci_reference.iloc[0]
    fid, timing_note = with_timing(fid, folder)
    per_level = {level: reached(fid, level) for level in LEVELS}
    lines = sorted(fid.line.unique())
    cells = []
    for line in lines:
        row = [line]
        for level in LEVELS:
            r = per_level[level].set_index("line").loc[line]
            row.append("—" if pd.isna(r.nfe) else f"{int(r.nfe)} ({r.ms:.3g} ms)")
        cells.append(row)
    ups = []
    for level in LEVELS:
        up = speedup(per_level[level])
        ups.append((f"{level:g}×", "—" if up is None else f"{up[0]:.3g}× [{up[1]:.3g}, {up[2]:.3g}]",
                    "—" if up is None else up[3], "—" if up is None else up[4]))
    png = folder / f"nfe_to_quality{tag}.png"
    fig, ax = plt.subplots(figsize=(7, 4))
    for line in lines:
        nfes = [per_level[level].set_index("line").loc[line].nfe for level in LEVELS]
        ax.plot([f"{level:g}×" for level in LEVELS], nfes, marker="o", label=line)
    ax.set_yscale("log")
    ax.set_xlabel(f"FID within this factor of the anchor ({anchor}), upper 95 % bound")
    ax.set_ylabel("NFE needed (log)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    _save(fig, png)
    return [f"**How many NFE to reach a quality** (relative to the anchor `{anchor}`; a level counts as reached "
            f"where the upper 95 % bound of FID/FID_anchor is at most it; in brackets the {timing_note})", "",
            md_table(["sampler (grid)"] + [f"≤ {level:g}× anchor" for level in LEVELS], cells), "",
            "**Speed-up of the best student over the best training-free solver** (NFE ratio, with its conservative "
            "interval from the optimistic and pessimistic NFE of each side)", "",
            md_table(["level", "speed-up in NFE", "best student", "best training-free solver"], ups), "",
            f"![NFE to reach a quality]({png.relative_to(results_dir).as_posix()})", ""]
