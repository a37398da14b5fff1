"""The README's result paragraphs, written from the results CSVs only: `python -m fastdiff.report RESULTS --readme
README.md` rewrites every block between `<!-- results: NAME -->` and `<!-- /results -->` with the summary of
RESULTS/NAME/fid_vs_steps.csv (its latest sweep). No number in those blocks is typed by hand, and
tests/test_readme_results.py fails when the README and the committed CSVs disagree."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from fastdiff.errors import FastdiffError
from fastdiff.io import write_text
from fastdiff.report.answer import answer_lines
from fastdiff import registry
from fastdiff.report.common import SWEEP, is_anchor, md_table, read_results
from fastdiff.report.sweep import protocol_note
from fastdiff.results import AUTOENCODER_INFO, CSV_NAME

BLOCK = re.compile(r"(<!-- results: ([\w./-]+) -->\n).*?(<!-- /results -->)", re.S)  # NAME: a folder under RESULTS


def summary_samplers() -> tuple[str, ...]:
    """The lines of the summary table, in this order, where the sweep has them (the registry's `summary` ranks;
    --full adds the others to the report)."""
    ranked = [(e.summary, n) for n in registry.sampler_names() if (e := registry.sampler(n)).summary is not None]
    return tuple(n for _, n in sorted(ranked))


def students() -> dict[str, str]:
    """{student sampler: how the summary names its students}."""
    return {n: registry.sampler(n).student_label or n for n in registry.student_samplers()}


def latest_sweep(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the most recent sweep in a results CSV (one teacher, extractor, reference, n, seed, clip)."""
    sweeps = sorted(df.groupby(SWEEP, sort=False), key=lambda kv: kv[1]["timestamp"].max())
    return sweeps[-1][1]


def _cell(r) -> str:
    mark = "≈" if r.diff_low <= 0 <= r.diff_high and not r.is_anchor else ""
    return mark + f"{r.value:.3g}" + (" (anchor)" if r.is_anchor else "")


def summary(csv_path: Path, name: str) -> str:
    """The Markdown summary of one results folder's latest sweep: its primary distance (KID against the held-out
    reference where the sweep has it, else FID) by NFE for the main samplers with the significance marks of the
    paired differences to the anchor, the teacher's best, each student's level and difference with intervals, and the
    answer (NFE to reach the teacher, with the family's margin)."""
    if not Path(csv_path).exists() and (Path(csv_path).parent / DEMO_METRICS).exists():
        return personalize_summary(Path(csv_path).parent, name)
    df = latest_sweep(read_results(csv_path))
    if (df.guidance != "").any():
        return guided_summary(df, csv_path, name)
    scored = df.dropna(subset=["value", "nfe"])
    scored = scored.assign(is_anchor=[is_anchor(r) for r in scored.itertuples()])
    metric = "kid" if (scored.metric == "kid").any() else "fid"
    shown = summary_samplers()
    main = scored[(scored.metric == metric) & scored.sampler.isin(shown)]
    if main.empty:
        raise FastdiffError(f"{csv_path} has no FID or KID rows of {', '.join(shown)}")
    label = {"kid": "KID", "fid": "FID"}[metric]
    order = {s: i for i, s in enumerate(shown)}
    lines = sorted(main.line.unique(), key=lambda ln: order[main[main.line == ln].sampler.iloc[0]])
    nfes = sorted(main.nfe.astype(int).unique())
    cells = {(r.line, int(r.nfe)): _cell(r) for r in main.itertuples()}
    table = md_table(["NFE"] + lines, [[n] + [cells.get((ln, n), "—") for ln in lines] for n in nfes])
    teacher = scored[(scored.metric == metric) & ~scored.sampler.isin(list(students()))]
    best = teacher.loc[teacher.value.idxmin()]
    text = [_source(df, name), "", protocol_note(df), "", f"{label} by NFE:", "", table, ""]
    anchor = main[main.is_anchor]
    if len(anchor):
        text += [f"≈: not significantly different from the anchor row `{anchor.iloc[0].ci_reference}` ({label} "
                 f"{anchor.iloc[0].value:.3g}; {main.dropna(subset=['diff_low']).iloc[0].ci_method}). The teacher's best "
                 f"{label} at any step count: {best.value:.3g} ({best.line}, {int(best.nfe)} NFE).", ""]
    teacher_kid = scored[scored.metric == "kid_teacher"].set_index(["line", "nfe"])
    for sampler, who in students().items():
        rows = main[(main.sampler == sampler) & main.nfe.isin([1, 2, 4])].sort_values("nfe")
        parts = []
        for r in rows.itertuples():
            own = "" if pd.isna(r.ci_low) or metric == "fid" else f" [{r.ci_low:.3g}, {r.ci_high:.3g}]"
            diff = ("" if pd.isna(r.diff_low) else
                    f", minus the anchor's {r.value - anchor.iloc[0].value:.3g} [{r.diff_low:.3g}, {r.diff_high:.3g}]"
                    if len(anchor) else "")
            fidelity = ("" if (r.line, r.nfe) not in teacher_kid.index else
                        f", KID to the teacher {teacher_kid.loc[(r.line, r.nfe)].value:.3g}")
            parts.append(f"{int(r.nfe)} NFE: {label} {r.value:.3g}{own}{diff}{fidelity}")
        if parts:
            cost = rows.iloc[-1]
            spent = ("" if not str(cost.get("train_updates", "")) else
                     f" (the {int(cost.nfe)}-NFE one cost {cost.train_updates} updates from the teacher)")
            text += [f"The {who}: " + "; ".join(parts) + spent + ".", ""]
    text += answer_lines(scored[scored.metric == "kid_teacher"], Path(csv_path).parent)
    text += equal_cost(Path(csv_path).parent)
    return "\n".join(text).rstrip() + "\n"


