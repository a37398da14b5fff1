"""Fault injection: the real CLIs, in subprocesses, killed at random points (SIGKILL and SIGTERM mixed, drawn from a
fixed seed) several times each, then finished. The result must equal an uninterrupted run: the same teacher,
students and optimiser state bit for bit, and the same CSVs but for timestamps and wall-clock columns.

Pipeline under test: `python -m fastdiff.distill --preset toy2d` (teacher training, two distillation rounds, the
sweep and the report in one command), then `python -m fastdiff.bench` over the same run with rows of several
batches, so that kills also land mid-row.
"""
from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastdiff import bench as B
from fastdiff import distill as DI
from fastdiff.checkpoint import load_checkpoint
from fastdiff.errors import run_cli
from test_metrics import one_thread  # noqa: F401

ROOT = Path(__file__).parents[1]
SEED = 20261130
DISTILL_ARGS = ["--preset", "toy2d", "--teacher-updates", "120", "--start-steps", "4", "--updates-per-round", "30",
                "--ckpt-every", "15", "--eval-samples", "200", "--bench-steps", "1,2", "--bench-samples", "300",
                "--bench-samplers", "ddim,dpm++2m,distilled", "--device", "cpu"]
BENCH_ARGS = ["--preset", "toy2d", "--distill-dir", "runs/distill-toy2d", "--samplers", "ddim-eta1,distilled",
              "--steps", "1,2,4,8,16", "--n-samples", "1200", "--batch-size", "150", "--metrics", "swd",
              "--n-ref", "1000", "--out-dir", "runs/bench", "--device", "cpu"]
# Columns that measure time, not results.
TIMING = {"timestamp", "wall_clock_s_per_batch", "wall_clock_s_total", "wall_clock_s", "wall_s", "train_wall_clock_s"}
# One torch thread in the workers as in this process: the comparison is bitwise.
WORKER = ("import torch, runpy, sys; torch.set_num_threads(1); "  # as `python -m MODULE` runs it
          "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")


def _launch(module: str, argv: list[str], cwd: Path, log) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", WORKER, module, *argv], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=log)


def _holds_a_lock(cwd: Path, pid: int) -> bool:
    """Whether process `pid` has taken a run-dir lock under `cwd` (it is past its imports and checks)."""
    for lock in cwd.rglob(".lock"):
        try:
            if json.loads(lock.read_text() or "{}").get("pid") == pid:
                return True
        except (OSError, ValueError):
            continue
    return False


def _interrupt(module: str, argv: list[str], cwd: Path, kills: list[tuple[int, float]]) -> list[int]:
    """Run the CLI once per kill, sending `signum` `delay` s after it took its first lock; -> the exit codes."""
    codes = []
    for signum, delay in kills:
        with open(cwd / "worker.log", "a") as log:
            proc = _launch(module, argv, cwd, log)
        try:
            deadline = time.monotonic() + 60
            while not _holds_a_lock(cwd, proc.pid) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signum)
            codes.append(proc.wait(60))
        finally:
            proc.kill()
    return codes


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def _same_tensors(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same_tensors(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            _same_tensors(x, y, f"{where}[{i}]")


@pytest.mark.slow
def test_killed_and_resumed_runs_equal_uninterrupted_ones(tmp_path, monkeypatch):
    rng = random.Random(SEED)
    faulty, ref = tmp_path / "faulty", tmp_path / "ref"
    faulty.mkdir()
    ref.mkdir()

    # The whole default pipeline, killed four times at random points, then finished.
    signals = rng.sample([signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGTERM], 4)
    kills = [(signum, rng.uniform(0.2, 3.0)) for signum in signals]
    codes = _interrupt("fastdiff.distill", DISTILL_ARGS, faulty, kills)
    with open(faulty / "worker.log", "a") as log:
        assert _launch("fastdiff.distill", DISTILL_ARGS, faulty, log).wait(300) == 0, \
            (faulty / "worker.log").read_text()[-3000:]
    # A second sweep with rows of eight batches, killed mid-row.
    kills = [(signal.SIGTERM, rng.uniform(0.5, 2.5)), (signal.SIGKILL, rng.uniform(0.5, 2.5))]
    codes += _interrupt("fastdiff.bench", BENCH_ARGS, faulty, kills)
    with open(faulty / "worker.log", "a") as log:
        assert _launch("fastdiff.bench", BENCH_ARGS, faulty, log).wait(300) == 0
    # A stop by SIGTERM exits 143 after writing its state. A signal may also come when the work is done: exit 0, or
    # death by SIGTERM's default action once the command has left its handler on the way out.
    assert 143 in codes and set(codes) <= {143, -signal.SIGKILL, -signal.SIGTERM, 0}, codes

    monkeypatch.chdir(ref)  # the same commands, uninterrupted, in this process
    assert run_cli(DI.main, DISTILL_ARGS) == 0
    assert run_cli(B.main, BENCH_ARGS) == 0

    runs = Path("runs")
    for ckpt in ("teacher-toy2d/checkpoint.pt", "distill-toy2d/students/student_N2.pt",
                 "distill-toy2d/students/student_N1.pt"):
        got, want = load_checkpoint(faulty / runs / ckpt), load_checkpoint(ref / runs / ckpt)
        for key in ("model", "ema", "optimizer", "rng"):
            if key in want:
                _same_tensors(got[key], want[key], f"{ckpt}:{key}")
    for table in ("teacher-toy2d/metrics.csv", "distill-toy2d/rounds.csv", "results/toy2d/fid_vs_steps.csv",
                  "bench/toy2d/fid_vs_steps.csv"):
        assert _rows(faulty / runs / table) == _rows(ref / runs / table), table
    assert not (faulty / runs / "bench" / "toy2d" / "partial").exists()
