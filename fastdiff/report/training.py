"""The training-cost section of the report: quality vs distillation cost for every method of a run, from the
training points (`training.csv`) that `python -m fastdiff.distill` writes beside its sweep."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from fastdiff.report.common import _save, md_table

TRAINING = "training.csv"  # fastdiff.distill.protocol.TRAINING_NAME (not imported: the report needs no torch)
# what fastdiff before the method protocol wrote instead: copies of a run's rounds.csv and cd.csv
TRAINING_PD, TRAINING_CD = "training_pd.csv", "training_cd.csv"


def training_points(folder: Path) -> pd.DataFrame | None:
    """(method, short, nfe, updates, forward_equivalents, fid, metric) of the students a distillation run evaluated
    while training, methods in run order; None without any. From `training.csv` (every method's students, their
    own evaluation and cost), or the copies of rounds.csv (progressive: the N-step student at NFE N, updates
    cumulative over the rounds) and cd.csv (consistency: every snapshot at 1/2/4 NFE) that earlier versions wrote.
    All are scored by the run's round metric on the same per-index noise."""
    if (folder / TRAINING).exists():
        return pd.read_csv(folder / TRAINING).rename(columns={"value": "fid"})
    frames = []
    if (folder / TRAINING_PD).exists():
        pd_rows = pd.read_csv(folder / TRAINING_PD).sort_values("round")
        pd_rows = pd_rows.assign(updates=pd_rows["updates"].cumsum())
        pd_rows = pd_rows[pd_rows.student_steps.notna()]
        frames.append(pd.DataFrame({"method": "progressive", "short": "PD", "nfe": pd_rows.student_steps.astype(int),
                                    "updates": pd_rows.updates, "fid": pd_rows.student_value,
                                    "metric": pd_rows.metric}))
    if (folder / TRAINING_CD).exists():
        cd = pd.read_csv(folder / TRAINING_CD)
        frames.append(pd.DataFrame({"method": "consistency", "short": "CD", "nfe": cd.nfe, "updates": cd.updates,
                                    "fid": cd.student_value, "metric": cd.metric}))
    return pd.concat(frames, ignore_index=True).assign(forward_equivalents=float("nan")) if frames else None


def methods_in_order(points: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(points.method))


def _cost(row, with_fe: bool) -> str:
    return f"{int(row.updates)}" + (f" ({row.forward_equivalents:.3g} fwd-eq)" if with_fe else "")


def training_section(folder: Path, results_dir: Path) -> list[str]:
    """FID at 1, 2 and 4 NFE vs distillation cost (forward-equivalents where the points carry them: a backward = 2
    forwards, every network a method trains or evaluates; else optimiser updates of the same batch; cumulative from
    the teacher) for each method, and the cost each needs to reach the first method's FID."""
    points = training_points(folder)
    if points is None:
        return []
    with_fe = bool(points.forward_equivalents.notna().all())
    x = "forward_equivalents" if with_fe else "updates"
    nfes = [n for n in (1, 2, 4) if (points.nfe == n).any()]
    fig, axes = plt.subplots(1, len(nfes), figsize=(4.2 * len(nfes), 3.6), squeeze=False)
    for ax, n in zip(axes[0], nfes):
        for method, g in points[points.nfe == n].groupby("method"):
            g = g.sort_values("updates")
            one = len(g) == 1 or g.updates.nunique() == 1  # one student at this NFE (a progressive round's): points
            ax.plot(g[x], g.fid, marker="o" if one else "x", linestyle="none" if one else "-", label=method)
        ax.set_yscale("log")
        ax.set_xlabel("forward-equivalents (backward = 2), cumulative from the teacher" if with_fe
                      else "optimiser updates, cumulative from the teacher")
        ax.set_ylabel(f"{points.metric.iloc[0]} (log)")
        ax.set_title(f"{n} NFE", fontsize=10)
        ax.legend(fontsize=8)
    png = folder / "fid_vs_training_cost.png"
    _save(fig, png)
    first, *others = methods_in_order(points)
    at = "updates (forward-equivalents)" if with_fe else "updates"
    rows = []
    for n in nfes:
        here = points[points.nfe == n]
        ref = here[here.method == first]
        p = ref.iloc[-1] if len(ref) else None
        row = [n, "—" if p is None else f"{p.fid:.4g} at {_cost(p, with_fe)}"]
        for other in others:
            cons = here[here.method == other].sort_values("updates")
            best = cons.loc[cons.fid.idxmin()] if len(cons) else None
            reach = cons[cons.fid <= p.fid] if p is not None and len(cons) else cons.iloc[:0]
            row += ["—" if best is None else f"{best.fid:.4g} at {_cost(best, with_fe)}",
                    ("never" if p is not None and len(cons) else "—") if reach.empty
                    else _cost(reach.iloc[0], with_fe) if with_fe else int(reach.iloc[0].updates)]
        rows.append(tuple(row))
    head = [f"{first}: FID at {at}"] + [h for other in others
                                         for h in (f"{other}: best FID at {at}", f"{other}: {at} to reach the {first} FID")]
    return [f"![FID vs training cost]({png.relative_to(results_dir).as_posix()})", "",
            "**Training cost** (from the distillation run's own evaluation while training: "
            f"{points.metric.iloc[0]}, the round's samples)", "",
            md_table(("NFE", *head), rows), ""]
