"""`python -m fastdiff.report RESULTS_DIR`: plots and RESULTS_DIR/report.md from the bench CSVs only.

Reads `RESULTS_DIR/<dataset>/fid_vs_steps.csv` (written by `fastdiff.bench`), the sample files it names
(`samples/*.npz`) and `RESULTS_DIR/gpu/*.json` if present; never recomputes a number and never imports torch
(pandas, numpy, matplotlib with the Agg backend). Per data set and sweep it draws FID vs NFE, FID vs wall-clock,
the other metrics vs NFE and sample grids at equal NFE budgets (same noise per sample index), and writes
tables of the best FID per NFE budget, FID by sampler and NFE, and the provenance.
"""
from __future__ import annotations

import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fastdiff.config import make_parser  # noqa: E402
from fastdiff.errors import FastdiffError, run_cli  # noqa: E402
from fastdiff.io import atomic_path, write_text  # noqa: E402
from fastdiff.results import CSV_NAME  # noqa: E402
from fastdiff.viz import draw_samples  # noqa: E402

log = logging.getLogger(__name__)

NUMERIC = ("steps", "nfe", "n_samples", "seed", "value", "batch_size", "wall_clock_s_per_batch", "wall_clock_s_total")
# What makes rows comparable: one sweep = one model family scored the same way.
SWEEP = ["teacher_hash", "extractor", "reference", "n_samples", "seed", "clip"]
LINE = ["sampler", "grid", "eta", "variance"]
OTHER_METRICS = ("kid", "precision", "recall", "swd")
MAX_GRID_BUDGETS, MAX_TABLE_BUDGETS = 3, 12


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
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["line"] = [line_label(*r) for r in df[LINE].itertuples(index=False)]
    return df


def line_label(sampler: str, grid: str, eta: str, variance: str) -> str:
    """The legend entry of one curve: sampler + its grid + eta (DDIM) or variance (DDPM)."""
    if sampler == "distilled":
        return "distilled students (own N-step grid)"
    if sampler == "consistency":
        return f"consistency student ({grid}, multistep)"
    extra = [grid] + ([f"η={float(eta):g}"] if sampler.startswith("ddim") and eta else []) + \
        ([f"{variance} var."] if variance else [])
    return f"{sampler} ({', '.join(extra)})"


def _styles(lines: Sequence[str]) -> dict[str, dict]:
    """A fixed colour + marker per line, so every figure of a sweep uses the same legend."""
    cmap = plt.get_cmap("tab10")
    markers = "osD^v<>ph*"
    return {ln: {"color": cmap(i % 10), "marker": markers[i % len(markers)]} for i, ln in enumerate(sorted(lines))}


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _metric_plot(df: pd.DataFrame, metric: str, x: str, ax, styles, logy: bool) -> None:
    for line, g in df[df.metric == metric].groupby("line"):
        g = g.sort_values("nfe")  # a curve is parametrised by NFE, also when drawn against wall-clock
        ax.plot(g[x], g["value"], label=line, markersize=4, **styles[line])
    ax.set_xscale("log")
    values = df.loc[df.metric == metric, "value"]
    if logy and len(values) and values.min() > 0:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)


def _describe(df: pd.DataFrame) -> str:
    first = df.iloc[0]
    return f"{first.dataset}, {first.extractor} features, {int(first.n_samples)} samples vs {first.reference}"


def plot_fid(df: pd.DataFrame, x: str, xlabel: str, path: Path, styles) -> None:
    """FID vs `x` (log x), one line per sampler + grid + eta."""
    fig, ax = plt.subplots(figsize=(8, 5))
    _metric_plot(df, "fid", x, ax, styles, logy=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(f"FID vs {xlabel.split(' (')[0]}\n{_describe(df)}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="sampler (grid)")
    _save(fig, path)


def plot_other_metrics(df: pd.DataFrame, path: Path, styles) -> bool:
    """KID / precision / recall / sliced Wasserstein vs NFE, one panel each; False if the sweep has none."""
    metrics = [m for m in OTHER_METRICS if (df.metric == m).any()]
    if not metrics:
        return False
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False)
    ylabels = {"kid": "KID (lower is better)", "precision": "precision (higher is better)",
               "recall": "recall (higher is better)", "swd": "sliced Wasserstein-2 (lower is better)"}
    for ax, m in zip(axes[0], metrics):
        _metric_plot(df, m, "nfe", ax, styles, logy=m in ("swd",))
        ax.set_xlabel("NFE (network evaluations, log scale)")
        ax.set_ylabel(ylabels[m])
        ax.set_title(m, fontsize=10)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="sampler (grid)")
    fig.suptitle(f"Other metrics vs NFE — {_describe(df)}", fontsize=10, y=1.03)
    _save(fig, path)
    return True


