"""Runs on shared machines and clusters: one writer per run dir, graceful SIGTERM/SIGINT, the previous checkpoint
as a fallback, a full or read-only disk mid-run, results never mixed, and the bugs found by trying fastdiff as a
new user (each test here failed before its fix)."""
from __future__ import annotations

import csv
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch_fidelity

import fastdiff
from fastdiff import config as cfgs
from fastdiff import bench as B
from fastdiff import checkpoint as CK
from fastdiff import distill as DI
from fastdiff.distill.cli import FULL_ONLY_SAMPLERS
from fastdiff import features as F
from fastdiff import metrics as M
from fastdiff import runs
from fastdiff import train as T
from fastdiff.errors import FastdiffError, Preempted, run_cli
from test_bench import MU, STD, gaussian_cfg, gaussian_family, read_rows, tiny_unet
from test_data import fake_cifar10  # noqa: F401  (fixture: a fake CIFAR-10 folder torchvision accepts)
from test_metrics import one_thread, shared_cache  # noqa: F401
from test_train import MLP_ARGS, _assert_same_run, _cfg, _snapshot, pictures  # noqa: F401

ROOT = Path(__file__).parents[1]


@pytest.fixture(autouse=True)
def no_stop_left_pending():
    """A test that asks for a stop outside graceful_stop() must not leave it to the next test."""
    yield
    runs._stop_signal = None


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- one writer per run dir ---------------------------------------------------------------------------------------

def test_second_process_on_a_run_dir_is_refused_at_once_naming_the_holder(tmp_path, capsys, pictures):
    run, out = tmp_path / "run", tmp_path / "results"
    with runs.run_lock(run):
        t0 = time.monotonic()
        assert run_cli(T.main, [*MLP_ARGS, "--out-dir", str(run)]) == 2
        assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "is in use by pid" in err[0] and str(os.getpid()) in err[0]
    assert socket.gethostname() in err[0] and "started 20" in err[0]
    assert not (run / "checkpoint.pt").exists() and not (run / "metrics.csv").exists()
    # bench locks its results folder the same way
    cfg = gaussian_cfg(out, steps=(1,), n_samples=20, batch_size=20)
    with runs.run_lock(out / "gauss"), pytest.raises(FastdiffError, match="is in use by pid"):
        B.run_sweep(cfg, family=gaussian_family(), progress=False)
    assert not (out / "gauss" / "fid_vs_steps.csv").exists()
    # released: the same run now goes through
    assert run_cli(T.main, [*MLP_ARGS, "--out-dir", str(run)]) == 0


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time; from fastdiff.runs import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(FastdiffError, match=f"in use by pid {proc.pid} on {socket.gethostname()}"):
            with runs.run_lock(run):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    with runs.run_lock(run):  # the kernel dropped the lock with the process
        pass


# --- graceful stop -----------------------------------------------------------------------------------------------

def test_sigterm_stops_training_after_the_update_with_a_checkpoint_and_exit_143(tmp_path, capsys, pictures):
    run, ref = tmp_path / "run", tmp_path / "ref"
    argv = [*MLP_ARGS, "--updates", "30", "--ckpt-every", "10", "--log-every", "5"]

    def stop_on_arrival(argv):  # the signal arrives while the first update runs
        runs.request_stop(signal.SIGTERM)
        return T.main(argv)

    assert run_cli(stop_on_arrival, [*argv, "--out-dir", str(run)]) == 143
    assert "stopped by SIGTERM in train toy2d at update 1/30" in capsys.readouterr().err
    assert CK.load_checkpoint(run / "checkpoint.pt")["update"] == 1

    def sigint_at_13(step):  # a real signal, through the handler graceful_stop installs
        if step == 13:
            signal.raise_signal(signal.SIGINT)

    with runs.graceful_stop(), pytest.raises(Preempted) as stop:
        T.train(_cfg(argv, run), progress=False, on_step=sigint_at_13)
    assert stop.value.exit_code == 130 and CK.load_checkpoint(run / "checkpoint.pt")["update"] == 13
    seen = []
    T.train(_cfg(argv, run), progress=False, on_step=seen.append)
    assert seen[0] == 14  # nothing lost: it goes on from the update it stopped at
    T.train(_cfg(argv, ref), progress=False)
    _assert_same_run(run, ref, 30)  # weights, optimiser, RNG streams and every metrics.csv row


