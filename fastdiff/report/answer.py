"""The answer in one table: at how many NFE each sampler and each student family is as good as the teacher, and how
many NFE the best student saves — non-inferiority statements with a stated margin and family-wise error control,
from the CSV's `kid_teacher` rows only (KID against many samples of the teacher itself, with its interval).

A row *reaches the teacher* when its distance to the teacher's own distribution is below the margin δ: H0:
KID_teacher(row) ≥ δ is rejected, one-sided, z = (δ − KID_teacher)/sd with sd from the row's 95 % interval (normal,
two-sample jackknife over the row's samples and the teacher's: half-width / 1.96). δ is the KID between the best
samplers of two teachers trained with different seeds on the same data (`margin.json`, python -m fastdiff.margin): a
row closer to its teacher than two independently trained teachers are to each other is as good as the teacher. The
rows of the table (every line and NFE but the anchor — the teacher's own sampler, of which the teacher samples are
drawn) are one family of tests under Holm's step-down procedure at α = 0.05. A line reaches at its *established* NFE
(the smallest whose H0 is rejected) and *could* reach at its *optimistic* NFE (the smallest at which "the row is
farther than δ" — H0': KID_teacher ≤ δ — is not rejected, by Holm as well). The speed-up of the best student over the
best training-free solver is their established NFE ratio, with the interval [optimistic solver / established student,
established solver / optimistic student]; where a side is not established it says "not resolved" and the n at which
the closest row would be, if its estimate stayed and its whole variance shrank as 1/n (the teacher samples grown in
proportion). δ's own sampling interval (margin.json) is printed beside it; the decisions treat δ as fixed.
Quality against held-out data (KID and FID differences to the anchor) is reported beside it, not decided here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from fastdiff.registry import student_samplers
from fastdiff.report.common import _save, md_table
from fastdiff.results import MARGIN_NAME

ALPHA = 0.05
Z95 = NormalDist().inv_cdf(0.975)


def with_timing(rows: pd.DataFrame, folder: Path) -> tuple[pd.DataFrame, str]:
    """The rows with `ms` per sample — from the folder's timing.csv (the separate timing pass) where it has the row,
    else from the FID run — and a sentence saying which."""
    rows = rows.assign(ms=1000 * rows.wall_clock_s_total / rows.n_samples)
    path = folder / "timing.csv"
    if not path.exists():
        return rows, "sampling wall-clock per sample from the sweep itself (no separate timing pass)"
    t = pd.read_csv(path, dtype=str, keep_default_na=False)
    ms = {(r.model_hash, r.sampler, r.grid, int(r.steps)): float(r.ms_per_sample) for r in t.itertuples()}
    timed = [ms.get((r.model_hash, r.sampler, r.grid, int(r.steps))) for r in rows.itertuples()]
    rows = rows.assign(ms=[m if m is not None else f for m, f in zip(timed, rows.ms)])
    first = t.iloc[0]
    return rows, (f"sampling wall-clock per sample from the separate timing pass (timing.csv: median of "
                  f"{first.repeats} interleaved repeats, batch {first.batch}, {first.threads} threads, "
                  f"{first.cpu_model}, load {first.load_before} → {first.load_after}, {first.device})")


def holm(p: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Holm's step-down rejections (bool, same order as p) at family-wise error rate alpha."""
    order = np.argsort(p, kind="stable")
    reject = np.zeros(len(p), dtype=bool)
    for rank, i in enumerate(order):
        if p[i] > alpha / (len(p) - rank):
            break
        reject[i] = True
    return reject


def read_margin(folder: Path) -> dict | None:
    """The family's margin (margin.json beside its CSV), or None."""
    path = folder / MARGIN_NAME
    return json.loads(path.read_text()) if path.exists() else None


