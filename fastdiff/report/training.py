"""The training-cost section of the report: FID vs distillation cost, from the training logs that
`python -m fastdiff.distill` copies beside its sweep."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from fastdiff.report.common import _save, md_table

TRAINING_PD, TRAINING_CD = "training_pd.csv", "training_cd.csv"  # a distillation run's rounds.csv and cd.csv


def training_points(folder: Path) -> pd.DataFrame | None:
    """(method, nfe, updates, fid) of the students a distillation run evaluated while training, from the copies of
    its rounds.csv (progressive: the N-step student at NFE N, updates cumulative over the rounds) and cd.csv
    (consistency: every snapshot at 1/2/4 NFE) that `python -m fastdiff.distill` puts beside its sweep; None
    without them. Both are scored by the run's round metric on the same per-index noise."""
    frames = []
    if (folder / TRAINING_PD).exists():
        pd_rows = pd.read_csv(folder / TRAINING_PD).sort_values("round")
        pd_rows = pd_rows.assign(updates=pd_rows["updates"].cumsum())
        pd_rows = pd_rows[pd_rows.student_steps.notna()]
        frames.append(pd.DataFrame({"method": "progressive", "nfe": pd_rows.student_steps.astype(int),
                                    "updates": pd_rows.updates, "fid": pd_rows.student_value,
                                    "metric": pd_rows.metric}))
    if (folder / TRAINING_CD).exists():
        cd = pd.read_csv(folder / TRAINING_CD)
        frames.append(pd.DataFrame({"method": "consistency", "nfe": cd.nfe, "updates": cd.updates,
                                    "fid": cd.student_value, "metric": cd.metric}))
    return pd.concat(frames, ignore_index=True) if frames else None


def training_section(folder: Path, results_dir: Path) -> list[str]:
    """FID at 1, 2 and 4 NFE vs distillation cost (optimiser updates of the same batch, cumulative from the
    teacher) for each method, and the cost each needs to reach the progressive student's FID."""
    points = training_points(folder)
    if points is None:
        return []
    nfes = [n for n in (1, 2, 4) if (points.nfe == n).any()]
    fig, axes = plt.subplots(1, len(nfes), figsize=(4.2 * len(nfes), 3.6), squeeze=False)
    for ax, n in zip(axes[0], nfes):
        for method, g in points[points.nfe == n].groupby("method"):
            g = g.sort_values("updates")
            ax.plot(g.updates, g.fid, marker="o" if method == "progressive" else "x",
                    linestyle="none" if method == "progressive" else "-", label=method)
        ax.set_yscale("log")
        ax.set_xlabel("optimiser updates, cumulative from the teacher")
        ax.set_ylabel(f"{points.metric.iloc[0]} (log)")
        ax.set_title(f"{n} NFE", fontsize=10)
        ax.legend(fontsize=8)
    png = folder / "fid_vs_training_cost.png"
    _save(fig, png)
    rows = []
    for n in nfes:
        here = points[points.nfe == n]
        prog, cons = here[here.method == "progressive"], here[here.method == "consistency"].sort_values("updates")
        p = prog.iloc[-1] if len(prog) else None
        best = cons.loc[cons.fid.idxmin()] if len(cons) else None
        reach = cons[cons.fid <= p.fid] if p is not None and len(cons) else cons.iloc[:0]
        rows.append((n, "—" if p is None else f"{p.fid:.4g} at {int(p.updates)}",
                     "—" if best is None else f"{best.fid:.4g} at {int(best.updates)}",
                     ("never" if p is not None and len(cons) else "—") if reach.empty
                     else int(reach.iloc[0].updates)))
    return [f"![FID vs training cost]({png.relative_to(results_dir).as_posix()})", "",
            "**Training cost** (from the distillation run's own evaluation while training: "
            f"{points.metric.iloc[0]}, the round's samples)", "",
            md_table(("NFE", "progressive: FID at updates", "consistency: best FID at updates",
                      "consistency: updates to reach the progressive FID"), rows), ""]