def _source(df: pd.DataFrame, name: str) -> str:
    first = df.iloc[0]
    commits = ", ".join(sorted({c[:7] + ("+dirty" if c.endswith("+dirty") else "") for c in df.fastdiff_commit}))
    return (f"From `results/{name}/{CSV_NAME}` (latest sweep: {int(first.n_samples)} samples per row, "
            f"{first.extractor} features vs {first.reference}, seed {int(first.seed)}, device "
            f"{', '.join(sorted(df.device.unique()))}, commit {commits}); written by `python -m fastdiff.report "
            "results --readme README.md`.")


def guided_summary(df: pd.DataFrame, csv_path: Path, name: str) -> str:
    """A guidance sweep's summary: per sampler line and NFE, FID and the accuracy on the asked-for digit at each w."""
    acc = "prompt_accuracy" if (df.metric == "prompt_accuracy").any() else "class_accuracy"
    g = df[df.metric.isin(["fid", acc]) & (df.guidance != "")].dropna(subset=["value", "nfe"])
    g = g.assign(w=g.guidance.astype(float))
    wide = g.pivot_table(index=["line", "sampler", "nfe", "w"], columns="metric", values="value",
                         aggfunc="first").reset_index()
    ws = sorted(wide.w.unique())
    order = {s: i for i, s in enumerate(summary_samplers())}
    keys = sorted({(r.line, r.sampler, int(r.nfe)) for r in wide.itertuples()}, key=lambda k: (order.get(k[1], 99),
                                                                                                k[0], k[2]))
    cells = {(r.line, int(r.nfe), r.w): f"{getattr(r, 'fid', float('nan')):.3g} / {getattr(r, acc, float('nan')):.2f}"
             for r in wide.itertuples()}
    table = md_table(["sampler", "NFE"] + [f"w = {w:g}" for w in ws],
                     [[line, nfe] + [cells.get((line, nfe, w), "—") for w in ws] for line, _, nfe in keys])
    what = ("the digit the prompt (a held-out paraphrase) names" if acc == "prompt_accuracy"
            else "the class each sample asks for")
    text = [_source(df, name), "", protocol_note(df), "", table, "",
            f"Cells: FID / accuracy of the project's digit classifier on {what} (chance 0.1); w: fastdiff's "
            "guidance weight (0 unconditional, 1 conditional).", ""]
    text += equal_cost(Path(csv_path).parent)
    text += autoencoder_floor(Path(csv_path).parent) + beside_pixel(wide, Path(csv_path).parent, acc)
    return "\n".join(text).rstrip() + "\n"


def autoencoder_floor(folder: Path) -> list[str]:
    """A latent family's autoencoder and its reconstruction floor (autoencoder.json beside the sweep); [] without."""
    if not (folder / AUTOENCODER_INFO).exists():
        return []
    a = json.loads((folder / AUTOENCODER_INFO).read_text())
    dims = lambda shape: "x".join(map(str, shape))  # noqa: E731
    return [f"Latent space: every sample is decoded by the autoencoder `{a['id']}` before scoring (column "
            f"`autoencoder`; `python -m fastdiff.autoencoder`, {a['parameters']:,} parameters, {dims(a['image_shape'])} "
            f"images to {dims(a['latent_shape'])} latents, scaling factor {a['scaling_factor']:.4g} = 1/std of the "
            f"training latents). Its reconstruction floor: FID {a['recon_fid']:.3g} for the reconstructions of "
            f"{a['eval_images']} held-out images against {a['data_fid']:.3g} for the images themselves (same features "
            "and reference).", ""]


