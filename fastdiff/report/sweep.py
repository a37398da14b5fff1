"""The sections of one sweep: FID vs NFE and vs wall-clock, the other metrics, sample grids at equal NFE budgets
and the tables (best FID per budget, FID by sampler and NFE, what each student cost, provenance); a guided sweep's
FID and class accuracy against the guidance weight."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from fastdiff import registry
from fastdiff.report.answer import answer_section
from fastdiff.report.common import _fmt, _save, _styles, is_anchor, md_table
from fastdiff.viz import draw_samples

OTHER_METRICS = ("kid", "kid_teacher", "precision", "recall", "swd")
MAX_GRID_BUDGETS, MAX_TABLE_BUDGETS = 3, 12


def _metric_plot(df: pd.DataFrame, metric: str, x: str, ax, styles, logy: bool) -> None:
    for line, g in df[df.metric == metric].groupby("line"):
        g = g.sort_values("nfe")  # a curve is parametrised by NFE, also when drawn against wall-clock
        ax.plot(g[x], g["value"], label=line, markersize=4, **styles[line])
        bars = g.dropna(subset=["ci_low", "ci_high"])
        if len(bars):  # the row's own 95 % interval (FID rows of fastdiff <= 0.6: on the anchor's scale)
            ax.vlines(bars[x], bars.ci_low.clip(lower=1e-6), bars.ci_high, color=styles[line]["color"], alpha=0.6,
                      linewidth=1.5)
    ax.set_xscale("log")
    values = df.loc[df.metric == metric, "value"]
    if logy and len(values) and values.min() > 0:
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5 * values.min())  # an interval reaching 0 runs off the axis, not to 1e-6
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
    ylabels = {"kid": "KID vs held-out data (lower is better)", "kid_teacher": "KID vs the teacher's samples",
               "precision": "precision (higher is better)",
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
    single = [name for name in fid.sampler.unique() if getattr(registry.find(name), "rows", "") == "full"]
    nfes = sorted(fid.loc[~fid.sampler.isin(single), "nfe"].dropna().astype(int).unique())
    nfes = [n for n in nfes if n & (n - 1) == 0] or nfes  # powers of two: where most curves have a point
    if len(nfes) <= MAX_GRID_BUDGETS:
        return nfes
    return sorted({nfes[0], nfes[len(nfes) // 2], nfes[-1]})


def best_per_line(fid: pd.DataFrame, budget: int) -> pd.DataFrame:
    """For each line, its row with the largest NFE <= budget."""
    within = fid[fid.nfe <= budget].sort_values("nfe")
    return within.groupby("line").tail(1).sort_values("line")


def plot_sample_grid(fid: pd.DataFrame, budget: int, folder: Path, path: Path, metric: str = "FID") -> bool:
    """One panel per line at NFE <= budget (same initial noise in every panel), titled with the rows' `metric`;
    False if no sample file exists."""
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
        draw_samples(ax, x, f"{r.line}\nNFE {int(r.nfe)}, {metric} {r.value:.3g}")
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


def table_budgets(fid: pd.DataFrame) -> list[int]:
    """The NFE budgets of the best-FID table: every NFE of the sweep, or the powers of two and the largest if many."""
    nfes = sorted(fid.nfe.dropna().astype(int).unique())
    if len(nfes) > MAX_TABLE_BUDGETS:
        nfes = sorted({n for n in nfes if n & (n - 1) == 0} | {nfes[-1]})
    return nfes


def best_table(rows: pd.DataFrame, metric: str) -> str:
    out = []
    for budget in table_budgets(rows):
        best = rows[rows.nfe <= budget].sort_values(["value", "nfe", "line"]).iloc[0]
        out.append((budget, best.line, int(best.nfe), int(best.steps), best.value))
    return md_table(("NFE budget", "best sampler (grid)", "its NFE", "its steps", METRIC_NAMES[metric]), out)


METRIC_NAMES = {"fid": "FID", "kid": "KID", "kid_teacher": "KID to the teacher", "precision": "precision",
                "recall": "recall"}


def _cell(r) -> str:
    """A cell: `≈` marks a row whose paired difference to the anchor row is not significant (its 95 % interval holds
    0), `(anchor)` the anchor itself."""
    if is_anchor(r):
        return f"{r.value:.4g} (anchor)"
    return ("≈" if r.diff_low <= 0 <= r.diff_high else "") + f"{r.value:.4g}"


def pivot_table(rows: pd.DataFrame) -> str:
    rows = rows.assign(cell=[_cell(r) for r in rows.itertuples()])
    pivot = rows.pivot_table(index="line", columns="nfe", values="cell", aggfunc="first").fillna("")
    return md_table(["sampler (grid) \\ NFE"] + [str(int(c)) for c in pivot.columns],
                    [[line] + list(vals) for line, vals in zip(pivot.index, pivot.to_numpy())])


def cost_table(rows: pd.DataFrame, metric: str) -> str | None:
    """The distilled students' score beside what each cost to make (cumulative from the teacher; the rows'
    train_* columns), or None when no row records a cost (the teacher's rows, CSVs before fastdiff 0.3)."""
    if "train_updates" not in rows:
        return None
    rows = rows[rows.train_updates.astype(str) != ""].sort_values(["line", "nfe"])
    if rows.empty:
        return None
    return md_table(("student (grid)", "NFE", METRIC_NAMES[metric], "updates", "teacher evaluations",
                     "student passes", "training wall-clock (s)", "trained on"),
                    [(r.line, int(r.nfe), r.value, r.train_updates, r.train_teacher_evals, r.train_student_passes,
                      r.train_wall_clock_s, r.train_device) for r in rows.itertuples()])


def interval_table(df: pd.DataFrame) -> str | None:
    """Every row with an interval: its value, its own 95 % interval and the 95 % interval of its paired difference to
    the anchor row; None when no row has one (CSVs before fastdiff 0.4, --ci-resamples 0)."""
    rows = df[df.metric.isin(list(METRIC_NAMES))].dropna(subset=["diff_low"]).sort_values(["metric", "line", "nfe"])
    if rows.empty:
        return None
    # a FID row's own interval (fastdiff <= 0.6 wrote one, on the anchor's scale) is not shown: see interval_note
    own = lambda r: "—" if pd.isna(r.ci_low) or r.metric == "fid" else f"[{r.ci_low:.4g}, {r.ci_high:.4g}]"  # noqa: E731
    return md_table(("metric", "sampler (grid)", "NFE", "value", "95 % interval", "minus the anchor's: 95 % interval",
                     "differs from the anchor"),
                    [(METRIC_NAMES[r.metric], r.line, int(r.nfe), r.value, own(r),
                      f"[{r.diff_low:.4g}, {r.diff_high:.4g}]",
                      "anchor" if is_anchor(r) else ("no" if r.diff_low <= 0 <= r.diff_high else "yes"))
                     for r in rows.itertuples()])


def interval_note(df: pd.DataFrame) -> str:
    """What the intervals are, from the rows' ci_* columns."""
    with_ci = df[df.metric.isin(list(METRIC_NAMES))].dropna(subset=["diff_low"])
    if with_ci.empty:
        return "No row of this sweep has an interval (a CSV before fastdiff 0.4, or --ci-resamples 0)."
    methods = with_ci.groupby("metric").first()
    parts = [f"{METRIC_NAMES[m]}: {r.ci_method}" + (f", {int(float(r.ci_resamples))} resamples" if "bootstrap" in
                                                    r.ci_method else "")
             for m, r in methods.iterrows()]
    return (f"Intervals (95 %): {'; '.join(parts)}. Every difference is paired over sample indices (the noise of "
            f"sample k is the same in every row) and taken to the anchor row `{with_ci.iloc[0].ci_reference}`, fixed "
            "before the sweep, so the anchor's own sampling variance is in it; `≈` marks a row whose difference to it "
            "is not significant. KID's intervals also carry the reference set's sampling variance; FID's, precision's "
            "and recall's are conditional on the reference set. None covers the teacher's training (see the "
            "teacher-seed spread). No ratio to the anchor is given: it would divide by a random, biased number. "
            "Coverage of each interval, measured by simulation: `python -m fastdiff.coverage` (its table closes this "
            "report when the results folder has one).")


def protocol_note(df: pd.DataFrame) -> str:
    """What the rows are scored against: held out, or (the old protocol) the training split."""
    ref, dataset = df.reference.iloc[0], df.dataset.iloc[0]
    if "-train-" in ref and not dataset.startswith(("cifar10", "folder")):
        return (f"**Old protocol**: these rows are scored against `{ref}`, the training split the teacher and the "
                "feature network were trained on (fastdiff ≤ 0.6): a model that memorises scores well there. New "
                "sweeps score against the held-out test split.")
    if "-train-" in ref:
        return (f"Reference `{ref}`: the training split, as the published {dataset} numbers use it (the papers' "
                "convention), not held out.")
    return f"Reference `{ref}`: held out from everything trained (teacher, students, feature network)."


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
    scored = df.dropna(subset=["value", "nfe"])
    scored = scored.assign(is_anchor=[is_anchor(r) for r in scored.itertuples()])
    fid, kid = scored[scored.metric == "fid"], scored[scored.metric == "kid"]
    primary, main = ("kid", kid) if len(kid) else ("fid", fid)
    styles = _styles(df.line.unique())
    rel = lambda p: p.relative_to(results_dir).as_posix()  # noqa: E731
    md = [protocol_note(df), ""]
    if main.empty:
        md.append("No FID or KID rows in this sweep.")
    else:
        if len(fid):
            nfe_png, wall_png = folder / f"fid_vs_nfe{tag}.png", folder / f"fid_vs_wallclock{tag}.png"
            plot_fid(fid, "nfe", "NFE (network evaluations per sample, log scale)", nfe_png, styles)
            timed = fid.assign(ms_per_sample=1000 * fid.wall_clock_s_total / fid.n_samples)
            devices = ", ".join(sorted(fid.device.unique()))
            plot_fid(timed, "ms_per_sample", f"wall-clock per sample (ms, log scale; sampling only, on {devices})",
                     wall_png, styles)
            md += [f"![FID vs NFE]({rel(nfe_png)})", "", f"![FID vs wall-clock]({rel(wall_png)})", "",
                   "Wall-clock is the sampling time of all batches divided by the number of samples (noise drawing and "
                   "scoring excluded), measured in the same run on the device listed below.", ""]
        md += [f"**Best {METRIC_NAMES[primary]} within an NFE budget**", "", best_table(main, primary), ""]
        for metric, title in (("kid", "KID against the held-out reference (unbiased; the primary distance)"),
                              ("kid_teacher", "KID against the teacher's own samples (fidelity to the teacher)"),
                              ("fid", "FID (raw: biased upward by a small-sample term)")):
            rows = scored[scored.metric == metric]
            if len(rows):
                md += [f"**{title}, by sampler and NFE**", "", pivot_table(rows), ""]
        md += [interval_note(df), ""]
        md += answer_section(scored[scored.metric == "kid_teacher"], folder, results_dir, tag)
        intervals = interval_table(scored)
        if intervals:
            md += ["<details><summary>Every row with its 95 % intervals</summary>", "", intervals, "", "</details>",
                   ""]
        costs = cost_table(main, primary)
        if costs:
            md += ["**What each student cost to make** (cumulative from the teacher, whose own training is not "
                   "counted; teacher evaluations and student passes per example)", "", costs, ""]
    other_png = folder / f"metrics_vs_nfe{tag}.png"
    if plot_other_metrics(df, other_png, styles):
        md += [f"![Other metrics vs NFE]({rel(other_png)})", ""]
    for stale in folder.glob(f"samples_nfe*{tag}.png"):  # grids of budgets an earlier report chose
        stale.unlink()
    if not main.empty:
        for budget in grid_budgets(main):
            png = folder / f"samples_nfe{budget}{tag}.png"
            if plot_sample_grid(main, budget, folder, png, METRIC_NAMES[primary]):
                md += [f"![Samples at NFE <= {budget}]({rel(png)})", ""]
    md += ["**Provenance**", "", provenance_table(df), ""]
    return md


GUIDANCE_STEPS = (1, 2, 4, 8, 32)  # step counts drawn in the guidance trade-off plot (the table has all)


def guidance_section(df: pd.DataFrame, folder: Path, results_dir: Path, tag: str) -> list[str]:
    """A classifier-free-guidance sweep: FID and the accuracy on the asked-for class (or, text-conditioned, the digit
    the prompt names) against w per (sampler, steps), and a table."""
    g = df.assign(w=pd.to_numeric(df.guidance))
    png = folder / f"guidance_tradeoff{tag}.png"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    text = (g.metric == "prompt_accuracy").any()
    acc, acc_label = (("prompt_accuracy", "prompt accuracy") if text else ("class_accuracy", "class accuracy"))
    panels = [("fid", "FID (lower is better)"), (acc, f"{acc_label} of the samples (higher is better)")]
    for ax, (metric, ylabel) in zip(axes, panels):
        sub = g[(g.metric == metric) & g.steps.isin(GUIDANCE_STEPS)]
        students = set(sub.line[sub.sampler.isin(registry.student_samplers())])
        for (line, steps), grp in sub.groupby(["line", "steps"], sort=True):
            grp = grp.sort_values("w")
            student = line in students
            ax.plot(grp.w, grp.value, marker="o" if student else "x", linestyle="-" if student else "--",
                    label=f"{line}: {int(steps)} steps")
        ax.set_xlabel("guidance weight w (0 = unconditional, 1 = conditional, > 1 guided)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("FID (log scale, lower is better)")
    axes[0].legend(fontsize=7, loc="best")
    asks = ("sample k's prompt, a held-out paraphrase, names digit k mod 10" if text
            else "sample k asks for class k mod 10")
    fig.suptitle(f"{df.iloc[0].dataset}: classifier-free guidance trade-off, {int(df.iloc[0].n_samples)} samples, "
                 f"{asks}")
    fig.tight_layout()
    _save(fig, png)
    wide = g[g.metric.isin(["fid", acc])].pivot_table(index=["line", "steps", "w"], columns="metric",
                                                      values="value", aggfunc="first").reset_index()
    rows = [[r.line, int(r.steps), f"{r.w:g}", _fmt(r.fid), _fmt(getattr(r, acc, float("nan")))]
            for r in wide.sort_values(["line", "steps", "w"]).itertuples()]
    return [protocol_note(df), "", f"![Guidance trade-off]({png.relative_to(results_dir).as_posix()})", "",
            "The teacher is guided through the sampler (one batched forward for the conditional and unconditional "
            "outputs); the distilled students take w as an input (Meng et al. 2023; the consistency student as in "
            "LCM, Luo et al. 2023).", "",
            md_table(["sampler", "steps", "w", "FID", acc_label], rows), "",
            "**Provenance**", "", provenance_table(df), ""]
