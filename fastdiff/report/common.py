"""What every section of the report shares: reading a bench CSV, curve labels and styles, Markdown tables and
saving a figure."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import pandas as pd

from fastdiff import registry
from fastdiff.errors import FastdiffError
from fastdiff.io import atomic_path

NUMERIC = ("steps", "nfe", "n_samples", "seed", "value", "batch_size", "wall_clock_s_per_batch", "wall_clock_s_total")
CI_NUMERIC = ("ci_low", "ci_high", "diff_low", "diff_high", "ratio_low", "ratio_high")
# What makes rows comparable: one sweep = one model family scored the same way.
SWEEP = ["teacher_hash", "extractor", "reference", "n_samples", "seed", "clip"]
LINE = ["sampler", "grid", "eta", "variance"]


def read_results(path: Path) -> pd.DataFrame:
    """One bench CSV as a DataFrame: key columns as strings ("" for empty), measured columns as numbers."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise FastdiffError(f"cannot read {path} ({err}); re-run python -m fastdiff.bench") from None
    df = df.rename(columns={"spacing": "grid"})  # the column's name before fastdiff 0.2
    missing = [c for c in (*NUMERIC, *SWEEP, *LINE, "metric", "dataset") if c not in df.columns]
    if missing:
        raise FastdiffError(f"{path} lacks columns {missing}; it was not written by python -m fastdiff.bench")
    for col in NUMERIC + CI_NUMERIC:  # the interval columns are absent from CSVs before fastdiff 0.4
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else float("nan")
    for col in ("ci_reference", "ci_method", "ci_resamples"):
        df[col] = df[col] if col in df else ""
    df["line"] = [line_label(*r) for r in df[LINE].itertuples(index=False)]
    # KID to the teacher is scored against the teacher's own samples: its rows keep that reference apart and join
    # their sampling run's sweep (the held-out reference of the run's other rows)
    own = df.metric == "kid_teacher"
    df["teacher_reference"] = df.reference.where(own, "")
    if own.any():
        run = list(zip(df.samples_file, df.get("timestamp", pd.Series([""] * len(df)))))
        held_out = {k: ref for k, ref, o in zip(run, df.reference, own) if not o}
        df["reference"] = [held_out.get(k, ref) if o else ref for k, ref, o in zip(run, df.reference, own)]
    return df


def line_label(sampler: str, grid: str, eta: str, variance: str) -> str:
    """The legend entry of one curve: its sampler's (fastdiff.registry), by default sampler + its grid + eta (where
    not 0) or variance (DDPM)."""
    return registry.line_label(sampler, grid, eta, variance)


def _styles(lines: Sequence[str]) -> dict[str, dict]:
    """A fixed colour + marker per line, so every figure of a sweep uses the same legend."""
    cmap = plt.get_cmap("tab10")
    markers = "osD^v<>ph*"
    return {ln: {"color": cmap(i % 10), "marker": markers[i % len(markers)]} for i, ln in enumerate(sorted(lines))}


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def is_anchor(r) -> bool:
    """Whether row `r` (a namedtuple of a results frame) is the anchor its intervals are taken to."""
    return bool(r.ci_reference) and r.ci_reference == f"{r.sampler}/{r.grid}/{int(r.steps)}"