def test_stopped_sweep_keeps_finished_batches_and_resumes_mid_row(tmp_path):
    """A long row (here 5 batches) stopped after its second batch samples only the three missing ones."""
    calls = []

    class Counting:
        def __init__(self, stop_after=None):
            from fastdiff.analytic import GaussianDenoiser
            from fastdiff.schedules import Schedule

            self.den, self.stop_after = GaussianDenoiser(MU, STD, Schedule("linear", 1000), "eps"), stop_after

        def __call__(self, x, t):
            if bool((t == 1).all()):
                calls.append(len(x))
                if len(calls) == self.stop_after:
                    runs.request_stop(signal.SIGTERM)
            return self.den(x, t)

    cfg = gaussian_cfg(tmp_path / "run", samplers=("ddim",), steps=(4,), n_samples=50, batch_size=10)
    with pytest.raises(Preempted, match="with 2 of 5 batches kept"):
        B.run_sweep(cfg, family=gaussian_family(Counting(stop_after=2)), progress=False)
    folder = tmp_path / "run" / "gauss"
    assert not (folder / "fid_vs_steps.csv").exists() and len(list((folder / "partial").rglob("b*.pt"))) == 2
    runs._stop_signal = None  # what graceful_stop() does when the stopped command exits
    calls.clear()
    B.run_sweep(cfg, family=gaussian_family(Counting()), progress=False)
    assert calls == [10, 10, 10] and not (folder / "partial").exists()
    ref = B.run_sweep(dataclasses.replace(cfg, out_dir=str(tmp_path / "ref")), family=gaussian_family(), progress=False)
    got, want = read_rows(folder / "fid_vs_steps.csv"), read_rows(ref)
    skip = {"timestamp", "wall_clock_s_per_batch", "wall_clock_s_total"}
    assert [{k: v for k, v in r.items() if k not in skip} for r in got] == \
        [{k: v for k, v in r.items() if k not in skip} for r in want]