def beside_pixel(wide: pd.DataFrame, folder: Path, acc: str) -> list[str]:
    """A latent family (`<data>-latent`) beside its pixel-space twin (`<data>-text`, same protocol): the teacher's
    DDIM at its most steps and the students at 4 NFE, FID / accuracy per w; [] when the twin is not there."""
    twin = folder.parent / folder.name.replace("-latent", "-text")
    if not folder.name.endswith("-latent") or not (twin / CSV_NAME).exists():
        return []
    other = latest_sweep(read_results(twin / CSV_NAME))
    other = other[other.metric.isin(["fid", acc]) & (other.guidance != "")].dropna(subset=["value", "nfe"])
    other = other.assign(w=other.guidance.astype(float)).pivot_table(
        index=["line", "sampler", "nfe", "w"], columns="metric", values="value", aggfunc="first").reset_index()
    ws = sorted(wide.w.unique())
    rows = []
    present = set(wide.sampler) | set(other.sampler)
    for sampler, label in (("ddim", "teacher, DDIM"),
                           *((n, registry.sampler(n).short or n) for n in registry.student_samplers() if n in present)):
        for space, table in (("latent", wide), ("pixel", other)):
            t = table[table.sampler == sampler]
            nfe = int(t.nfe.max()) if sampler == "ddim" else 4
            t = t[t.nfe == nfe].set_index("w")
            rows.append([f"{label} ({space})", nfe] + [f"{t.fid[w]:.3g} / {t[acc][w]:.2f}" if w in t.index else "—"
                                                       for w in ws])
    return [f"Beside the pixel-space model of `results/{twin.name}` (same data, prompts, protocol and sample count):",
            "", md_table(["model", "NFE"] + [f"w = {w:g}" for w in ws], rows), ""]


DEMO_METRICS = "metrics.json"  # python -m fastdiff.personalize_demo's results (a folder without a sweep CSV)