def decisions(rows: pd.DataFrame, delta: float) -> pd.DataFrame:
    """The kid_teacher rows (not the anchor; `gap` = the row's KID to the teacher) with sd (from ci_low/ci_high), the
    Holm decisions `within` (gap < δ established) and `worse` (gap > δ established)."""
    rows = rows[~rows.is_anchor].copy()
    rows["sd"] = (rows.ci_high - rows.ci_low) / (2 * Z95)
    z = (delta - rows.gap) / rows.sd.where(rows.sd > 0, np.nan)
    p_within = 1 - np.array([NormalDist().cdf(v) if np.isfinite(v) else (1.0 if v < 0 else 0.0) for v in z])
    rows["within"] = holm(p_within)
    rows["worse"] = holm(1 - p_within)
    return rows


def reached(rows: pd.DataFrame) -> pd.DataFrame:
    """Per line: the established and optimistic NFE (NaN: never), and the ms per sample of the established row."""
    out = []
    for line, g in rows.groupby("line"):
        g = g.sort_values("nfe")
        est, opt = g[g.within], g[~g.worse]
        out.append({"line": line, "student": g.sampler.iloc[0] in student_samplers(),
                    "nfe": float(est.nfe.iloc[0]) if len(est) else np.nan,
                    "nfe_optimistic": float(opt.nfe.iloc[0]) if len(opt) else np.nan,
                    "ms": float(est.ms.iloc[0]) if len(est) else np.nan})
    return pd.DataFrame(out)


def samples_to_resolve(rows: pd.DataFrame, delta: float, n: int) -> tuple[int, str] | None:
    """(n, the row) at which the row closest to being established (gap < δ) would be, at a Bonferroni threshold over
    the family (Holm's first step) with its whole variance shrinking as 1/n — the generated samples and the teacher
    samples grown in proportion — and its estimate unchanged; None when no row's estimate is below δ."""
    cand = rows[rows.gap < delta]
    if cand.empty:
        return None
    z = NormalDist().inv_cdf(1 - ALPHA / len(rows))
    need = n * (z * cand.sd / (delta - cand.gap)) ** 2
    best = cand.loc[need.idxmin()]
    return int(np.ceil(need.min())), f"{best.line} at {int(best.nfe)} NFE"


def speedup(table: pd.DataFrame) -> tuple[float, float, float, str, str] | None:
    """(speed-up, low, high, best student line, best solver line), or None if either side is not established."""
    students, solvers = table[table.student].dropna(subset=["nfe"]), table[~table.student].dropna(subset=["nfe"])
    if students.empty or solvers.empty:
        return None
    s, t = students.loc[students.nfe.idxmin()], solvers.loc[solvers.nfe.idxmin()]
    s_opt, t_opt = table[table.student].nfe_optimistic.min(), table[~table.student].nfe_optimistic.min()
    return t.nfe / s.nfe, t_opt / s.nfe, t.nfe / s_opt, s.line, t.line


@dataclass(frozen=True)
class Answer:
    """The answer of one sweep: the margin, n, the anchor, the per-line table (`reached`), the speed-up sentence."""

    delta: float
    what: str
    n: int
    anchor: str
    tests: int
    table: pd.DataFrame
    speedup: str
    timing_note: str
    delta_interval: tuple[float, float] | None = None

    @property
    def header(self) -> str:
        own = (f"; its own 95 % interval [{self.delta_interval[0]:.3g}, {self.delta_interval[1]:.3g}], treated as "
               "fixed" if self.delta_interval else "")
        return (f"KID to the teacher's own samples below δ = {self.delta:.4g} ({self.what}{own}), n = {self.n} per "
                f"row, one-sided, Holm over all {self.tests} rows but the anchor `{self.anchor}` (the sampler the "
                f"teacher samples are drawn with), α = {ALPHA}")


