"""torchrun + DDP on CPU (gloo, 2 processes): gradient steps, sharded sampling, a distillation round and its resume.

Each launch is one `torchrun --standalone --nproc_per_node 2` of WORKER (or of the CLI itself); the workers compute
what the functions below compute and the tests compare it with the same functions run in this single process. A
worker waits at most WORKER_TIMEOUT_S at any collective and a launch is stopped after LAUNCH_TIMEOUT_S, so a rank
that fails alone fails the test instead of hanging it.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdiff import config as cfgs
from fastdiff import distributed as dist
from fastdiff.errors import FastdiffError

WORKER_TIMEOUT_S, LAUNCH_TIMEOUT_S = 60, 240
# The tiny teacher and distillation round every test here uses (toy2d MLP, 4 -> 2 steps, 16 updates).
TEACHER = dict(updates=30, hidden=32, layers=1, batch_size=64, sample_every=10_000, device="cpu")
ROUND = {"pd.start_steps": 4, "pd.rounds": 1, "pd.updates_per_round": 8, "batch_size": 64, "ckpt_every": 3,
         "eval_samples": 64, "bench": False, "device": "cpu"}
STOP_AT = 5  # rank 1 alone is asked to stop here; both ranks stop after this update with state.pt written

WORKER = '''
import dataclasses, json, os, sys
from fastdiff import config as cfgs
from pathlib import Path
import torch
from fastdiff import distributed as dist
from fastdiff.errors import FastdiffError
from test_distributed import ROUND, TEACHER, WORKER_TIMEOUT_S, STOP_AT, sample_sets, sgd_steps

mode, out = sys.argv[1], Path(sys.argv[2])
with dist.init_from_env("cpu", timeout_s=WORKER_TIMEOUT_S):
    if mode == "steps-and-samples":
        torch.manual_seed(dist.rank())  # each rank starts from other weights, as in train: DDP broadcasts rank 0's
        state = sgd_steps()
        sets = sample_sets()
        try:
            dist.local_batch_size(7)
            refused = ""
        except FastdiffError as err:
            refused = str(err)
        (out / f"batch7_rank{dist.rank()}.txt").write_text(refused)
        try:  # an error on rank 1 only (a file its node lacks): rank 0 raises too, instead of waiting for rank 1
            with dist.same_outcome():
                if dist.rank() == 1:
                    raise OSError("no such file")
            failed = ""
        except (FastdiffError, OSError) as err:
            failed = f"{type(err).__name__}: {err}"
        (out / f"one_rank_fails_rank{dist.rank()}.txt").write_text(failed)
        if dist.is_main():
            torch.save({"sgd": state, "samples": sets}, out / "ddp.pt")
    else:
        from fastdiff.distill import PRESETS, distill
        from fastdiff.train import PRESETS as TRAIN_PRESETS, train

        teacher = train(dataclasses.replace(TRAIN_PRESETS["toy2d"], out_dir=str(out / "teacher"), **TEACHER),
                        progress=False)
        cfg = cfgs.replace(PRESETS["toy2d"], {"teacher": str(teacher), "out_dir": str(out / "run"), **ROUND})

        import signal
        from fastdiff import runs
        from fastdiff.errors import Preempted

        def sigterm_on_rank_1(r, u):  # a preemption signal that reached one rank only
            if u == STOP_AT and dist.rank() == 1:
                runs.request_stop(signal.SIGTERM)
        try:
            distill(cfg, progress=False, on_step=sigterm_on_rank_1)
            stopped = "not stopped"
        except Preempted as stop:
            stopped = str(stop)
        (out / f"stopped_rank{dist.rank()}.txt").write_text(stopped)
        runs._stop_signal = None
        if dist.is_main():
            (out / "after_kill.json").write_text(json.dumps(sorted(os.listdir(out / "run"))))
        try:  # another lr in the same run dir: refused by rank 0's check, an error on every rank
            distill(dataclasses.replace(cfg, lr=2 * cfg.lr), progress=False)
            refused = ""
        except FastdiffError as err:
            refused = str(err)
        (out / f"refused_rank{dist.rank()}.txt").write_text(refused)
        distill(dataclasses.replace(cfg, out_dir=str(out / "straight")), progress=False)
'''


def torchrun(cwd: Path, *args) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS` in `cwd` (a free port, gloo); stopped after LAUNCH_TIMEOUT_S."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun hands SIGTERM on to its workers
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"torchrun {' '.join(map(str, args))} ran past {LAUNCH_TIMEOUT_S} s:\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_worker(tmp_path: Path, mode: str) -> Path:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    done = torchrun(tmp_path, script, mode, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    return tmp_path


def tiny_mlp() -> torch.nn.Module:
    from fastdiff.train import PRESETS, build_network

    return build_network(dataclasses.replace(PRESETS["toy2d"], **TEACHER))


def sgd_steps(steps: int = 2, batch: int = 8) -> dict:
    """The tiny MLP's state_dict after `steps` SGD steps on fixed batches of the v-loss; each rank takes its slice.

    SGD, not Adam: Adam's update barely changes when every gradient is scaled, so it would hide a sum-vs-mean error.
    """
    from fastdiff.losses import weighted_loss
    from fastdiff.param import append_dims
    from fastdiff.schedules import Schedule

    net = tiny_mlp()
    model = dist.wrap_ddp(net, torch.device("cpu"))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    schedule, gen, local = Schedule("cosine", 1000), torch.Generator().manual_seed(1), dist.local_batch_size(batch)
    mine = slice(dist.rank() * local, (dist.rank() + 1) * local)
    for _ in range(steps):
        x0, eps = torch.randn(batch, 2, generator=gen)[mine], torch.randn(batch, 2, generator=gen)[mine]
        t = torch.rand(batch, generator=gen, dtype=torch.float64)[mine]
        alpha, sigma = (a.float() for a in schedule.alpha_sigma(t))
        x_t = append_dims(alpha, 2) * x0 + append_dims(sigma, 2) * eps
        loss = weighted_loss(model(x_t, t.float()), x0, eps, x_t, alpha, sigma, schedule.logsnr(t).float(), "v",
                             "snr-trunc").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.state_dict()


def sample_sets() -> dict:
    """Samples of bench's `generate` (10 samples, batches of 3) from the exact Gaussian denoiser with DDIM(eta=1) and
    from the tiny MLP (seed 0) with strided DDPM: both draw fresh noise at every step, the MLP's floats depend on the
    batch size. (10, 2) tensors on rank 0, None on the others."""
    from fastdiff.analytic import GaussianDenoiser
    from fastdiff.bench import BenchConfig
    from fastdiff.sweep import Network, Spec, generate
    from fastdiff.schedules import Schedule

    schedule = Schedule("cosine", 1000)
    torch.manual_seed(0)
    nets = {"gauss": (GaussianDenoiser(0.3, 0.5, schedule, "v"), Spec("ddim-eta1", "linspace", 4, 1.0)),
            "mlp": (tiny_mlp().eval(), Spec("ddpm-strided", "linspace", 4, None, "large"))}
    cfg = BenchConfig(model="x", n_samples=10, batch_size=3, seed=5, clip=False)
    with torch.no_grad():
        return {name: generate(spec, Network(net, schedule, "v", name), (2,), cfg, torch.device("cpu"))[0]
                for name, (net, spec) in nets.items()}


@pytest.fixture(scope="module")
def ddp_outputs(tmp_path_factory) -> dict:
    out = run_worker(tmp_path_factory.mktemp("ddp"), "steps-and-samples")
    return {"saved": torch.load(out / "ddp.pt", weights_only=True),
            **{name: [(out / f"{name}_rank{r}.txt").read_text() for r in range(2)]
               for name in ("batch7", "one_rank_fails")}}


@pytest.mark.slow
def test_ddp_sgd_steps_equal_one_process_steps_on_the_whole_batch(ddp_outputs):
    torch.manual_seed(0)
    start = tiny_mlp().state_dict()
    torch.manual_seed(0)
    one, ddp = sgd_steps(), ddp_outputs["saved"]["sgd"]
    assert all(not torch.equal(one[k], start[k]) for k in one)  # every parameter moved
    for k, v in one.items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert all("does not divide by the world size 2" in text for text in ddp_outputs["batch7"])


@pytest.mark.slow
def test_an_error_on_one_rank_is_raised_on_every_rank(ddp_outputs):
    assert ddp_outputs["one_rank_fails"] == ["FastdiffError: rank 1 failed: OSError: no such file",
                                             "OSError: no such file"]


@pytest.mark.slow
def test_sharded_sample_sets_equal_one_process_sets_bit_for_bit(ddp_outputs):
    one, ddp = sample_sets(), ddp_outputs["saved"]["samples"]
    for name in ("gauss", "mlp"):
        assert torch.equal(ddp[name], one[name]), name


@pytest.mark.slow
def test_two_process_distillation_stopped_on_one_rank_then_resumed_by_the_cli(tmp_path):
    out = run_worker(tmp_path, "distill")
    after_kill = json.loads((out / "after_kill.json").read_text())
    assert "state.pt" in after_kill and "rounds.csv" not in after_kill
    for r in range(2):  # the stop was agreed: both ranks stopped after the same update, with its state on disk
        assert f"at update {STOP_AT}/16" in (out / f"stopped_rank{r}.txt").read_text()
    assert torch.load(out / "run" / "state.pt", weights_only=True)["update"] == STOP_AT
    for r in range(2):  # rank 0 refused the run dir, and every rank raised it
        assert "holds a different config" in (out / f"refused_rank{r}.txt").read_text()

    run = out / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ROUND.items()]
    done = torchrun(tmp_path, "-m", "fastdiff.distill", "--preset", "toy2d", "--teacher", out / "teacher",
                    "--out-dir", run, *flags)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("done: students in") == 1  # printed by rank 0 only
    assert "resuming round 1/1" in done.stderr
    rows = list(csv.DictReader(open(run / "rounds.csv")))
    assert [(r["round"], r["teacher_steps"], r["student_steps"], r["updates"]) for r in rows] == [("0", "4", "2", "16")]
    resumed, straight = (torch.load(d / "students" / "student_N2.pt", weights_only=True)["model"]
                         for d in (run, out / "straight"))
    for k, v in straight.items():  # stopped at update 5, resumed in new processes: the same student
        assert torch.equal(resumed[k], v), k


def test_without_torchrun_nothing_is_initialised(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    net = torch.nn.Linear(2, 2)
    with dist.init_from_env("cpu"):
        assert not torch.distributed.is_initialized()
        assert dist.wrap_ddp(net, torch.device("cpu")) is net
        assert (dist.world_size(), dist.rank(), dist.local_batch_size(7)) == (1, 0, 7)
        assert dist.shard(range(5)) == range(5) and dist.gather_objects("a") == ["a"] and dist.on_main(len, "ab") == 2
        with pytest.raises(FastdiffError, match="refused"):
            with dist.same_outcome():
                raise FastdiffError("refused")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1: a plain single-process run
    with dist.init_from_env("cpu"):
        assert not torch.distributed.is_initialized()


def test_a_checkpoint_of_another_world_size_resumes_on_fresh_streams(caplog):
    def state(seed):
        return torch.Generator().manual_seed(seed).get_state()

    gen = torch.Generator()
    dist.restore_rng(gen, [state(1)], salt=7, step=3)  # written by one process, resumed by one: its stream goes on
    assert torch.equal(gen.get_state(), state(1))
    draws = []
    for _ in range(2):  # written by two processes: a fresh stream, the same in every resume
        dist.restore_rng(gen, [state(1), state(2)], salt=7, step=3)
        draws.append(torch.rand(4, generator=gen))
    assert torch.equal(*draws) and "written by 2 process(es), resumed by 1" in caplog.text
    assert not any(torch.equal(draws[0], torch.rand(4, generator=torch.Generator().manual_seed(s))) for s in (1, 2))


@pytest.mark.parametrize("cores, busy, per_node, env, expected", [
    (2, 0.05, "1", None, 2),  # idle: every core
    (2, 0.5, "1", None, 1),   # one busy neighbour: the free core
    (2, 1.0, "1", None, 1),   # every core busy: still one
    (16, 0.1, "2", None, 7),  # two torchrun processes on a node with 14.4 free cores
    (2, 0.05, "1", "1", 5),   # OMP_NUM_THREADS decides (torch's pool left as it is)
])
def test_cpu_threads_follow_the_free_cores(monkeypatch, cores, busy, per_node, env, expected):
    before = torch.get_num_threads()
    chosen = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(dist, "busy_fraction", lambda: busy)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 5 if env else 64)
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", per_node)
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    assert dist.configure_cpu_threads() == expected
    assert chosen == ([] if env else [expected])
    monkeypatch.undo()
    assert torch.get_num_threads() == before


def test_busy_fraction_reads_proc_stat_deltas(monkeypatch, tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")  # user nice system idle iowait..

    def half_a_second_later(seconds):  # +90 busy (60 user, 20 system, 10 steal), +110 idle and iowait
        stat.write_text("cpu  160 0 70 900 60 0 0 10 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")

    monkeypatch.setattr(dist.time, "sleep", half_a_second_later)
    assert dist.busy_fraction(stat_path=str(stat)) == pytest.approx(90 / 200)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))  # no /proc/stat: the load average per core
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert dist.busy_fraction(stat_path=str(tmp_path / "missing")) == pytest.approx(0.25)