def personalize_summary(folder: Path, name: str) -> str:
    """The personalisation and control demonstration (`python -m fastdiff.personalize_demo`) from its metrics.json."""
    m = json.loads((folder / DEMO_METRICS).read_text())
    prov, pers = m["provenance"], m["personalisation"]
    text = [f"From `results/{name}/{DEMO_METRICS}` (teacher `{prov['teacher_hash']}`, 4-step student "
            f"`{prov['student_hash']}`, w = {prov['guidance_w']:g}, seed {prov['seed']}, device {prov['device']}, "
            f"commit {prov['fastdiff_commit'][:7]}, {prov['wall_clock_s']:.0f} s); written by `python -m "
            "fastdiff.report results --readme README.md`.", ""]
    rows = []
    for style in ("mirror", "heavy"):
        e = pers[style]
        for label, key in (("base teacher", "base_a_seven"), ("textual inversion", "textual-inversion"),
                           ("DreamBooth", "dreambooth")):
            c = e[key]
            prompt = c.get("prompt", "a seven")
            rows.append([f"{style} ({e['subject']['n']} sevens, ink {e['subject']['ink']:.3f})", label, f"`{prompt}`",
                         f"{c['accuracy_7']:.2f}", f"{c['accuracy_7_style_undone']:.2f}", f"{c['ink']:.3f}",
                         f"{c['feature_distance_to_subject']:.3f}"])
    text += ["Subjects: 20 training sevens mirrored, and the 20 with the most ink; 64 samples per prompt (DDIM 32 "
             "steps). Read as 7 once undone: mirrored back (for the heavy subject, as they are):", "",
             md_table(["subject", "model", "prompt", "read as 7", "read as 7 once undone", "ink",
                       "feature distance to subject"], rows), ""]
    for style in ("mirror", "heavy"):
        ti, db = pers[style]["textual-inversion"], pers[style]["dreambooth"]
        read = ", ".join(f"{d}: {k}" for d, k in sorted(ti["digits_read"].items(), key=lambda kv: -kv[1])[:3])
        text += [f"{style}: textual inversion's samples read (style undone) as {read} (of 64). DreamBooth's prior "
                 f"preservation: `a seven` read as 7 {db['a_seven_accuracy_7_before']:.2f} before, "
                 f"{db['a_seven_accuracy_7_after']:.2f} after (read as 7 once undone: "
                 f"{db['a_seven_after']['accuracy_7_style_undone']:.2f}, ink {db['a_seven_after']['ink']:.3f}); "
                 f"accuracy on 200 held-out prompts of every digit {db['prompt_accuracy_before']:.2f} before, "
                 f"{db['prompt_accuracy_after']:.2f} after.", ""]
    for key in ("inversion_erased", "inversion_none", "inversion_invert"):
        text += _inversion(pers[key]) if key in pers else []
    noise = m["noise_optimisation"]
    text += ["Noise optimisation towards the digit 3 (loss −log p(3) of the project's classifier; 16 samples of "
             "`the digit 8`, Adam on x_T through the whole sampler):", "",
             md_table(["sampler", "NFE", "loss before → after", "read as 3 before → after",
                       "s per iteration per image"],
                      [[k, v["nfe"], f"{v['loss_before']:.2f} → {v['loss_after']:.2f}",
                        f"{v['accuracy_3_before']:.2f} → {v['accuracy_3_after']:.2f}",
                        f"{v['seconds_per_iteration_per_image']:.3g}"] for k, v in noise.items()]), "",
             f"({next(iter(noise.values()))['iterations']} iterations each; the loss after every iteration is in "
             "`loss_vs_iterations.csv`.)", ""]
    ctl, rows, weights = m["attention_control"], [], []
    for k, v in ctl.items():
        rows.append([k, "— (target alone)", 0, f"{v['target_own_distance']:.3f}", "0", f"{v['target_own_accuracy_1']:.2f}"])
        rows += [[k, tau, e["inject_steps"], f"{e['distance_to_source']:.3f}", f"{e['distance_to_target_alone']:.3f}",
                  f"{e['accuracy_1']:.2f}"] for tau, e in v["tau"].items()]
        weights += [[k, w, f"{e['accuracy_7']:.2f}", f"{e['ink']:.3f}", f"{e['distance_to_source']:.3f}"]
                    for w, e in v["reweight"].items()]
    text += ["Prompt-to-prompt word swap `a bold seven` → `a bold one` (32 samples; distances: mean |a − b| per pixel, "
             "images in [-1, 1]):", "",
             md_table(["model", "τ", "steps injected", "distance to source", "distance to target alone", "read as 1"],
                      rows), "",
             "Re-weighting one word of `a bold seven` (its cross-attention maps times the scale):", "",
             md_table(["model", "word × scale", "read as 7", "ink", "distance to unweighted"], weights), ""]
    return "\n".join(text).rstrip() + "\n"


def _inversion(u: dict) -> list[str]:
    """Lines of one textual-inversion demonstration on a teacher that has the pieces but no prompt for the subject."""
    erased = "cosine_to_original_rows" in u
    what = {"none": ("sevens", "its sevens trained only the null condition, no word names them", "read as 7")
            if not erased else ("sevens", "the digits-text teacher with its rows for `seven` and `7` replaced by fresh "
                                "random vectors: the network still draws sevens, no prompt asks for them",
                                "read as 7"),
            "invert": ("inverted sevens", "it learned `dark` (contrast-inverted) on every digit but 7",
                       "inverted and read as 7 once inverted back")}[u["style"]]
    rows = [["base teacher", f"best of the {u['base_prompts']} prompts for it: `{u['base_best_prompt']}`",
             f"{u['base_best_rate']:.2f} (mean {u['base_mean_rate']:.2f})", "—"],
            ["base teacher", "unconditional (w = 0)", f"{u['unconditional']['subject_rate']:.2f}", "—"]]
    if "control_a_dark_three" in u:
        rows.append(["base teacher", "`a dark three` (seen in training; inverted and read as 3)",
                     f"{u['control_a_dark_three']['subject_rate']:.2f}", "—"])
    rows += [["textual inversion", f"`{p}`", f"{v['subject_rate']:.2f}", f"{v['feature_distance_to_subject']:.3f}"]
             for p, v in u["learned"].items()]
    cosine = []
    if erased:
        top = sorted(u["cosine_to_original_rows"].items(), key=lambda kv: -kv[1])[:3]
        cosine = [f"The learned vector, started from the erased `seven` row (cosine to the original `seven` "
                  f"{u['cosine_of_start_to_original_rows']['seven']:.2f}, to `7` "
                  f"{u['cosine_of_start_to_original_rows']['7']:.2f}), ends closest to the original rows of "
                  + ", ".join(f"`{w}` ({c:.2f})" for w, c in top) + " among the 20 digit words and numerals.", ""]
    path = Path(u["teacher"])
    teacher = "digits-text, words erased" if erased else (path.parent.name if path.suffix == ".pt" else path.name)
    return [f"Textual inversion of {what[0]} (teacher `{teacher}` `{u['teacher_hash']}`: {what[1]}; "
            f"`<s*>` learned from {u['subject']['n']} training images in {u['updates']} updates, {u['seconds']:.0f} s; "
            f"{u['samples']} samples per prompt, DDIM 32 steps, w = 2; subject rate = {what[2]}; prompts without `<s*>` give the "
            f"base teacher's samples bit for bit: {str(u['other_prompts_unchanged']).lower()}):", "",
            md_table(["model", "prompt", "subject rate", "feature distance to subject"], rows), ""] + cosine


