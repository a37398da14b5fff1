"""The FID-vs-steps sweep: curves of the exact Gaussian denoiser, per-index noise, batch-size invariance, resume,
the CLI on real (tiny, untrained) checkpoints with a distillation run dir, and bad input."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdiff import config as cfgs
from fastdiff import features as F
from fastdiff.noise import philox_normals
from fastdiff.samplers import randn_like_per_sample, sample_generators
from fastdiff.analytic import GaussianDenoiser
from fastdiff.bench import COLUMNS, BenchConfig, main, run_sweep
from fastdiff.sweep import Family, Network
from fastdiff.checkpoint import save_checkpoint
from fastdiff.errors import run_cli
from fastdiff.metrics import Reference
from fastdiff.report import write_report
from fastdiff.schedules import Schedule
from fastdiff.train import TrainConfig, build_network
from test_metrics import one_thread, shared_cache  # noqa: F401  (fixtures: one classifier cache, one CPU thread)

MU, STD, DIM = 0.5, 0.5, 8


class Spy:
    """Wraps a model and records the input of every evaluation at t > 0.9: each sampler run's initial noise (the
    grids used here start at t = 1, the karras grid at EDM's sigma = 80, t ~ 0.93 for
    the linear schedule, and go on below 0.7)."""

    def __init__(self, model):
        self.model, self.first_inputs = model, []

    def __call__(self, x, t):
        if bool((t > 0.9).all()):
            self.first_inputs.append(x.clone())
        return self.model(x, t)


def gaussian_family(model=None, n_ref=4000) -> Family:
    schedule = Schedule("linear", 1000)
    den = GaussianDenoiser(MU, STD, schedule, "eps")
    ref = den.sample((n_ref, DIM), torch.Generator().manual_seed(123)).float()
    return Family("gauss", (DIM,), Network(model or den, schedule, "eps", "analytic"), {}, Reference(ref, "gauss-ref"))


def gaussian_cfg(tmp_path, **kw) -> BenchConfig:
    base = BenchConfig(model="analytic", samplers=("ddim", "dpm++2m"), spacings=("quadratic",), steps=(1, 2, 4, 8, 16),
                       n_samples=1000, batch_size=500, clip=False, extractor="identity", metrics=("fid",),
                       out_dir=str(tmp_path), device="cpu")
    return dataclasses.replace(base, **kw)


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fid_by(rows) -> dict[tuple[str, int], float]:
    return {(r["sampler"], int(r["nfe"])): float(r["value"]) for r in rows if r["metric"] == "fid"}


def test_analytic_curves_fall_with_nfe_and_dpm_solver_beats_ddim(tmp_path):
    path = run_sweep(gaussian_cfg(tmp_path), family=gaussian_family(), progress=False)
    rows = read_rows(path)
    assert list(rows[0]) == COLUMNS
    fid = fid_by(rows)
    nfes = (1, 2, 4, 8, 16)
    ddim, dpm = [fid["ddim", n] for n in nfes], [fid["dpm++2m", n] for n in nfes]
    # DDIM falls monotonically; both end far below their 1-step value (the rest is the n=1000 sampling floor).
    assert all(a > b for a, b in zip(ddim, ddim[1:]))
    assert ddim[-1] < ddim[0] / 20 and dpm[-1] < dpm[0] / 20 and dpm[2] < dpm[0]
    # DPM-Solver++(2M) beats DDIM at equal NFE once it is second order (NFE >= 4; at 1-2 steps both are first order
    # and the logSNR grid places its single intermediate point poorly).
    for n in (4, 8, 16):
        assert fid["dpm++2m", n] < fid["ddim", n]
    assert all(r["extractor"] == "identity" and r["n_samples"] == "1000" for r in rows)
    with np.load(tmp_path / "gauss" / rows[0]["samples_file"]) as npz:
        assert npz["samples"].shape == (500, DIM) and npz["samples"].dtype == np.float32
    # the installed versions beside the rows, as a pip constraints file
    pins = dict(line.split("==") for line in (tmp_path / "gauss" / "constraints.txt").read_text().splitlines()
                if not line.startswith("#"))
    assert pins["torch"] == importlib.metadata.version("torch") and pins["numpy"] == np.__version__
    assert "fastdiff" not in {k.lower() for k in pins}


def test_same_noise_per_index_in_every_row_and_batch_size_does_not_matter(tmp_path):
    samplers = ("ddpm-strided", "ddim", "ddim-eta1", "dpm++2m", "heun")
    values = []
    for batch in (4, 3):
        spy = Spy(GaussianDenoiser(MU, STD, Schedule("linear", 1000), "eps"))
        cfg = gaussian_cfg(tmp_path / f"b{batch}", samplers=samplers, steps=(1, 3), n_samples=10, batch_size=batch,
                           metrics=("fid", "swd"))
        path = run_sweep(cfg, family=gaussian_family(spy, n_ref=200), progress=False)
        per_row = len(range(0, 10, batch))
        runs = [torch.cat(spy.first_inputs[i:i + per_row]) for i in range(0, len(spy.first_inputs), per_row)]
        assert len(runs) == len({r["samples_file"] for r in read_rows(path)}) == 10
        expected = philox_normals(0, torch.arange(10), 0, DIM)  # draw 0 of every sample: its x_T
        for noise in runs:
            assert torch.equal(noise, expected)
        assert {r["noise"] for r in read_rows(path)} == {"philox4x32-10-per-sample"}
        values.append({(r["sampler"], r["grid"], r["steps"], r["metric"]): float(r["value"])
                       for r in read_rows(path)})
    assert values[0].keys() == values[1].keys()
    for key, v in values[0].items():
        assert values[1][key] == pytest.approx(v, rel=1e-9, abs=1e-12), key
    # --noise torch-cpu: fastdiff 0.5's per-sample CPU generators, named so in the rows
    spy = Spy(GaussianDenoiser(MU, STD, Schedule("linear", 1000), "eps"))
    cfg = gaussian_cfg(tmp_path / "legacy", samplers=("ddim",), steps=(1,), n_samples=10, batch_size=10,
                       metrics=("swd",), noise="torch-cpu")
    path = run_sweep(cfg, family=gaussian_family(spy, n_ref=200), progress=False)
    assert torch.equal(spy.first_inputs[0], randn_like_per_sample((10, DIM), sample_generators(0, range(10)),
                                                                  torch.float32, "cpu"))
    assert {r["noise"] for r in read_rows(path)} == {"torch-cpu-per-sample"}


def test_interrupted_sweep_resumes_with_only_the_missing_rows(tmp_path):
    class Interrupt(Spy):
        def __call__(self, x, t):
            if bool((t == 1).all()) and len(self.first_inputs) == 3:
                raise KeyboardInterrupt
            return super().__call__(x, t)

    cfg = gaussian_cfg(tmp_path, steps=(1, 2, 4), n_samples=50, batch_size=50)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, family=gaussian_family(Interrupt(GaussianDenoiser(MU, STD, Schedule("linear", 1000)))),
                  progress=False)
    path = tmp_path / "gauss" / "fid_vs_steps.csv"
    # the anchor of the FID intervals (ddim at the most steps) is scored first
    assert [(r["sampler"], r["steps"]) for r in read_rows(path)] == [("ddim", "4"), ("ddim", "1"), ("ddim", "2")]
    spy = Spy(GaussianDenoiser(MU, STD, Schedule("linear", 1000)))
    run_sweep(dataclasses.replace(cfg, steps=(1, 2, 4, 8)), family=gaussian_family(spy), progress=False)
    rows = read_rows(path)
    assert len(spy.first_inputs) == 5  # ddim 8 and dpm++2m 1, 2, 4, 8: nothing done twice
    assert len(rows) == len({(r["sampler"], r["steps"]) for r in rows}) == 8


def test_rows_carry_their_intervals_and_paired_differences_to_the_anchor_row(tmp_path):
    """KID (against the reference and against the teacher's own samples), precision and recall carry their own 95 %
    interval and that of their paired difference to the anchor row (ddim at the most steps); FID only the difference
    (no interval of one FID, no ratio); a sweep extended later regenerates the anchor's samples (same per-index noise)
    and gives the new rows the intervals a single run gives them; the teacher's samples are cached."""
    import json

    from fastdiff.errors import FastdiffError

    family = gaussian_family(n_ref=300)
    one = gaussian_cfg(tmp_path / "one", steps=(1, 2, 4), n_samples=200, batch_size=100, ci_resamples=200,
                       metrics=("fid", "kid", "prc"), teacher_samples=150)
    rows = {(r["sampler"], int(r["steps"]), r["metric"]): r
            for r in read_rows(run_sweep(one, family=family, progress=False))}
    assert {m for _, _, m in rows} == {"fid", "kid", "kid_teacher", "precision", "recall"}
    assert {r["ci_reference"] for r in rows.values()} == {"ddim/quadratic/4"}
    fid = {k: r for k, r in rows.items() if k[2] == "fid"}
    assert {r["ci_method"] for r in fid.values()} == {"basic paired bootstrap of the difference to the anchor 95%"}
    assert {(r["ci_low"], r["ratio_low"], r["ratio_high"]) for r in fid.values()} == {("", "", "")}
    assert float(rows["ddim", 1, "fid"]["diff_low"]) > 0  # 1 step: worse
    for k, r in rows.items():
        if k[2] != "fid":
            assert float(r["ci_low"]) <= float(r["value"]) <= float(r["ci_high"]), k
            if k[2].startswith("kid"):  # the anchor's own interval too: not 0 wide
                assert float(r["ci_low"]) < float(r["ci_high"]), k
            assert r["ci_method"].startswith(("two-sample jackknife", "paired over sample indices")), k
        if k[:2] == ("ddim", 4):
            assert float(r["diff_low"]) == float(r["diff_high"]) == 0.0
    assert float(rows["ddim", 1, "kid"]["diff_low"]) > 0
    teacher_rows = [r for k, r in rows.items() if k[2] == "kid_teacher"]
    assert {r["reference"] for r in teacher_rows} == {"teacher-ddim-quadratic-4-n150-seed4294967296"}
    assert {r["reference"] for k, r in rows.items() if k[2] != "kid_teacher"} == {"gauss-ref"}
    lo, hi = float(rows["ddim", 4, "kid_teacher"]["ci_low"]), float(rows["ddim", 4, "kid_teacher"]["ci_high"])
    assert lo < 0 < hi  # the anchor's sampler against its own other samples: no distance
    two = dataclasses.replace(one, out_dir=str(tmp_path / "two"), samplers=("ddim",))
    spy = Spy(family.teacher.net)
    run_sweep(two, family=dataclasses.replace(family, teacher=dataclasses.replace(family.teacher, net=spy)),
              progress=False)
    assert len(spy.first_inputs) == 3 * 2  # three rows of two batches: the teacher's samples came from the cache
    later = {(r["sampler"], int(r["steps"]), r["metric"]): r for r in read_rows(
        run_sweep(dataclasses.replace(two, samplers=("ddim", "dpm++2m")), family=family, progress=False))}
    for key in [k for k in rows if k[0] == "dpm++2m"]:
        for col in ("value", "ci_low", "ci_high", "diff_low", "diff_high"):
            got, want = later[key][col], rows[key][col]
            assert (got == want == "") or float(got) == pytest.approx(float(want), rel=1e-9, abs=1e-12), (key, col)
    report = write_report(tmp_path / "one").read_text()
    assert "two-sample jackknife (generated + reference samples), normal 95%" in report
    assert "(anchor)" in report and "Every row with its 95 % intervals" in report
    assert "NFE to reach the teacher**: not stated — no margin" in report
    (tmp_path / "one" / "gauss" / "margin.json").write_text(json.dumps({"delta": 1e9, "what": "a test margin"}))
    report = write_report(tmp_path / "one").read_text()
    assert "KID to the teacher's own samples below δ = 1e+09 (a test margin)" in report
    assert "Speed-up of the best student" in report
    none = read_rows(run_sweep(gaussian_cfg(tmp_path / "none", steps=(1,), n_samples=50, ci_resamples=0),
                               family=family, progress=False))
    assert {(r["ci_low"], r["diff_low"]) for r in none} == {("", "")}
    with pytest.raises(FastdiffError, match="--ci-anchor 'heun:3' is not a row of this sweep"):
        run_sweep(gaussian_cfg(tmp_path / "bad", ci_anchor="heun:3"), family=family, progress=False)
    assert not (tmp_path / "bad").exists()


def test_a_separate_interleaved_timing_pass_feeds_the_time_to_quality_table(tmp_path):
    from fastdiff.errors import FastdiffError

    family = gaussian_family(n_ref=1000)
    cfg = gaussian_cfg(tmp_path, steps=(1, 4), n_samples=100, batch_size=50, timing_repeats=5, timing_batch=20,
                       ci_resamples=100, metrics=("fid", "kid"), teacher_samples=50)
    run_sweep(cfg, family=family, progress=False)
    rows = read_rows(tmp_path / "gauss" / "timing.csv")
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows] == [("ddim", "1", "1"), ("ddim", "4", "4"),
                                                                    ("dpm++2m", "1", "1"), ("dpm++2m", "4", "4")]
    assert {(r["repeats"], r["batch"]) for r in rows} == {("5", "20")}
    assert all(float(r["min_s"]) <= float(r["median_s"]) <= float(r["max_s"]) for r in rows)
    assert all(float(r["ms_per_sample"]) == pytest.approx(1000 * float(r["median_s"]) / 20) for r in rows)
    assert rows[0]["cpu_model"] and rows[0]["load_before"]
    (tmp_path / "gauss" / "margin.json").write_text('{"delta": 1.0}')  # the answer table, which says where its ms are
    assert "from the separate timing pass (timing.csv: median of 5 interleaved repeats" in write_report(
        tmp_path).read_text()
    with pytest.raises(FastdiffError, match="--timing-repeats must be 0 .no timing pass. or >= 5"):
        run_sweep(dataclasses.replace(cfg, timing_repeats=3), family=family, progress=False)


