"""Teacher training end to end: the CLI's run dir, exact resume, guard rails, load_model, toy2d quality."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fastdiff.train as T
from fastdiff import config as cfgs
from fastdiff import runs
from fastdiff.checkpoint import load_checkpoint, load_model, save_checkpoint, weights_hash
from fastdiff.data import get_data
from fastdiff.errors import FastdiffError, run_cli
from fastdiff.samplers import ddim, make_grid
from fastdiff.schedules import Schedule

# A tiny U-Net on digits with every random stream in play: label dropout, flips, dropout.
UNET_ARGS = ["--preset", "digits", "--channels", "8", "--channel-mult", "1", "--num-res-blocks", "1",
             "--attn-resolutions", "", "--head-dim", "8", "--batch-size", "16", "--cond", "class", "--flip", "true",
             "--dropout", "0.1", "--updates", "40", "--ckpt-every", "10", "--log-every", "5", "--sample-every", "1000"]
MLP_ARGS = ["--preset", "toy2d", "--hidden", "32", "--layers", "1", "--batch-size", "16", "--updates", "20",
            "--ckpt-every", "10", "--log-every", "5"]


@pytest.fixture
def pictures(monkeypatch):
    """Skips drawing the sample pictures (matplotlib, ~0.5 s each); records (step, EMA net in train mode?).

    test_real_attention_and_sample_pictures draws real ones.
    """
    calls = []
    monkeypatch.setattr(T, "save_sample_picture",
                        lambda net, cfg, device, path, n=64: calls.append((int(path.stem.split("_")[1]), net.training)))
    return calls


def _cfg(argv, out) -> T.TrainConfig:
    return runs.config_from_argv([*argv, "--out-dir", str(out)], T.TrainConfig, T.PRESETS, "p", "d")[0]


def _snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (relative name -> bytes); {} if it does not exist. The run dir's `.lock` is left out:
    a run takes it before reading any state, and lock files are never deleted (see fastdiff.runs)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_state(a, b, where="checkpoint"):
    """Recursive torch.equal over nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _assert_same_run(run, ref, steps):
    got, want = load_checkpoint(run / "checkpoint.pt"), load_checkpoint(ref / "checkpoint.pt")
    assert got["update"] == want["update"] == steps
    for key in ("model", "ema", "optimizer", "rng"):
        _assert_same_state(got[key], want[key], key)
    rows, ref_rows = _metrics(run), _metrics(ref)
    assert [r["update"] for r in rows] == [r["update"] for r in ref_rows]  # no duplicate or missing update
    for col in ("loss", "lr", "grad_norm"):
        assert [r[col] for r in rows] == [r[col] for r in ref_rows], col


def test_cli_writes_config_metrics_and_checkpoint(tmp_path, pictures):
    run = tmp_path / "run"
    assert run_cli(T.main, [*UNET_ARGS, "--out-dir", str(run)]) == 0
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoint.prev.pt", "checkpoint.pt", "config.json",
                                                     "metrics.csv"]
    cfg = _cfg(UNET_ARGS, run)
    assert cfgs.from_dict(T.TrainConfig, json.loads((run / "config.json").read_text())) == cfg
    rows = _metrics(run)
    assert [int(r["update"]) for r in rows] == list(range(5, 41, 5))
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["update"] == 40 and ckpt["kind"] == "teacher" and ckpt["param"] == cfg.param
    assert ckpt["config"] == cfgs.to_dict(cfg) and ckpt["data_shape"] == [1, 8, 8]
    assert not all(torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["model"])
    assert pictures == [(40, False)]  # drawn at the end, from the EMA net in eval mode (no dropout)


def test_resume_after_interrupts_equals_an_uninterrupted_run(tmp_path, pictures, capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    T.train(_cfg(UNET_ARGS, ref), progress=False)

    # 1) Ctrl-C through the CLI at step 27 (between checkpoints 20 and 30), raised from the picture hook
    def interrupt(net, cfg, device, path, n=64):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "save_sample_picture", interrupt)
        assert run_cli(T.main, [*UNET_ARGS, "--sample-every", "27", "--out-dir", str(run)]) == 130
    assert "re-run the same command to resume" in capsys.readouterr().err
    assert load_checkpoint(run / "checkpoint.pt")["update"] == 20
    assert [int(r["update"]) for r in _metrics(run)][-1] == 25  # logged past the checkpoint, trimmed on resume

    # 2) resume, then stop again at step 33 through train()'s callback
    def stop_at_33(step):
        if step == 33:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train(_cfg(UNET_ARGS, run), progress=False, on_step=stop_at_33)
    assert load_checkpoint(run / "checkpoint.pt")["update"] == 30

    # 3) resume to the end
    assert run_cli(T.main, [*UNET_ARGS, "--out-dir", str(run)]) == 0
    _assert_same_run(run, ref, 40)