def compute_answer(kid: pd.DataFrame, folder: Path) -> Answer | str | None:
    """The Answer from a sweep's kid_teacher rows (with is_anchor); a sentence when the family has no margin; None
    when the sweep has no such rows."""
    kid = kid.dropna(subset=["ci_low", "ci_high"])
    if kid.empty:
        return None
    margin = read_margin(folder)
    if margin is None:
        return (f"**NFE to reach the teacher**: not stated — no margin δ for this family (`{MARGIN_NAME}`, written by "
                "`python -m fastdiff.margin`): a level needs one.")
    delta, n = float(margin["delta"]), int(kid.n_samples.iloc[0])
    kid, timing_note = with_timing(kid.assign(gap=kid.value), folder)
    rows = decisions(kid, delta)
    table = reached(rows)
    up = speedup(table)
    if up is None:
        need = samples_to_resolve(rows, delta, n)
        refs = margin.get("samples_per_teacher")
        grown = f", the teacher samples {refs} → ≈ {int(np.ceil(refs * need[0] / n))}" if need and refs else ""
        text = ("not resolved: no student or no training-free solver is established within δ at n = "
                f"{n}" + (f"; the closest row, {need[1]}, would be at n ≈ {need[0]} per row (its estimate unchanged "
                          f"and its whole variance shrinking as 1/n{grown}; Bonferroni over the family)"
                          if need else "; no row's estimate is within δ"))
    else:
        text = (f"{up[0]:.3g}× fewer NFE [{up[1]:.3g}, {up[2]:.3g}] for `{up[3]}` over `{up[4]}`"
                + (" — the interval contains 1: no saving is established" if up[1] <= 1 <= up[2] else ""))
    what = margin.get("what", "the KID between the best samplers of two teachers trained with different seeds")
    anchor = kid[kid.is_anchor]
    anchor = (f"{anchor.line.iloc[0]} at {int(anchor.nfe.iloc[0])} NFE" if len(anchor)
              else str(kid.ci_reference.iloc[0]))
    interval = margin.get("delta_interval_95")
    return Answer(delta, what, n, anchor, len(rows), table, text, timing_note,
                  (float(interval[0]), float(interval[1])) if interval else None)


def _established(r) -> str:
    return "yes" if not np.isnan(r.nfe) else ("not resolved" if not np.isnan(r.nfe_optimistic) else "no")


def answer_lines(kid: pd.DataFrame, folder: Path) -> list[str]:
    """The answer as README sentences; [] when the rows have no differences."""
    got = compute_answer(kid, folder)
    if got is None:
        return []
    if isinstance(got, str):
        return [got, ""]
    per_line = "; ".join(f"{r.line} {'at ' + str(int(r.nfe)) if not np.isnan(r.nfe) else _established(r)}"
                         for r in got.table.sort_values("line").itertuples())
    return [f"**NFE to reach the teacher** ({got.header}): {per_line}. **Speed-up of the best student over the best "
            f"training-free solver:** {got.speedup}.", ""]


def answer_section(kid: pd.DataFrame, folder: Path, results_dir: Path, tag: str) -> list[str]:
    """The NFE-to-the-teacher table, the speed-up and their plot from the kid_teacher rows (with is_anchor)."""
    got = compute_answer(kid, folder)
    if got is None:
        return []
    if isinstance(got, str):
        return [got, ""]
    table = got.table.sort_values("line")
    cells = [[r.line, "—" if np.isnan(r.nfe) else f"{int(r.nfe)} ({r.ms:.3g} ms)",
              "never" if np.isnan(r.nfe_optimistic) else int(r.nfe_optimistic), _established(r)]
             for r in table.itertuples()]
    png = folder / f"nfe_to_teacher{tag}.png"
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in table.itertuples():
        if not np.isnan(r.nfe_optimistic):
            ax.plot([r.nfe_optimistic, r.nfe if not np.isnan(r.nfe) else r.nfe_optimistic], [r.line] * 2,
                    marker="o", linestyle="-" if not np.isnan(r.nfe) else ":")
    ax.set_xscale("log")
    ax.set_xlabel(f"NFE: optimistic … established KID to the teacher < δ = {got.delta:.4g} (Holm, α = {ALPHA})")
    ax.grid(alpha=0.3)
    _save(fig, png)
    return [f"**NFE to reach the teacher** ({got.header}; in brackets the {got.timing_note})", "",
            md_table(["sampler (grid)", "established at NFE", "optimistic NFE", "established"], cells), "",
            f"**Speed-up of the best student over the best training-free solver at the teacher's quality:** "
            f"{got.speedup}.", "", f"![NFE to reach the teacher]({png.relative_to(results_dir).as_posix()})", ""]