def equal_cost(folder: Path) -> list[str]:
    """The run's methods at equal cost where the first method saved a student (a PD round's end) and the others
    snapshot: at the same forward-equivalents (within 2 %: updates are whole) where the points carry them, else at
    the same optimiser updates; from the training points beside the sweep (the round metric on the round's samples);
    [] with fewer than two methods."""
    from fastdiff.report.training import methods_in_order, training_points

    points = training_points(folder)
    if points is None or len(methods_in_order(points)) < 2:
        return []
    first, *others = methods_in_order(points)
    with_fe = bool(points.forward_equivalents.notna().all())
    short = dict(zip(points.method, points.short))
    ref = points[points.method == first]
    parts = []
    for nfe in (1, 2, 4):
        p = ref[ref.nfe == nfe]
        if not len(p):
            continue
        p = p.iloc[0]
        here = points[points.nfe == nfe]
        same = {m: here[(here.method == m) & (((here.forward_equivalents - p.forward_equivalents).abs()
                                               <= 0.02 * p.forward_equivalents) if with_fe
                                              else (here.updates == p.updates))] for m in others}
        same = {m: c for m, c in same.items() if len(c)}
        if same:
            at = (f"{p.forward_equivalents:.3g} forward-equivalents ({short[first]}: {int(p.updates)} updates)"
                  if with_fe else f"{int(p.updates)} updates")
            parts.append(f"{nfe} NFE at {at}: {short[first]} {p.fid:.3g}, "
                         + ", ".join(f"{short[m]} {c.fid.iloc[0]:.3g}" for m, c in same.items()))
    if not parts:
        return []
    unit = ("forward-equivalents of the same batch (a backward = 2 forwards, every network), cumulative from the "
            "teacher" if with_fe else "optimiser updates of the same batch, cumulative from the teacher")
    text = f"At equal cost ({unit}; the run's own evaluation, {points.metric.iloc[0]}): " + "; ".join(parts) + "."
    for m in others:
        mine = points[points.method == m]
        best = mine.loc[mine.groupby("nfe").fid.idxmin()]
        text += (f" {short[m]}'s best over its run: " + ", ".join(
            f"{r.fid:.3g} at {int(r.nfe)} NFE ({int(r.updates)} updates)" for r in best.itertuples())
            + f"; it ran {int(mine.updates.max())} updates.")
    return [text, ""]


def update_readme(readme: Path, results_dir: Path) -> list[str]:
    """Rewrite every results block of `readme` from `results_dir`; -> the names rewritten. FastdiffError for a
    block naming a folder without a results CSV."""
    text = Path(readme).read_text()

    def fill(m: re.Match) -> str:
        csv_path = Path(results_dir) / m.group(2) / CSV_NAME
        if not csv_path.exists() and not (csv_path.parent / DEMO_METRICS).exists():
            raise FastdiffError(f"{readme} has a results block for {m.group(2)!r} but {csv_path} does not exist")
        return m.group(1) + summary(csv_path, m.group(2)) + m.group(3)

    names = [m.group(2) for m in BLOCK.finditer(text)]
    write_text(Path(readme), BLOCK.sub(fill, text))
    return names


def readme_blocks(readme: Path) -> dict[str, str]:
    """{name: the block's text as the README holds it}."""
    return {m.group(2): m.group(0)[len(m.group(1)):-len(m.group(3))] for m in BLOCK.finditer(Path(readme).read_text())}