def test_fid_against_published_reference_statistics(tmp_path):
    """--ref-stats takes the mu/sigma .npz that pytorch-fid, clean-fid and EDM publish: FID against it equals FID
    against the reference set those statistics came from, and the file's checksum is the rows' reference (key)."""
    from fastdiff.errors import FastdiffError

    family = gaussian_family(n_ref=2000)
    feats = family.reference.x.double().numpy()
    stats = tmp_path / "gauss-ref.npz"
    np.savez(stats, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    plain = read_rows(run_sweep(gaussian_cfg(tmp_path / "a", steps=(1, 4), n_samples=200), family=family,
                                progress=False))
    pub = read_rows(run_sweep(gaussian_cfg(tmp_path / "b", steps=(1, 4), n_samples=200, ref_stats=str(stats)),
                              family=family, progress=False))
    assert fid_by(pub) == pytest.approx(fid_by(plain), rel=1e-7)
    assert {r["reference"] for r in pub} == {f"stats-gauss-ref-{hashlib.sha256(stats.read_bytes()).hexdigest()[:12]}"}
    assert {r["ci_reference"] for r in pub} == {"ddim/quadratic/4"}
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=feats.mean(0))
    with pytest.raises(FastdiffError, match="cannot read mu and sigma"):
        run_sweep(gaussian_cfg(tmp_path / "c", ref_stats=str(bad)), family=family, progress=False)
    with pytest.raises(FastdiffError, match="pass --metrics fid"):
        run_sweep(gaussian_cfg(tmp_path / "c", ref_stats=str(stats), metrics=("fid", "kid")), family=family,
                  progress=False)
    assert not (tmp_path / "c").exists()