def test_finished_run_is_left_alone_and_more_steps_extend_it(tmp_path, pictures):
    run = tmp_path / "run"
    T.train(_cfg(MLP_ARGS, run), progress=False)
    before, calls = _snapshot(run), len(pictures)
    mtime = (run / "checkpoint.pt").stat().st_mtime_ns
    assert run_cli(T.main, [*MLP_ARGS, "--out-dir", str(run)]) == 0
    assert _snapshot(run) == before and (run / "checkpoint.pt").stat().st_mtime_ns == mtime
    assert len(pictures) == calls
    # steps, log/ckpt/sample periods and the device do not change the result: a larger --steps continues
    ref = tmp_path / "ref"
    T.train(_cfg([*MLP_ARGS, "--updates", "30"], ref), progress=False)
    assert run_cli(T.main, [*MLP_ARGS, "--updates", "30", "--out-dir", str(run)]) == 0
    _assert_same_run(run, ref, 30)


def test_run_dir_with_another_config_is_refused(tmp_path, pictures, capsys):
    run = tmp_path / "run"
    T.train(_cfg(MLP_ARGS, run), progress=False)
    before = _snapshot(run)
    capsys.readouterr()
    assert run_cli(T.main, [*MLP_ARGS, "--lr", "0.5", "--out-dir", str(run)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: run dir") and "lr: 0.002 -> 0.5" in err[0]
    assert "another --out-dir" in err[0]
    assert _snapshot(run) == before


def _cuda_arg():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here, so --device cuda is valid")
    return ["--device", "cuda"]


BAD_INPUTS = {
    "unknown preset": (["--preset", "huge"], "unknown preset 'huge'; choose one of"),
    "bad float": (["--lr", "abc"], "--lr: cannot read 'abc' as float"),
    "bad tuple": (["--channel-mult", "x"], "--channel-mult: cannot read 'x' as int"),
    "unknown flag": (["--learning-rate", "1"], "unrecognized arguments: --learning-rate 1 (see --help)"),
    "missing value": (["--updates"], "--updates: expected one argument"),
    "bad enum": (["--param", "foo"], "--param 'foo' is not one of eps, x0, v"),
    "bad weighting": (["--weighting", "l1"], "--weighting 'l1' is not one of"),
    "zero steps": (["--updates", "0"], "--updates must be >= 1, got 0"),
    "unknown data set": (["--dataset", "mnist"], "unknown data set 'mnist'; choose one of"),
    "unknown toy kind": (["--preset", "toy2d", "--dataset", "toy2d:spiral"], "unknown toy2d kind 'spiral'"),
    "cifar10 not here": (["--dataset", "cifar10"], "cifar10 needs a local copy: download CIFAR-10"),
    "no images": (["--dataset", "folder"], "no images"),
    "arch mismatch": (["--preset", "toy2d", "--arch", "unet"], "--arch unet does not fit data set 'toy2d'"),
    "labels needed": (["--preset", "toy2d", "--dataset", "toy2d:swissroll", "--cond", "class"], "has no labels"),
    "bad ema": (["--ema-decay", "1.0"], "--ema-decay must be in [0, 1), got 1.0"),
    "no cuda": (None, "CUDA is not available here; use --device cpu"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    argv, message = BAD_INPUTS[case]
    out = tmp_path / "out"
    assert run_cli(T.main, [*(argv or _cuda_arg()), "--out-dir", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], captured.err
    assert captured.out == ""
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_output_dir_that_cannot_be_created(tmp_path, capsys):
    # Tests run as root, where a chmod'ed folder stays writable; a path under a regular file never is.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run_cli(T.main, [*MLP_ARGS, "--out-dir", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write to output dir") and str(blocker) in err[0]
    assert _snapshot(tmp_path) == {"file": b"x"}


@pytest.mark.parametrize("content", ["garbage", "both-truncated"])
def test_unreadable_checkpoints_are_named_and_nothing_written(tmp_path, pictures, capsys, content):
    run = tmp_path / "run"
    if content == "both-truncated":
        T.train(_cfg([*MLP_ARGS, "--ckpt-every", "10"], run), progress=False)
        for name in ("checkpoint.pt", "checkpoint.prev.pt"):
            data = (run / name).read_bytes()
            (run / name).write_bytes(data[: len(data) // 2])
        (run / "config.json").unlink()
    else:
        run.mkdir()
        (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    before = _snapshot(run)
    capsys.readouterr()
    assert run_cli(T.main, [*MLP_ARGS, "--updates", "30", "--out-dir", str(run)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: no readable checkpoint") and "corrupt" in err[0]
    assert str(run / "checkpoint.pt") in err[0] and str(run / "checkpoint.prev.pt") in err[0]
    assert _snapshot(run) == before


def test_truncated_latest_checkpoint_resumes_from_the_previous_one(tmp_path, pictures, caplog):
    """A latest checkpoint cut short (a kill or a full disk mid-copy) costs one checkpoint interval, not the run."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    argv = [*MLP_ARGS, "--ckpt-every", "10", "--log-every", "5"]
    T.train(_cfg(argv, run), progress=False)  # 20 steps: checkpoint.pt at 20, checkpoint.prev.pt at 10
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    seen = []
    T.train(_cfg([*argv, "--updates", "30"], run), progress=False, on_step=seen.append)
    assert seen[0] == 11 and "resuming from the previous checkpoint" in caplog.text
    assert (run / "checkpoint.pt.corrupt").exists()  # set aside, so the next save keeps the good one as .prev
    T.train(_cfg([*argv, "--updates", "30"], ref), progress=False)
    _assert_same_run(run, ref, 30)


def test_no_warmup(tmp_path, pictures):
    cfg = _cfg([*MLP_ARGS, "--warmup", "0", "--updates", "2", "--log-every", "1"], tmp_path / "r")
    run = T.train(cfg, progress=False)
    assert [float(r["lr"]) for r in _metrics(run)] == [T.PRESETS["toy2d"].lr] * 2


def test_metrics_log_is_rewritten_by_rank_0_only(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    path.write_text("update,loss\n1,0.5\n2,0.4\n")
    monkeypatch.setattr(runs.dist, "is_main", lambda: False)
    runs.MetricsLog(path, ["update", "loss"], resume_step=1).append({"update": 3, "loss": 0.3})
    assert path.read_text() == "update,loss\n1,0.5\n2,0.4\n"
    monkeypatch.setattr(runs.dist, "is_main", lambda: True)
    runs.MetricsLog(path, ["update", "loss"], resume_step=1).append({"update": 2, "loss": 0.3})
    assert path.read_text().splitlines() == ["update,loss", "1,0.5", "2,0.3"]


def test_metrics_log_of_an_earlier_version_is_read_with_its_old_column_name(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss\n1,0.5\n2,0.4\n")  # fastdiff before 0.2 called optimiser updates "step"
    runs.MetricsLog(path, ["update", "loss"], resume_step=1)
    assert path.read_text().splitlines() == ["update,loss", "1,0.5"]


def test_load_model_gives_the_ema_net_with_schedule_and_param(tmp_path, pictures):
    run = tmp_path / "run"
    T.train(_cfg([*UNET_ARGS, "--schedule", "linear", "--T", "500", "--param", "x0"], run), progress=False)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    lm = load_model(run)
    assert lm.schedule == Schedule("linear", 500) and lm.param == "x0" and lm.dataset == "digits"
    assert lm.kind == "teacher" and lm.data_shape == (1, 8, 8) and lm.path == run / "checkpoint.pt"
    assert lm.hash == weights_hash(ckpt, ckpt["ema"]) and len(lm.hash) == 12
    ckpt["optimizer"] = {}  # the same weights in another file: the same model id
    save_checkpoint(tmp_path / "copy.pt", ckpt)
    assert load_model(tmp_path / "copy.pt").hash == lm.hash != load_model(run, use_ema=False).hash
    assert not lm.net.training and not any(p.requires_grad for p in lm.net.parameters())
    _assert_same_state(lm.net.state_dict(), ckpt["ema"])
    _assert_same_state(load_model(run / "checkpoint.pt", use_ema=False).net.state_dict(), ckpt["model"])
    x = torch.randn(3, 1, 8, 8)
    out = lm.net(x, torch.full((3,), 0.5), torch.tensor([0, 1, 10]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_load_model_errors(tmp_path):
    with pytest.raises(FastdiffError, match="does not exist"):
        load_model(tmp_path)
    with pytest.raises(FastdiffError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(FastdiffError, match="not a fastdiff checkpoint"):
        load_model(tmp_path / "other.pt")


class _RunsCodeWhenUnpickled:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _RunsCodeWhenUnpickled.ran = True


def test_checkpoints_load_with_weights_only(tmp_path):
    """A checkpoint that would run code when unpickled is refused, and the code does not run."""
    path = tmp_path / "evil.pt"
    save_checkpoint(path, {"config": {}, "model": {}, "payload": _RunsCodeWhenUnpickled()})
    with pytest.raises(FastdiffError, match="corrupt or not a fastdiff checkpoint"):
        load_model(path)
    assert not _RunsCodeWhenUnpickled.ran


def test_sigkill_mid_run_then_resume(tmp_path):
    """A real `python -m fastdiff.train`, killed with SIGKILL, resumes to the uninterrupted result."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    argv = [*MLP_ARGS, "--updates", "100000", "--ckpt-every", "20", "--log-every", "1", "--sample-every", "100000"]
    # one thread, as in this process: the comparison below is bitwise
    code = ("import torch, runpy; torch.set_num_threads(1); "  # as `python -m fastdiff.train` runs it
            "runpy.run_module('fastdiff.train', run_name='__main__', alter_sys=True)")
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", code, *argv, "--out-dir", str(run)],
                                cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            rows = _metrics(run) if (run / "checkpoint.pt").exists() else []
            if rows and int(rows[-1]["update"]) >= 45 and int(rows[-1]["update"]) % 20:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the training process ended early: {log.read_text()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    step = load_checkpoint(run / "checkpoint.pt")["update"]
    assert step >= 40 and int(_metrics(run)[-1]["update"]) >= step
    final = ["--updates", str(step + 20)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "save_sample_picture", lambda *a, **k: None)
        assert run_cli(T.main, [*argv, *final, "--out-dir", str(run)]) == 0
        T.train(_cfg([*argv, *final], ref), progress=False)
    _assert_same_run(run, ref, step + 20)


@pytest.mark.parametrize("preset", ["digits", "toy2d"])
def test_real_attention_and_sample_pictures(tmp_path, preset):
    args = UNET_ARGS + ["--attn-resolutions", "8"] if preset == "digits" else MLP_ARGS
    run = T.train(_cfg([*args, "--updates", "4", "--sample-every", "2"], tmp_path / "run"), progress=False)
    pictures = sorted(p.name for p in run.glob("samples_*.png"))
    assert pictures == ["samples_0000002.png", "samples_0000004.png"]
    assert all((run / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)


def _sliced_wasserstein(a: np.ndarray, b: np.ndarray, n_proj: int = 256) -> float:
    """SW2 between two equal-size point clouds: sorted projections on fixed random directions."""
    d = np.random.default_rng(0).standard_normal((a.shape[1], n_proj))
    d /= np.linalg.norm(d, axis=0)
    return float(np.sqrt(((np.sort(a @ d, 0) - np.sort(b @ d, 0)) ** 2).mean()))


@pytest.mark.slow
def test_toy2d_preset_learns_the_eight_gaussians(tmp_path, pictures):
    # The preset with 500 of its 4000 steps (~15 s here), DDIM with 32 steps. Measured SW2 to the test split on
    # 2000 points: 0.12 (0.10 after 700 steps); an untrained net 0.63, N(0, I) 0.34, two data samples 0.07.
    cfg = dataclasses.replace(T.PRESETS["toy2d"], updates=500, out_dir=str(tmp_path / "run"))
    assert run_cli(T.main, ["--preset", "toy2d", "--updates", "500", "--out-dir", cfg.out_dir]) == 0
    lm = load_model(cfg.out_dir)
    test = get_data("toy2d", "test").x[:2000].numpy()
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    grid = make_grid("student", 32, lm.schedule)
    torch.manual_seed(0)  # the untrained net's weights
    with torch.no_grad():
        trained, untrained = (ddim(net, noise, grid, schedule=lm.schedule, param=lm.param).x.numpy()
                              for net in (lm.net, T.build_network(cfg).eval()))
    assert _sliced_wasserstein(trained, test) < 0.2 < _sliced_wasserstein(untrained, test)
    assert _sliced_wasserstein(noise.numpy(), test) > 0.2
    # Samples within 3 std (0.3) of a mode: 48 % (>= 5 % at each of the 8) here, 12 % for N(0, I), ~99 % for data.
    centers = 1.5 * np.array([(math.cos(a), math.sin(a)) for a in np.arange(8) * math.pi / 4])
    dist = np.linalg.norm(trained[:, None] - centers[None], axis=2)
    near = dist.min(1) < 0.3
    assert near.mean() > 0.35
    assert np.bincount(dist.argmin(1)[near], minlength=8).min() > 0.04 * len(trained)


def test_run_dir_from_an_older_version_without_a_new_field_resumes(tmp_path):
    """A config.json written before a field existed is accepted while that field keeps its default."""
    config = cfgs.to_dict(T.TrainConfig(out_dir=str(tmp_path)))
    old = {k: v for k, v in config.items() if k != "scalar_cond"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    runs.prepare_run_dir(tmp_path, config, T.NON_RESULT_FIELDS, cfgs.to_dict(T.TrainConfig()))
    with pytest.raises(FastdiffError, match="scalar_cond"):
        runs.prepare_run_dir(tmp_path, {**config, "scalar_cond": True}, T.NON_RESULT_FIELDS,
                             cfgs.to_dict(T.TrainConfig()))


def test_run_dir_and_checkpoint_of_fastdiff_before_the_renames_still_load_and_resume(tmp_path, pictures):
    """Before 0.2 TrainConfig said `steps` for optimiser updates, metrics.csv `step`, and checkpoints did not describe
    their network: such a run dir resumes, and its checkpoint loads with the same model id."""
    run = tmp_path / "run"
    T.train(_cfg(MLP_ARGS, run), progress=False)
    hash_now = load_model(run).hash
    config = json.loads((run / "config.json").read_text())
    old_config = {("steps" if k == "updates" else k): v for k, v in config.items()}
    (run / "config.json").write_text(json.dumps(old_config))
    (run / "metrics.csv").write_text((run / "metrics.csv").read_text().replace("update,", "step,", 1))
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        ckpt = load_checkpoint(run / name)
        ckpt["config"] = {("steps" if k == "updates" else k): v for k, v in ckpt["config"].items()}
        del ckpt["network"]
        save_checkpoint(run / name, ckpt)
    assert load_model(run).hash == hash_now
    T.train(_cfg([*MLP_ARGS, "--updates", "30"], run), progress=False)
    assert [int(r["update"]) for r in _metrics(run)] == [5, 10, 15, 20, 25, 30]


def test_dry_run_says_what_would_run_and_writes_nothing(tmp_path, capsys, pictures):
    run = tmp_path / "run"
    assert run_cli(T.main, [*MLP_ARGS, "--out-dir", str(run), "--dry-run"]) == 0
    assert "updates 0 -> 20" in capsys.readouterr().out and not run.exists()
    T.train(_cfg(MLP_ARGS, run), progress=False)
    before = _snapshot(run)
    assert run_cli(T.main, [*MLP_ARGS, "--updates", "30", "--out-dir", str(run), "--dry-run"]) == 0
    assert "updates 20 -> 30" in capsys.readouterr().out and _snapshot(run) == before
    assert run_cli(T.main, [*MLP_ARGS, "--lr", "0.5", "--out-dir", str(run), "--dry-run"]) == 2  # another config
    (run / "checkpoint.pt").write_bytes(b"truncated")  # the fallback is reported, the corrupt file left in place
    before = _snapshot(run)
    assert run_cli(T.main, [*MLP_ARGS, "--updates", "30", "--out-dir", str(run), "--dry-run"]) == 0
    assert "updates 10 -> 30" in capsys.readouterr().out and _snapshot(run) == before
