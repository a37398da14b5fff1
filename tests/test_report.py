"""The report: from a small synthetic CSV (+ npz samples, + a GPU JSON) to report.md and PNGs, without torch."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from fastdiff.errors import run_cli
from fastdiff.report import main

LINES = [("ddim", "quadratic", "0.0", ""), ("ddpm-strided", "linspace", "", "large"), ("dpm++2m", "logsnr", "0.0", ""),
         ("distilled", "student", "0.0", "")]


def synthetic_results(root, images: bool):
    """A bench-like CSV: 4 lines x NFE 1, 2, 4, 8 with FID, KID and precision, and a sample file per row."""
    dataset = "digits" if images else "toy2d"
    folder = root / dataset
    (folder / "samples").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for k, (sampler, grid, eta, variance) in enumerate(LINES):
        for nfe in (1, 2, 4, 8):
            samples_file = f"samples/{sampler}_{nfe}.npz"
            x = rng.integers(0, 256, (16, 1, 8, 8), dtype=np.uint8) if images else rng.normal(size=(300, 2))
            np.savez(folder / samples_file, samples=x.astype(np.uint8 if images else np.float32))
            base = {"dataset": dataset, "model_hash": f"h{k}", "teacher_hash": "teach", "sampler": sampler,
                    "grid": grid, "eta": eta, "variance": variance, "clip": "true", "guidance": "",
                    "steps": nfe, "nfe": nfe, "n_samples": 100, "seed": 0, "extractor": "classifier-digits-abc",
                    "extractor_accuracy": 0.97, "reference": f"{dataset}-train-n1437", "batch_size": 50,
                    "wall_clock_s_per_batch": 0.01 * nfe, "wall_clock_s_total": 0.02 * nfe, "device": "cpu",
                    "torch_version": "2.x", "torch_fidelity_version": "0.4.0", "fastdiff_version": "0.1.0",
                    "fastdiff_commit": "abc123", "samples_file": samples_file, "timestamp": "2025-01-01T00:00:00"}
            for metric, value in (("fid", 100.0 / nfe + k), ("kid", 0.1 / nfe), ("precision", 0.1 * k)):
                rows.append({**base, "metric": metric, "value": value})
    pd.DataFrame(rows).to_csv(folder / "fid_vs_steps.csv", index=False)


def test_report_from_csv_npz_and_gpu_json_without_torch(tmp_path):
    synthetic_results(tmp_path, images=True)
    synthetic_results(tmp_path, images=False)
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "kernels.json").write_text(json.dumps({
        "device": "NVIDIA H100 80GB HBM3", "versions": {"torch": "2.x"},
        "sampler_step": [{"size": "16M", "dtype": "float32", "triton": {"ms": 0.21, "gbps": 2900.0}}],
        "targets": {"speedup": {"values": {"16M": 3.2}, "bound": 3.0, "met": True}}}))
    (tmp_path / "coverage.md").write_text("Coverage of fastdiff's intervals\n\n| KID of the row | 96.1% |\n")
    code = ("import sys; from fastdiff.report import write_report; write_report(sys.argv[1]); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    report = (tmp_path / "report.md").read_text()
    for dataset in ("digits", "toy2d"):
        for png in ("fid_vs_nfe.png", "fid_vs_wallclock.png", "metrics_vs_nfe.png", "samples_nfe1.png",
                    "samples_nfe8.png"):
            assert (tmp_path / dataset / png).stat().st_size > 1000
            assert f"]({dataset}/{png})" in report
    # Best KID (the primary distance when a sweep has it) within each budget: every line has 0.1/nfe, ties go to the
    # smaller NFE, then the line's name; the FID table beside it (line k adds k to 100/nfe)
    assert "| 8 | ddim (quadratic, η=0) | 8 | 8 | 0.0125 |" in report
    assert "| ddpm-strided (linspace, large var.) | 101 | 51 | 26 | 13.5 |" in report
    assert "**Old protocol**: these rows are scored against `digits-train-n1437`" in report
    assert "distilled students (own N-step grid)" in report and "0.97" in report and "abc123" in report
    assert "NVIDIA H100 80GB HBM3" in report and "| 16M | float32 | 0.21 | 2900 |" in report
    assert "## Coverage of the intervals\n\nCoverage of fastdiff's intervals\n\n| KID of the row | 96.1% |" in report


def test_report_bad_input_exit_2(tmp_path, capsys):
    assert run_cli(main, [str(tmp_path / "missing")]) == 2
    assert run_cli(main, [str(tmp_path)]) == 2
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "fid_vs_steps.csv").write_text("a,b\n1,2\n")
    assert run_cli(main, [str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert not (tmp_path / "report.md").exists()


@pytest.mark.parametrize("eta,variance,label", [("1.0", "", "ddim-eta1 (quadratic, η=1)"),
                                                ("", "small", "ddpm-strided (quadratic, small var.)")])
def test_line_labels(eta, variance, label):
    from fastdiff.report import line_label

    sampler = "ddim-eta1" if eta else "ddpm-strided"
    assert line_label(sampler, "quadratic", eta, variance) == label


def test_the_commit_in_the_provenance_says_when_the_code_was_not_committed(tmp_path):
    import importlib.util
    import shutil

    from fastdiff import results

    pkg = tmp_path / "fastdiff"
    pkg.mkdir()
    shutil.copy(results.__file__, pkg / "results.py")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"]):
        subprocess.run(git + args, check=True)
    spec = importlib.util.spec_from_file_location("results_copy", pkg / "results.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert copy.git_commit() == head
    (tmp_path / "notes.txt").write_text("untracked, outside the package")
    assert copy.git_commit() == head
    with open(pkg / "results.py", "a") as f:
        f.write("# edited\n")
    assert copy.git_commit() == head + "+dirty"


def test_a_results_csv_of_an_earlier_version_still_reads(tmp_path):
    """Before 0.2 the grid column was called `spacing`."""
    from fastdiff.report import read_results

    synthetic_results(tmp_path, images=False)
    path = tmp_path / "toy2d" / "fid_vs_steps.csv"
    new = read_results(path)
    pd.read_csv(path, dtype=str, keep_default_na=False).rename(columns={"grid": "spacing"}).to_csv(path, index=False)
    old = read_results(path)
    assert list(old["grid"]) == list(new["grid"]) and list(old["line"]) == list(new["line"])


def test_a_results_csv_from_before_the_cost_columns_is_read_and_extended(tmp_path):
    """CSVs of fastdiff 0.2 lack the train_* columns, those of 0.3 the ci_* ones, those of 0.4 `autoencoder`, those
    of 0.5 `cuda_graph`: the sweep reads them (empty) and writes them back extended."""
    import csv as _csv

    from fastdiff.results import CI_COLUMNS, COLUMNS, COST_COLUMNS, LATENT_COLUMNS, RUNTIME_COLUMNS, ResultsCSV

    later = [COST_COLUMNS + CI_COLUMNS + LATENT_COLUMNS + RUNTIME_COLUMNS, CI_COLUMNS + LATENT_COLUMNS + RUNTIME_COLUMNS,
             LATENT_COLUMNS + RUNTIME_COLUMNS, RUNTIME_COLUMNS]
    for i, missing in enumerate(later):
        old = [c for c in COLUMNS if c not in missing]
        path = tmp_path / f"{i}" / "fid_vs_steps.csv"
        path.parent.mkdir()
        with open(path, "w", newline="") as f:
            w = _csv.DictWriter(f, old)
            w.writeheader()
            w.writerow({c: "x" for c in old})
        results = ResultsCSV(path)
        assert results.rows[0]["ci_low"] == ("x" if i >= 2 else "") and results.has(results.rows[0])
        assert results.rows[0]["autoencoder"] == ("x" if i == 3 else "")
        assert results.rows[0]["train_updates"] == ("" if i == 0 else "x")
        assert results.rows[0]["cuda_graph"] == ""
        results.add([{c: "y" for c in COLUMNS}])
        with open(path, newline="") as f:
            reader = _csv.DictReader(f)
            assert reader.fieldnames == COLUMNS and len(list(reader)) == 2


def test_holm_rejects_step_down():
    from fastdiff.report.answer import holm

    assert list(holm(np.array([0.01, 0.04, 0.03, 0.2]))) == [True, False, False, False]  # 0.03 > 0.05/3
    assert list(holm(np.array([0.001, 0.02, 0.012, 0.2]))) == [True, True, True, False]  # 0.0125, 0.0167, 0.025


def test_nfe_to_the_teacher_is_a_non_inferiority_decision_under_holm_and_the_speedup_is_conservative():
    """`gap`: a row's KID to the teacher's own samples, sd from its 95 % interval; delta: the margin."""
    from fastdiff.report.answer import Z95, decisions, reached, samples_to_resolve, speedup

    rows = [{"line": "anchor", "sampler": "ddim", "nfe": 64, "gap": 0.0, "sd": 0.0, "is_anchor": True}]
    for line, sampler, pts in [("dpm", "dpm++2m", [(4, 3.0, 0.2), (8, 0.5, 0.1), (16, 0.0, 0.1)]),
                               ("pd", "distilled", [(1, 1.1, 0.2), (2, 0.2, 0.1), (4, 0.05, 0.05)])]:
        rows += [{"line": line, "sampler": sampler, "nfe": nfe, "gap": gap, "sd": sd, "is_anchor": False}
                 for nfe, gap, sd in pts]
    df = pd.DataFrame(rows)
    df = df.assign(ci_low=df.gap - Z95 * df.sd, ci_high=df.gap + Z95 * df.sd, ms=df.nfe * 0.5)
    decided = decisions(df, 1.0)
    assert "anchor" not in set(decided.line)
    table = reached(decided).set_index("line")
    # established within delta = 1: dpm at 8 (z = 5), pd at 2 (z = 8); pd at 1 NFE (gap 1.1 +- 0.2) is neither
    # established within nor established worse: its optimistic NFE
    assert (table.loc["dpm", "nfe"], table.loc["pd", "nfe"]) == (8, 2)
    assert (table.loc["dpm", "nfe_optimistic"], table.loc["pd", "nfe_optimistic"]) == (8, 1)
    assert table.loc["dpm", "ms"] == pytest.approx(4.0)
    assert speedup(table.reset_index()) == (4.0, 4.0, 8.0, "pd", "dpm")
    # a margin nothing reaches: no speed-up, and the n at which the closest row would be established
    strict = decisions(df, 0.06)
    assert speedup(reached(strict)) is None
    need, row = samples_to_resolve(strict, 0.06, 100)
    # dpm at 16 NFE (gap 0, sd 0.1) is the closest (pd at 4 NFE: gap 0.05, sd 0.05 needs 36x n):
    # z(1 - 0.05/6) = 2.394 -> n = 100 (2.394 * 0.1 / 0.06)^2 = 1592
    assert row == "dpm at 16 NFE" and need == pytest.approx(100 * (2.394 * 0.1 / 0.06) ** 2, rel=1e-3)