def grid_budgets(fid: pd.DataFrame) -> list[int]:
    """Up to 3 NFE budgets for the sample grids: the smallest, a middle and the largest power-of-two NFE of the
    sweep's curves (DDPM's full grid excluded: it has a single point)."""
    nfes = sorted(fid.loc[fid.sampler != "ddpm", "nfe"].dropna().astype(int).unique())
    nfes = [n for n in nfes if n & (n - 1) == 0] or nfes  # powers of two: where most curves have a point
    if len(nfes) <= MAX_GRID_BUDGETS:
        return nfes
    return sorted({nfes[0], nfes[len(nfes) // 2], nfes[-1]})


def best_per_line(fid: pd.DataFrame, budget: int) -> pd.DataFrame:
    """For each line, its row with the largest NFE <= budget."""
    within = fid[fid.nfe <= budget].sort_values("nfe")
    return within.groupby("line").tail(1).sort_values("line")


def plot_sample_grid(fid: pd.DataFrame, budget: int, folder: Path, path: Path) -> bool:
    """One panel per line at NFE <= budget (same initial noise in every panel); False if no sample file exists."""
    rows = [r for r in best_per_line(fid, budget).itertuples() if r.samples_file and (folder / r.samples_file).exists()]
    if not rows:
        return False
    ncols = min(4, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.7 * nrows), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    samples = []
    for r in rows:
        with np.load(folder / r.samples_file) as npz:
            samples.append(npz["samples"])
    for ax, r, x in zip(axes.flat, rows, samples):
        draw_samples(ax, x, f"{r.line}\nNFE {int(r.nfe)}, FID {r.value:.3g}")
    if samples[0].ndim == 2:
        # Points share robust axis limits so the panels compare; a diverged sampler's outliers fall off the edge.
        pooled = np.concatenate(samples)[:, :2]
        lo, hi = np.percentile(pooled, 0.5, axis=0), np.percentile(pooled, 99.5, axis=0)
        pad = 0.1 * (hi - lo)
        for ax in axes.flat[:len(rows)]:
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
    fig.suptitle(f"Samples at NFE ≤ {budget} (same initial noise per sample index) — {fid.iloc[0].dataset}",
                 fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def table_budgets(fid: pd.DataFrame) -> list[int]:
    """The NFE budgets of the best-FID table: every NFE of the sweep, or the powers of two and the largest if many."""
    nfes = sorted(fid.nfe.dropna().astype(int).unique())
    if len(nfes) > MAX_TABLE_BUDGETS:
        nfes = sorted({n for n in nfes if n & (n - 1) == 0} | {nfes[-1]})
    return nfes


def best_table(fid: pd.DataFrame) -> str:
    rows = []
    for budget in table_budgets(fid):
        best = fid[fid.nfe <= budget].sort_values(["value", "nfe", "line"]).iloc[0]
        rows.append((budget, best.line, int(best.nfe), int(best.steps), best.value))
    return md_table(("NFE budget", "best sampler (grid)", "its NFE", "its steps", "FID"), rows)


def pivot_table(fid: pd.DataFrame) -> str:
    pivot = fid.pivot_table(index="line", columns="nfe", values="value", aggfunc="first")
    return md_table(["sampler (grid) \\ NFE"] + [str(int(c)) for c in pivot.columns],
                    [[line] + list(vals) for line, vals in zip(pivot.index, pivot.to_numpy())])


def cost_table(fid: pd.DataFrame) -> str | None:
    """The distilled students' FID beside what each cost to make (cumulative from the teacher; the rows'
    train_* columns), or None when no row records a cost (the teacher's rows, CSVs before fastdiff 0.3)."""
    if "train_updates" not in fid:
        return None
    rows = fid[fid.train_updates.astype(str) != ""].sort_values(["line", "nfe"])
    if rows.empty:
        return None
    return md_table(("student (grid)", "NFE", "FID", "updates", "teacher evaluations", "student passes",
                     "training wall-clock (s)", "trained on"),
                    [(r.line, int(r.nfe), r.value, r.train_updates, r.train_teacher_evals, r.train_student_passes,
                      r.train_wall_clock_s, r.train_device) for r in rows.itertuples()])


def provenance_table(df: pd.DataFrame) -> str:
    def uniq(col):
        vals = sorted({v for v in df[col].astype(str) if v not in ("", "nan")})
        return ", ".join(vals) if vals else "—"

    items = [("fastdiff commit", "fastdiff_commit"), ("fastdiff version", "fastdiff_version"), ("device", "device"),
             ("torch", "torch_version"), ("torch-fidelity", "torch_fidelity_version"), ("seed", "seed"),
             ("samples per row", "n_samples"), ("batch size", "batch_size"), ("x0 clipping", "clip"),
             ("feature extractor", "extractor"), ("extractor test accuracy", "extractor_accuracy"),
             ("reference set", "reference"), ("teacher checkpoint (sha256 prefix)", "teacher_hash"),
             ("sampled checkpoints (sha256 prefix)", "model_hash"), ("metrics", "metric")]
    rows = [(name, uniq(col)) for name, col in items]
    stamps = sorted(v for v in df["timestamp"] if v) if "timestamp" in df else []
    if stamps:
        rows.append(("measured (UTC)", f"{stamps[0]} … {stamps[-1]}"))
    return md_table(("item", "value"), rows)


def sweep_section(df: pd.DataFrame, folder: Path, results_dir: Path, tag: str) -> list[str]:
    """Figures and tables of one sweep; returns the Markdown lines (figure paths relative to results_dir)."""
    fid = df[df.metric == "fid"].dropna(subset=["value", "nfe"])
    styles = _styles(df.line.unique())
    rel = lambda p: p.relative_to(results_dir).as_posix()  # noqa: E731
    md = []
    if fid.empty:
        md.append("No FID rows in this sweep.")
    else:
        nfe_png, wall_png = folder / f"fid_vs_nfe{tag}.png", folder / f"fid_vs_wallclock{tag}.png"
        plot_fid(fid, "nfe", "NFE (network evaluations per sample, log scale)", nfe_png, styles)
        fid = fid.assign(ms_per_sample=1000 * fid.wall_clock_s_total / fid.n_samples)
        devices = ", ".join(sorted(fid.device.unique()))
        plot_fid(fid, "ms_per_sample", f"wall-clock per sample (ms, log scale; sampling only, on {devices})",
                 wall_png, styles)
        md += [f"![FID vs NFE]({rel(nfe_png)})", "", f"![FID vs wall-clock]({rel(wall_png)})", "",
               "Wall-clock is the sampling time of all batches divided by the number of samples (noise drawing and "
               "scoring excluded), measured in the same run on the device listed below.", "",
               "**Best FID within an NFE budget**", "", best_table(fid), "", "**FID by sampler and NFE**", "",
               pivot_table(fid), ""]
        costs = cost_table(fid)
        if costs:
            md += ["**What each student cost to make** (cumulative from the teacher, whose own training is not "
                   "counted; teacher evaluations and student passes per example)", "", costs, ""]
    other_png = folder / f"metrics_vs_nfe{tag}.png"
    if plot_other_metrics(df, other_png, styles):
        md += [f"![Other metrics vs NFE]({rel(other_png)})", ""]
    for stale in folder.glob(f"samples_nfe*{tag}.png"):  # grids of budgets an earlier report chose
        stale.unlink()
    if not fid.empty:
        for budget in grid_budgets(fid):
            png = folder / f"samples_nfe{budget}{tag}.png"
            if plot_sample_grid(fid, budget, folder, png):
                md += [f"![Samples at NFE <= {budget}]({rel(png)})", ""]
    md += ["**Provenance**", "", provenance_table(df), ""]
    return md


GUIDANCE_STEPS = (1, 2, 4, 8, 32)  # step counts drawn in the guidance trade-off plot (the table has all)


def guidance_section(df: pd.DataFrame, folder: Path, results_dir: Path, tag: str) -> list[str]:
    """A classifier-free-guidance sweep: FID and class accuracy against w per (sampler, steps), and a table."""
    g = df.assign(w=pd.to_numeric(df.guidance))
    png = folder / f"guidance_tradeoff{tag}.png"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = [("fid", "FID (lower is better)"), ("class_accuracy", "class accuracy of the samples (higher is better)")]
    for ax, (metric, ylabel) in zip(axes, panels):
        sub = g[(g.metric == metric) & g.steps.isin(GUIDANCE_STEPS)]
        for (line, steps), grp in sub.groupby(["line", "steps"], sort=True):
            grp = grp.sort_values("w")
            ax.plot(grp.w, grp.value, marker="o" if line.startswith("distilled") else "x",
                    linestyle="-" if line.startswith("distilled") else "--", label=f"{line}: {int(steps)} steps")
        ax.set_xlabel("guidance weight w (0 = unconditional, 1 = conditional, > 1 guided)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("FID (log scale, lower is better)")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{df.iloc[0].dataset}: classifier-free guidance trade-off, {int(df.iloc[0].n_samples)} samples, "
                 "sample k asks for class k mod 10")
    fig.tight_layout()
    _save(fig, png)
    wide = g[g.metric.isin(["fid", "class_accuracy"])].pivot_table(index=["line", "steps", "w"], columns="metric",
                                                                    values="value", aggfunc="first").reset_index()
    rows = [[r.line, int(r.steps), f"{r.w:g}", _fmt(r.fid), _fmt(getattr(r, "class_accuracy", float("nan")))]
            for r in wide.sort_values(["line", "steps", "w"]).itertuples()]
    return [f"![Guidance trade-off]({png.relative_to(results_dir).as_posix()})", "",
            "The teacher is guided through the sampler (one batched forward for the conditional and unconditional "
            "outputs); the distilled students take w as an input (Meng et al. 2023).", "",
            md_table(["sampler", "steps", "w", "FID", "class accuracy"], rows), "",
            "**Provenance**", "", provenance_table(df), ""]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = ", ".join(map(str, v)) if isinstance(v, list) else v
    return out


def gpu_section(path: Path) -> list[str]:
    """Tables of gpu/kernels.json (written by benchmarks/gpu_report.py): its scalars (nested keys dotted), then one
    table per list of records."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return [f"`{path.name}` is unreadable ({type(err).__name__}).", ""]
    md = [f"### {path.name} — device: {data.get('device', 'not recorded')}", ""]
    scalars = {k: v for k, v in _flatten({k: v for k, v in data.items()
                                          if not isinstance(v, list) or not v or not isinstance(v[0], dict)}).items()
               if not isinstance(v, dict)}
    if scalars:
        md += [md_table(("item", "value"), list(scalars.items())), ""]
    for key, value in data.items():
        records = None
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            records = [_flatten(r) for r in value]
        if records:
            cols = list(dict.fromkeys(c for r in records for c in r))
            md += [f"**{key}**", "", md_table(cols, [[r.get(c, "") for c in cols] for r in records]), ""]
    return md


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


def write_report(results_dir) -> Path:
    """Draw every figure and write `results_dir/report.md` from the CSVs (and npz, gpu/*.json) under it."""
    results_dir = Path(results_dir)
    csvs = sorted(results_dir.glob(f"*/{CSV_NAME}"))
    gpu = sorted((results_dir / "gpu").glob("*.json"))
    if not csvs and not gpu:
        raise FastdiffError(f"no */{CSV_NAME} and no gpu/*.json under {str(results_dir)!r}; run python -m "
                            "fastdiff.bench first or pass the folder it wrote (its --out-dir)")
    md = ["# fastdiff results", "",
          f"Generated by `python -m fastdiff.report {results_dir}` from the CSV files below only "
          "(every number comes from a row of them, with its provenance).", ""]
    for csv_path in csvs:
        df = read_results(csv_path)
        if df.empty:
            continue
        sweeps = list(df.groupby(SWEEP, sort=False))
        sweeps.sort(key=lambda kv: kv[1]["timestamp"].max() if "timestamp" in kv[1] else "", reverse=True)
        for i, (_, sweep) in enumerate(sweeps):
            folder, dataset = csv_path.parent.name, sweep.iloc[0].dataset  # e.g. digits-guided holds digits rows
            title = (f"## {folder}" + ("" if folder == dataset else f" (data set {dataset})")
                     + (f" — sweep {i + 1} of {len(sweeps)}" if len(sweeps) > 1 else ""))
            md += [title, "", f"Source: `{csv_path.relative_to(results_dir).as_posix()}`", ""]
            section = guidance_section if (sweep.guidance != "").any() else sweep_section
            md += section(sweep, csv_path.parent, results_dir, f"_{i + 1}" if len(sweeps) > 1 else "")
        md += training_section(csv_path.parent, results_dir)
    if gpu:
        md += ["## GPU measurements", "", "Figures measured on the device named in the file (not necessarily the "
               "device of the sweeps above).", ""]
        kernels = results_dir / "gpu" / "kernels.json"
        if kernels.exists():
            md += gpu_section(kernels)
        raw = [p for p in gpu if p != kernels]
        if raw:
            md += ["Raw files: " + ", ".join(f"`{p.relative_to(results_dir).as_posix()}`" for p in raw), ""]
    out = results_dir / "report.md"
    write_text(out, "\n".join(md).rstrip() + "\n")
    _remove_stale_figures(md, results_dir, [p.parent for p in csvs])
    log.info("wrote %s", out)
    return out


def _remove_stale_figures(md: list[str], results_dir: Path, folders: list[Path]) -> None:
    """Delete the PNGs in the sweeps' folders that this report does not show (an earlier report's figures)."""
    shown = {(results_dir / m).resolve() for line in md for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", line)}
    for folder in folders:
        for png in folder.glob("*.png"):
            if png.resolve() not in shown:
                png.unlink()
                log.info("removed %s (no longer in the report)", png)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("python -m fastdiff.report", __doc__.splitlines()[0])
    parser.add_argument("results_dir", help="the --out-dir of python -m fastdiff.bench (default there: runs/results)")
    args = parser.parse_args(argv)
    if not Path(args.results_dir).is_dir():
        raise FastdiffError(f"{args.results_dir!r} is not a folder; pass the --out-dir of python -m fastdiff.bench")
    print(f"report: {write_report(args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