TORCHRUN_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[2])
from fastdiff import distributed as dist
from fastdiff.bench import run_sweep
from test_bench import gaussian_cfg, gaussian_family
with dist.init_from_env("cpu"):
    cfg = gaussian_cfg(sys.argv[1], samplers=("ddim-eta1", "heun"), steps=(1, 4), n_samples=13, batch_size=4,
                       metrics=("fid", "swd"))
    run_sweep(cfg, family=gaussian_family(n_ref=300), progress=False)
"""


@pytest.mark.slow
def test_torchrun_shards_samples_and_matches_one_process(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(TORCHRUN_SCRIPT)
    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                    str(tmp_path / "ddp"), tests_dir], check=True, timeout=300, env=env, capture_output=True)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one"), tests_dir], check=True, timeout=300,
                   env=env, capture_output=True)
    ddp, one = (read_rows(tmp_path / d / "gauss" / "fid_vs_steps.csv") for d in ("ddp", "one"))
    assert len(ddp) == len(one) == 8
    assert [r["value"] for r in ddp] == [r["value"] for r in one]


def tiny_unet(dataset: str, **kw) -> TrainConfig:
    return TrainConfig(dataset=dataset, channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                       head_dim=8, T=16, **kw)


def save_model(path, tcfg: TrainConfig, shape, kind="teacher", steps=None, seed=0):
    torch.manual_seed(seed)
    save_checkpoint(path, {"kind": kind, "config": cfgs.to_dict(tcfg), "param": tcfg.param, "data_shape": list(shape),
                           "model": build_network(tcfg).state_dict(), **({"steps": steps} if steps else {})})


@pytest.fixture()
def distill_run(tmp_path):
    """A teacher checkpoint and a distillation run dir with 1- and 2-step students (untrained tiny U-Nets)."""
    tcfg = tiny_unet("digits")
    save_model(tmp_path / "teacher" / "checkpoint.pt", tcfg, (1, 8, 8))
    run = tmp_path / "distill"
    for n in (1, 2):
        save_model(run / "students" / f"student_N{n}.pt", tcfg, (1, 8, 8), kind="student", steps=n, seed=n)
    (run / "config.json").write_text(json.dumps({"teacher": str(tmp_path / "teacher" / "checkpoint.pt")}))
    return run


def test_cli_sweeps_a_distillation_run_and_the_report_reads_it(tmp_path, distill_run, shared_cache, capsys):
    out = tmp_path / "results"
    argv = ["--distill-dir", str(distill_run), "--samplers", "ddpm,ddim,distilled", "--spacings", "linspace",
            "--steps", "1,2", "--n-samples", "12", "--batch-size", "8", "--metrics", "fid,kid,prc",
            "--teacher-samples", "20", "--out-dir", str(out), "--device", "cpu"]
    assert run_cli(main, argv) == 0
    rows = read_rows(out / "digits" / "fid_vs_steps.csv")
    runs = {(r["sampler"], r["grid"], int(r["steps"]), int(r["nfe"])) for r in rows}
    assert runs == {("ddpm", "full", 16, 16), ("ddim", "linspace", 1, 1), ("ddim", "linspace", 2, 2),
                    ("distilled", "student", 1, 1), ("distilled", "student", 2, 2)}
    assert {r["metric"] for r in rows} == {"fid", "kid", "kid_teacher", "precision", "recall"}
    assert float(rows[0]["extractor_accuracy"]) > 0.9 and rows[0]["extractor"].startswith("classifier-digits-")
    students = {r["model_hash"] for r in rows if r["sampler"] == "distilled"}
    assert len(students) == 2 and rows[0]["teacher_hash"] not in students
    with np.load(out / "digits" / rows[0]["samples_file"]) as npz:
        assert npz["samples"].shape == (12, 1, 8, 8) and npz["samples"].dtype == np.uint8
    # Re-running the same command computes nothing new.
    assert run_cli(main, argv) == 0
    assert len(read_rows(out / "digits" / "fid_vs_steps.csv")) == len(rows)
    report = write_report(out).read_text()
    assert "distilled students" in report and (out / "digits" / "fid_vs_nfe.png").is_file()


def test_bench_after_distill_sweeps_the_run_and_writes_the_report(tmp_path, distill_run, shared_cache, monkeypatch):
    from fastdiff import bench
    from fastdiff.distill import DistillConfig, sweep_and_report

    small = dataclasses.replace(bench.PRESETS["digits"], samplers=("ddim", "distilled"), n_samples=10, batch_size=10,
                                teacher_samples=20)
    monkeypatch.setitem(bench.PRESETS, "digits", small)
    dcfg = DistillConfig(teacher_preset="digits", results_dir=str(tmp_path / "res"), bench_steps=(1, 4), device="cpu")
    report = sweep_and_report(distill_run, dcfg)
    assert report == tmp_path / "res" / "report.md" and report.is_file()
    rows = read_rows(tmp_path / "res" / "digits" / "fid_vs_steps.csv")
    assert {(r["sampler"], r["steps"]) for r in rows} == {("ddim", "1"), ("ddim", "4"), ("distilled", "1"),
                                                          ("distilled", "2")}


def test_bad_input_exit_2_one_line_nothing_written(tmp_path, distill_run, capsys, monkeypatch):
    out = tmp_path / "results"
    common = ["--out-dir", str(out), "--device", "cpu", "--n-samples", "10"]
    cases = [
        ["--distill-dir", str(distill_run), "--samplers", "ddim,euler"],
        ["--model", str(tmp_path / "missing")],
        ["--model", str(tmp_path / "teacher"), "--steps", "0"],
        ["--preset", "nope", "--model", str(tmp_path / "teacher")],
    ]
    for argv in cases:
        assert run_cli(main, argv + common) == 2
    # Inception on an RGB model, offline, without --inception-weights.
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(images / f"{i}.png")
    save_model(tmp_path / "rgb" / "checkpoint.pt", tiny_unet("folder", data_root=str(images), image_size=8), (3, 8, 8))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(F, "download", lambda url, path: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    assert run_cli(main, ["--model", str(tmp_path / "rgb")] + common) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("error: ") for line in err)
    assert "euler" in err[0] and "missing" in err[1] and "--inception-weights" in err[4]
    assert not out.exists()