def test_stop_request_is_agreed_by_every_rank(monkeypatch):
    """Under torchrun the flag is all-reduced (MAX): a rank that got no signal stops at the same update."""
    reduced = []

    def all_reduce(t, op=None):
        reduced.append(int(t.item()))
        t.fill_(int(signal.SIGTERM))  # another rank received SIGTERM

    monkeypatch.setattr(runs.dist, "world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    assert runs.stop_requested("cpu") == signal.SIGTERM and reduced == [0]


# --- the previous checkpoint as a fallback ----------------------------------------------------------------------

def test_checkpoint_rotation_and_fallback(tmp_path, caplog):
    path = tmp_path / "state.pt"
    assert CK.load_resumable(path) is None  # a fresh run
    for step in (1, 2, 3):
        CK.save_checkpoint(path, {"config": {}, "model": {}, "step": step}, keep_previous=True)
    assert CK.load_resumable(path)["step"] == 3 and CK.load_checkpoint(CK.previous_path(path))["step"] == 2
    path.unlink()  # killed between the two renames of a save
    assert CK.load_resumable(path)["step"] == 2
    assert "state.pt is missing; resuming from the previous checkpoint" in caplog.text
    CK.save_checkpoint(path, {"config": {}, "model": {}, "step": 3}, keep_previous=True)
    path.write_bytes(path.read_bytes()[:40])
    assert CK.load_resumable(path)["step"] == 2 and "resuming from the previous checkpoint" in caplog.text
    CK.previous_path(path).write_bytes(b"junk")
    with pytest.raises(FastdiffError, match="no readable checkpoint.*state.prev.pt"):
        CK.load_resumable(path)


def test_a_corrupt_student_file_is_rebuilt_from_the_rounds_last_state(tmp_path, shared_cache):
    cfg = _tiny_toy_distill(tmp_path)
    run = DI.distill(cfg, progress=False)
    student = run / "students" / "student_N1.pt"
    good = CK.load_checkpoint(student)["model"]
    student.write_bytes(student.read_bytes()[:100])
    seen = []
    DI.distill(cfg, progress=False, on_step=lambda r, u: seen.append((r, u)))
    assert seen == []  # no update repeated: the round's final state was on disk
    assert _tensors_equal(CK.load_checkpoint(student)["model"], good)


def _tiny_toy_distill(tmp_path, **kw) -> DI.DistillConfig:
    teacher_cfg = dataclasses.replace(T.PRESETS["toy2d"], updates=60, hidden=32, layers=1, batch_size=64,
                                      out_dir=str(tmp_path / "teacher"), sample_every=10_000)
    T.train(teacher_cfg, progress=False)
    base = cfgs.replace(DI.PRESETS["toy2d"], {"teacher": str(tmp_path / "teacher"), "pd.start_steps": 2,
                                              "pd.updates_per_round": 6, "batch_size": 64, "ckpt_every": 4,
                                              "eval_samples": 100, "bench": False, "out_dir": str(tmp_path / "distill"),
                                              "device": "cpu"})
    return cfgs.replace(base, kw)


# --- dropout: resume bit-exact ----------------------------------------------------------------------------------

def test_distillation_with_dropout_resumes_bit_exact(tmp_path, shared_cache, pictures):
    """Dropout draws from the global RNG: it is seeded per stage and saved/restored with the other streams (before,
    a resumed round drew other masks and ended with other weights)."""
    tcfg = tiny_unet("digits", dropout=0.3, updates=6, batch_size=8, ckpt_every=3, log_every=3,
                     out_dir=str(tmp_path / "teacher"))
    T.train(tcfg, progress=False)
    base = cfgs.replace(DI.DistillConfig(), {"teacher": str(tmp_path / "teacher"), "teacher_preset": "digits",
                                             "pd.start_steps": 2, "pd.updates_per_round": 7, "batch_size": 8,
                                             "ckpt_every": 3, "eval_samples": 8, "bench": False, "device": "cpu"})

    class Kill(Exception):
        pass

    def kill_at_5(r, updates):
        if updates == 5:
            raise Kill

    killed = dataclasses.replace(base, out_dir=str(tmp_path / "killed"))
    with pytest.raises(Kill):
        DI.distill(killed, progress=False, on_step=kill_at_5)
    torch.manual_seed(12345)  # whatever the global stream holds when a run (re)starts must not matter
    DI.distill(killed, progress=False)
    DI.distill(dataclasses.replace(base, out_dir=str(tmp_path / "ref")), progress=False)
    got = CK.load_checkpoint(tmp_path / "killed" / "students" / "student_N1.pt")["model"]
    want = CK.load_checkpoint(tmp_path / "ref" / "students" / "student_N1.pt")["model"]
    assert _tensors_equal(got, want)


# --- a full or read-only disk -----------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (needs root, as on the CI machine): a disk that can really fill up or turn read-only."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_disk_full_or_read_only_mid_run_is_one_line_and_loses_nothing(small_disk, tmp_path, capsys, pictures, fault):
    run, ref = small_disk / "run", tmp_path / "ref"
    argv = [*MLP_ARGS, "--updates", "30", "--ckpt-every", "10", "--log-every", "5"]
    filler = []

    def fault_at_12(step):
        if step == 12:
            if fault == "full":
                filler.append(_fill(small_disk))
            else:  # the run dir turns read-only under the run (a bind mount of itself: the open lock is no obstacle)
                subprocess.run(["mount", "--bind", str(run), str(run)], check=True)
                subprocess.run(["mount", "-o", "remount,bind,ro", str(run)], check=True)

    assert run_cli(lambda a: T.train(_cfg(a, run), progress=False, on_step=fault_at_12) and 0, argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write '{run}/")
    assert ("no space left on the device (needs 0." in err[0]) if fault == "full" else ("read-only" in err[0])
    assert CK.load_checkpoint(run / "checkpoint.pt")["update"] == 10  # the last good checkpoint, intact
    assert not list(run.glob(".*.tmp"))  # no half-written file left behind
    if fault == "full":
        filler[0].unlink()
    else:
        subprocess.run(["umount", str(run)], check=True)
    assert run_cli(T.main, [*argv, "--out-dir", str(run)]) == 0
    T.train(_cfg(argv, ref), progress=False)
    _assert_same_run(run, ref, 30)


def test_full_disk_during_a_sweep_keeps_every_finished_row(small_disk):
    cfg = gaussian_cfg(small_disk, samplers=("ddim",), steps=(1, 2), n_samples=20, batch_size=20)
    B.run_sweep(dataclasses.replace(cfg, steps=(1,)), family=gaussian_family(), progress=False)
    path = small_disk / "gauss" / "fid_vs_steps.csv"
    before = path.read_bytes()
    _fill(small_disk)
    with pytest.raises(FastdiffError, match="no space left on the device"):
        B.run_sweep(cfg, family=gaussian_family(), progress=False)
    assert path.read_bytes() == before


# --- results never mixed ----------------------------------------------------------------------------------------

def test_a_sweep_of_another_teacher_is_refused_unless_append(tmp_path):
    cfg = gaussian_cfg(tmp_path, samplers=("ddim",), steps=(1,), n_samples=20, batch_size=20)
    path = B.run_sweep(cfg, family=gaussian_family(), progress=False)
    other = gaussian_family()
    other = dataclasses.replace(other, teacher=dataclasses.replace(other.teacher, hash="another"))
    with pytest.raises(FastdiffError, match="holds the sweep of teacher analytic.*--append"):
        B.run_sweep(cfg, family=other, progress=False)
    assert len(read_rows(path)) == 1
    B.run_sweep(dataclasses.replace(cfg, append=True), family=other, progress=False)
    assert {r["teacher_hash"] for r in read_rows(path)} == {"analytic", "another"}


def test_distill_refuses_a_results_folder_of_another_teacher_before_any_work(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "res" / "toy2d"
    folder.mkdir(parents=True)
    from fastdiff.results import COLUMNS

    with open(folder / "fid_vs_steps.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerow({c: "" for c in COLUMNS} | {"teacher_hash": "0123456789ab"})
    argv = ["--preset", "toy2d", "--results-dir", str(tmp_path / "res"), "--out-dir", str(tmp_path / "d")]
    monkeypatch.chdir(tmp_path)  # the preset's teacher would be trained under ./runs
    assert run_cli(DI.main, argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "holds the sweep of teacher 0123456789ab" in err[0] and "--append-results" in err[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "d").exists()


def test_default_results_folder_is_apart_from_the_committed_reference_results():
    assert DI.DistillConfig().results_dir == B.BenchConfig().out_dir == "runs/results"
    assert all(p.results_dir == "runs/results" for p in DI.PRESETS.values())


def test_every_option_that_changes_the_samples_is_in_the_row_key(tmp_path, monkeypatch):
    from fastdiff.results import KEY

    assert {"sampler", "grid", "grid_hash", "eta", "variance", "clip", "guidance", "noise", "steps", "seed",
            "model_hash", "n_samples"} <= set(KEY)
    cfg = gaussian_cfg(tmp_path, samplers=("ddim",), steps=(2,), n_samples=20, batch_size=20)
    path = B.run_sweep(cfg, family=gaussian_family(), progress=False)
    monkeypatch.setattr(B, "grid_hash", lambda spec, schedule: "changedgrid0")  # a changed grid definition
    B.run_sweep(cfg, family=gaussian_family(), progress=False)
    assert [r["grid_hash"] != "changedgrid0" for r in read_rows(path)] == [True, False]


def test_report_removes_figures_it_no_longer_shows(tmp_path):
    from fastdiff.report import write_report

    cfg = gaussian_cfg(tmp_path, samplers=("ddim",), steps=(1, 2), n_samples=20, batch_size=20)
    B.run_sweep(cfg, family=gaussian_family(), progress=False)
    stale = tmp_path / "gauss" / "samples_nfe512.png"
    stale.write_bytes(b"\x89PNG old")
    report = write_report(tmp_path).read_text()
    assert not stale.exists()
    shown = sorted(p.name for p in (tmp_path / "gauss").glob("*.png"))
    assert shown and all(name in report for name in shown)


# --- the bugs found ---------------------------------------------------------------------------------------------

def test_load_student_documented_in_the_readme_works(tmp_path, shared_cache):
    run = DI.distill(_tiny_toy_distill(tmp_path), progress=False)
    student = fastdiff.load_student(run / "students" / "student_N1.pt")  # AttributeError before
    assert student.steps == 1 and student.kind == "student"
    with pytest.raises(FastdiffError, match="is a teacher checkpoint, not a distilled student"):
        fastdiff.load_student(tmp_path / "teacher")


@pytest.mark.slow
def test_benchmark_only_at_the_repository_root_runs_the_benchmark_suite():
    """`pytest --benchmark-only`, typed at the root, collected tests/ only (and skipped all of it) before."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--benchmark-only", "--collect-only", "-q",
                          "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    items = [line for line in out.splitlines() if "::" in line]
    assert items and all(line.startswith("benchmarks/") for line in items), out[-2000:]
    assert any("test_bench_sampler_loop.py" in line for line in items)


def test_inception_id_names_the_weights_checksum(tmp_path):
    """Reference statistics and rows keyed by the extractor id were reused across --inception-weights files."""
    ids = []
    for k in (1, 2):
        path = tmp_path / f"w{k}.pth"
        torch.save({"fc.weight": torch.full((2, 2), float(k))}, path)
        ids.append(F.resolve_extractor("inception", "cifar10", (3, 32, 32), inception_weights=str(path)).id)
    assert ids[0] != ids[1] and all(i.startswith("inception-v3-compat-") for i in ids)
    ref = M.Reference(torch.zeros(2, 3, 32, 32), "cifar10-train-n2")
    names = [ref.cache_name(F.Extractor("inception", F.INCEPTION, None, i)) for i in ids]
    assert names[0] != names[1]


class _PoolFeatures(torch_fidelity.FeatureExtractorBase):
    """A stand-in for Inception in tests: uint8 (B, 3, 32, 32) -> (B, 12) float64 means over 16x16 blocks."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list():
        return ("pool",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "pool"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x):
        return (torch.nn.functional.avg_pool2d(x.double(), 16).flatten(1),)


if "fastdiff-test-pool" not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor("fastdiff-test-pool", _PoolFeatures)


@pytest.mark.slow
def test_cifar10_preset_end_to_end_on_a_fake_folder(fake_cifar10, tmp_path, monkeypatch, pictures):
    """`--preset cifar10` with a tiny teacher on a fake CIFAR-10 folder and a stand-in for Inception: every round is
    scored with the teacher's data root and seed, the run's device and --inception-weights (before, the round FID
    raised "cifar10 needs a local copy"), then the cifar10 sweep and the report."""
    root, _ = fake_cifar10
    asked = []

    def resolve(name, dataset, data_shape, *, inception_weights="", data_root=""):
        asked.append((name, dataset, tuple(data_shape), inception_weights))
        return F.Extractor("inception", "fastdiff-test-pool", None, "test-pool")

    devices = []
    compute = M.compute_metrics

    def spy_compute(*args, device="cpu", **kw):
        devices.append(device)
        return compute(*args, device=device, **kw)

    for module in (M, B):
        monkeypatch.setattr(module, "resolve_extractor", resolve)
        monkeypatch.setattr(module, "compute_metrics", spy_compute)
    tcfg = dataclasses.replace(tiny_unet("cifar10"), schedule="linear", param="eps", weighting="eps-mse",
                               data_root=str(root), updates=3, batch_size=4, ckpt_every=3, log_every=1, seed=3,
                               out_dir=str(tmp_path / "teacher"))
    T.train(tcfg, progress=False)
    weights = tmp_path / "inception.pth"
    argv = ["--preset", "cifar10", "--teacher", str(tmp_path / "teacher"), "--start-steps", "2",
            "--updates-per-round", "2", "--batch-size", "4", "--ckpt-every", "1", "--eval-samples", "6",
            "--bench-steps", "1,2", "--bench-samples", "6", "--inception-weights", str(weights),
            "--results-dir", str(tmp_path / "res"), "--out-dir", str(tmp_path / "d"), "--device", "cpu"]
    assert run_cli(DI.main, argv) == 0
    rounds = list(csv.DictReader(open(tmp_path / "d" / "rounds.csv")))
    assert len(rounds) == 1 and rounds[0]["metric"] == "fid-inception" and float(rounds[0]["student_value"]) >= 0
    assert asked[0] == ("auto", "cifar10", (3, 32, 32), str(weights))
    assert all(isinstance(d, torch.device) and d.type == "cpu" for d in devices)
    rows = read_rows(tmp_path / "res" / "cifar10" / "fid_vs_steps.csv")
    # every sampler of the sweep; a progressive run has no consistency or DMD2 student (distill --method cd / dmd2
    # makes one), and the samplers of the --full sweep are not in distill's default one
    assert {r["sampler"] for r in rows} == set(B.SAMPLERS) - {"consistency", "dmd2"} - set(FULL_ONLY_SAMPLERS)
    assert {r["extractor"] for r in rows} == {"test-pool"}
    assert {r["n_samples"] for r in rows} == {"6"} and (tmp_path / "res" / "report.md").exists()


def test_a_second_signal_stops_at_once():
    """The first SIGINT/SIGTERM only asks for a stop at the next safe point; a second one raises right away; the
    handlers are restored to what they were (SIG_IGN for SIGINT in a background job without job control)."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with runs.graceful_stop():
        signal.raise_signal(signal.SIGTERM)
        assert runs.stop_requested() == signal.SIGTERM
        with pytest.raises(Preempted, match="at once"):
            signal.raise_signal(signal.SIGINT)
    assert runs.stop_requested() is None
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
