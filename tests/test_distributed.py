"""torchrun + DDP on CPU (gloo, 2 processes): gradient step, sharded sampling, a distillation round and its resume.

One torchrun launch per scenario; each worker writes what it computed and the test compares it with the same
computation in this single process.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

WORKER = textwrap.dedent('''
    import dataclasses, sys, torch
    from fastdiff import distributed as D

    mode, out = sys.argv[1], sys.argv[2]
    with D.init_from_env("cpu"):
        if mode == "grad":
            from torch import nn
            torch.manual_seed(0)
            net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            model = D.wrap_ddp(net, torch.device("cpu"))
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
            b = D.local_batch_size(8)
            xs = x[D.rank() * b:(D.rank() + 1) * b]
            loss = model(xs).pow(2).mean()
            loss.backward()
            opt.step()
            if D.is_main():
                torch.save(net.state_dict(), out)
        elif mode == "sample":
            from fastdiff.analytic import GaussianDenoiser
            from fastdiff.bench import BenchConfig, Network, Spec, generate
            from fastdiff.schedules import Schedule
            sch = Schedule("cosine", 1000)
            net = Network(GaussianDenoiser(0.3, 0.5, sch, "v"), sch, "v", "gauss")
            cfg = BenchConfig(model="x", n_samples=10, batch_size=3, seed=5, clip=False)
            x, nfe, _ = generate(Spec("ddim-eta1", "linspace", 4, 1.0), net, (3,), cfg, torch.device("cpu"))
            if D.is_main():
                torch.save(x, out)
        else:
            from fastdiff.distill import PRESETS, distill
            cfg = dataclasses.replace(PRESETS["toy2d"], teacher=sys.argv[3], start_steps=2, steps_per_round=12,
                                      ckpt_every=4, eval_samples=64, bench=False, out_dir=out, batch_size=64,
                                      device="cpu", lr=1e-3 if mode == "distill-other" else 5e-4)
            def kill(r, u):
                if mode == "distill-kill" and u == 6:
                    raise SystemExit(3)
            distill(cfg, progress=False, on_step=kill)
''')


def _torchrun(tmp_path, *args, check=True):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous (stray runs on 29500 can't collide)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), str(script), *map(str, args)],
                          timeout=180, env=env, capture_output=True, text=True, check=check)


@pytest.mark.slow
def test_ddp_step_equals_one_process_step_on_the_whole_batch(tmp_path):
    from torch import nn

    _torchrun(tmp_path, "grad", tmp_path / "ddp.pt")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    net(x).pow(2).mean().backward()
    opt.step()
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for k, v in net.state_dict().items():
        assert torch.allclose(ddp[k], v, atol=1e-6), k


@pytest.mark.slow
def test_sharded_samples_equal_one_process_exactly(tmp_path):
    from fastdiff.analytic import GaussianDenoiser
    from fastdiff.bench import BenchConfig, Network, Spec, generate
    from fastdiff.schedules import Schedule

    _torchrun(tmp_path, "sample", tmp_path / "ddp.pt")
    sch = Schedule("cosine", 1000)
    net = Network(GaussianDenoiser(0.3, 0.5, sch, "v"), sch, "v", "gauss")
    cfg = BenchConfig(model="x", n_samples=10, batch_size=3, seed=5, clip=False)
    one, _, _ = generate(Spec("ddim-eta1", "linspace", 4, 1.0), net, (3,), cfg, torch.device("cpu"))
    assert torch.equal(torch.load(tmp_path / "ddp.pt", weights_only=True), one)


@pytest.mark.slow
def test_two_process_distillation_round_runs_and_resumes(tmp_path):
    from fastdiff.train import PRESETS, train

    teacher = dataclasses.replace(PRESETS["toy2d"], steps=100, hidden=32, layers=1, out_dir=str(tmp_path / "teacher"),
                                  sample_every=10_000, device="cpu")
    train(teacher, progress=False)
    run = tmp_path / "distill"
    killed = _torchrun(tmp_path, "distill-kill", run, tmp_path / "teacher", check=False)
    assert killed.returncode != 0 and (run / "state.pt").exists() and not (run / "rounds.csv").exists()
    _torchrun(tmp_path, "distill", run, tmp_path / "teacher")
    rows = list(csv.DictReader(open(run / "rounds.csv")))
    assert [(r["round"], r["student_steps"], r["updates"]) for r in rows] == [("0", "1", "24")]
    assert (run / "students" / "student_N1.pt").exists()
    # A run dir refused on rank 0 is an error on every rank, not a hang at the next barrier.
    refused = _torchrun(tmp_path, "distill-other", run, tmp_path / "teacher", check=False)
    assert refused.returncode != 0 and "holds a different config" in refused.stderr
