"""What every long-running CLI (train, distill, bench) shares: the config from argv (with --dry-run), the device, the
run dir and its CSV logs, one writer per run dir, a graceful stop on SIGTERM/SIGINT agreed between the ranks, and
`fit()`, the one optimiser loop that teacher training and every distiller run on.

- `run_lock(folder)`: an exclusive `fcntl.flock` on `folder/.lock`. The kernel drops it when the process dies,
  so a killed run never leaves a stale lock; a second process is refused at once with the holder's pid, host
  and start time. Under torchrun only rank 0 locks (the others never write).
- `graceful_stop()`: while it is active, SIGTERM (what SLURM and Kubernetes send before preemption) and SIGINT
  (Ctrl-C) only set a flag; the loops poll `stop_requested()` at safe points (after an update, after a sampling
  batch), write their state and raise `Preempted`, which the CLI turns into exit code 128 + signal (143, 130).
  A second signal stops at once (the last checkpoint on disk is intact: every write is atomic).
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import datetime
import fcntl
import io
import json
import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from fastdiff import config as cfgs
from fastdiff import distributed as dist
from fastdiff.checkpoint import save_checkpoint
from fastdiff.errors import FastdiffError, Preempted
from fastdiff.io import atomic_path, write_errors

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_stop_signal: int | None = None


def _holder(fd: int) -> str:
    """The lock file's description of the process holding it (written by that process)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} (started {info['started']})"
    except (OSError, ValueError, KeyError):
        return "another process"


@contextmanager
def run_lock(folder: str | os.PathLike, option: str = "--out-dir"):
    """Hold an exclusive lock on `folder` (created if needed) for the block; FastdiffError if another process
    holds it. No-op off rank 0."""
    if not dist.is_main():
        yield
        return
    folder = Path(folder)
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise FastdiffError(f"cannot write to {str(folder)!r} ({err.strerror}); choose a writable {option}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FastdiffError(f"{str(folder)!r} is in use by {_holder(fd)}; wait for that run to finish or stop "
                                f"it, or choose another {option}") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only the holder's description is missing
        yield
    finally:
        os.close(fd)  # releases the lock


def _on_signal(signum, frame) -> None:
    global _stop_signal
    if _stop_signal is not None:  # a second signal: the user (or the scheduler) wants out now
        raise Preempted(signum, "at once (second signal); the last checkpoint on disk is intact")
    _stop_signal = signum
    log.warning("%s received: stopping at the next safe point (send it again to stop at once)",
                signal.Signals(signum).name)


@contextmanager
def graceful_stop():
    """Turn SIGTERM/SIGINT into a stop request for the block (main thread only; elsewhere a no-op)."""
    global _stop_signal
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _stop_signal = None


def request_stop(signum: int = signal.SIGTERM) -> None:
    """Ask the running loop to stop at its next safe point, as the signal `signum` would."""
    global _stop_signal
    _stop_signal = signum


def stop_requested(device: torch.device | str = "cpu") -> int | None:
    """The signal asking this run to stop, or None; under torchrun agreed by all ranks (the largest signal
    number any rank received), so every rank stops after the same update. A collective: call it on every rank."""
    local = _stop_signal or 0
    if dist.world_size() > 1:
        flag = torch.tensor([local], device=device if torch.device(device).type == "cuda" else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        local = int(flag.item())
    return local or None


def stop_if_requested(device, save, where: str) -> None:
    """At a safe point: if a stop was asked for, run `save()` (write the checkpoint or rows owed) and raise
    Preempted(where)."""
    signum = stop_requested(device)
    if signum is not None:
        save()
        dist.barrier()
        raise Preempted(signum, where)


def set_deterministic(on: bool) -> None:
    """--deterministic: deterministic CUDA algorithms (cuBLAS workspace, no cuDNN autotuning), so that a resumed
    CUDA run ends bit-identical to an uninterrupted one. CPU runs are bit-exact without it at a fixed thread count."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def config_from_argv(argv: Sequence[str] | None, cls, presets: dict, prog: str, description: str,
                     default_preset: str = "digits"):
    """Parse `--preset NAME`, `--dry-run` and field overrides into a frozen config; -> (config, parsed args)."""
    parser = cfgs.make_parser(prog, description)
    parser.add_argument("--preset", default=default_preset,
                        help=f"one of {', '.join(presets)} (default: {default_preset})")
    parser.add_argument("--dry-run", action="store_true", help="check the inputs, say what would run; write nothing")
    cfgs.add_dataclass_args(parser, cls)
    args = parser.parse_args(argv)
    if args.preset not in presets:
        raise FastdiffError(f"unknown preset {args.preset!r}; choose one of {', '.join(presets)}")
    return cfgs.replace(presets[args.preset], cfgs.overrides_from_args(cls, args)), args


def resolve_device(name: str) -> torch.device:
    """--device auto|cpu|cuda[:N] as a torch.device (under torchrun: this process's own GPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FastdiffError(f"--device {name}: CUDA is not available here; use --device cpu")
    return dist.local_device(torch.device(name))


def prepare_run_dir(out_dir, config: dict, ignore: Sequence[str], defaults: dict | None = None,
                    renamed: dict[str, str] | None = None, normalize: Callable[[dict], dict] | None = None) -> Path:
    """Create/check a run dir: refuse one whose config.json differs in a field that matters (`check_run_dir`),
    then make sure the folder can be written."""
    run = Path(out_dir)
    check_run_dir(run, config, ignore, defaults, renamed, normalize)
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise FastdiffError(f"cannot write to output dir {str(run)!r} ({err.strerror}); choose a writable "
                            "--out-dir") from None
    return run


def check_run_dir(run: Path, config: dict, ignore: Sequence[str], defaults: dict | None = None,
                  renamed: dict[str, str] | None = None, normalize: Callable[[dict], dict] | None = None) -> None:
    """FastdiffError if run/config.json holds a config that differs from `config` in a field not in `ignore`.

    A field missing from an older config.json (a run from an earlier fastdiff) is fine while the new value is
    that field's default in `defaults`, which is what the older version did; `renamed` maps old field names and
    `normalize` rewrites the old dict's values (e.g. a relative path an earlier version stored) before comparing."""
    cfg_path = Path(run) / "config.json"
    if cfg_path.exists():
        try:
            old = json.loads(cfg_path.read_text())
            old = {(renamed or {}).get(k, k): v for k, v in old.items()}  # names of an earlier version
            old = normalize(old) if normalize is not None else old
        except json.JSONDecodeError:
            raise FastdiffError(f"{cfg_path} is not valid JSON; delete the run dir or choose another "
                                "--out-dir") from None
        added = {k for k in config if k not in old and defaults is not None and k in defaults
                 and config[k] == defaults[k]}
        keep = lambda d: {k: v for k, v in d.items() if k not in ignore and k not in added}  # noqa: E731
        changes = cfgs.diff(keep(old), keep(config))
        if changes:
            raise FastdiffError(f"run dir {str(run)!r} holds a different config ({'; '.join(changes[:3])}); "
                                "use another --out-dir or delete that one")


class MetricsLog:
    """Append-only CSV of training metrics that a resume trims back (atomically) to the checkpoint's update.

    A file of fastdiff before 0.2, whose key column was `step`, is read with that column as `update`."""

    def __init__(self, path: Path, fields: Sequence[str], resume_step: int, key: str = "update"):
        self.path, self.fields = path, list(fields)
        if not dist.is_main():
            return  # only rank 0 touches the file; a second writer could truncate it mid-rewrite
        rows = []
        if path.exists():
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    if key not in row and "step" in row:
                        row[key] = row.pop("step")
                    try:
                        if int(row[key]) <= resume_step and None not in row.values():
                            rows.append(row)
                    except (KeyError, TypeError, ValueError):
                        continue  # a row cut short by a kill
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in self.fields} for r in rows)

    def append(self, row: dict) -> None:
        if dist.is_main():
            line = io.StringIO()
            csv.DictWriter(line, self.fields).writerow(row)
            # A full disk: at worst a row cut short, which a resume drops.
            with write_errors(self.path, len(line.getvalue())), open(self.path, "a", newline="") as f:
                f.write(line.getvalue())


class RoundLog:
    """rounds.csv (or any per-stage table), rewritten atomically: one row per value of the integer column `key`
    (a finished round) or of a tuple of integer columns, never duplicated."""

    def __init__(self, path: Path, fields: Sequence[str], key: str | tuple[str, ...] = "round"):
        self.path, self.fields = path, list(fields)
        self.key = (key,) if isinstance(key, str) else tuple(key)
        self.rows = []
        if path.exists():
            with open(path, newline="") as f:
                self.rows = list(csv.DictReader(f))

    def done(self, r: int) -> bool:
        return any(self._key(row) == self._key_of(r) for row in self.rows)

    def _key(self, row: dict) -> tuple[int, ...]:
        return tuple(int(row[k]) for k in self.key)

    def _key_of(self, r) -> tuple[int, ...]:
        return tuple(r) if isinstance(r, tuple) else (int(r),)

    def add(self, row: dict) -> None:
        self.rows = [x for x in self.rows if self._key(x) != self._key(row)] + [row]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows(sorted(self.rows, key=self._key))


@dataclass
class Fitted:
    """What `fit` hands back: the mean of the last 50 losses (of the last network trained in an update), the stage's
    wall-clock seconds (resumes included), and the EMAs it kept ({name: module})."""

    loss: float
    seconds: float
    emas: dict = dataclasses.field(default_factory=dict)


@dataclass
class Trained:
    """One network `fit` trains: its optimiser, its loss `loss_fn(model)` (model = `net`, DDP-wrapped under torchrun;
    the function draws its own batch and noise), and `steps`, its optimiser steps per update (e.g. 5 critic steps
    per generator step). `lr_at` and `grad_clip` default to fit's."""

    net: torch.nn.Module
    opt: torch.optim.Optimizer
    loss_fn: Callable[[torch.nn.Module], torch.Tensor]
    steps: int = 1
    lr_at: Callable[[int], float] | None = None
    grad_clip: float | None = None


def fit(net: torch.nn.Module | dict[str, Trained], opt: torch.optim.Optimizer | None = None, *, total: int,
        loss_fn: Callable[[torch.nn.Module], torch.Tensor] | None = None, lr_at: Callable[[int], float],
        gen: torch.Generator, salt: int, device: torch.device, state_path: Path,
        ckpt_every: int, label: str, resume: dict | None = None, extra_state: Callable[[], dict] = dict,
        after_update: Callable[[int, float, float, torch.Tensor | None], None] | None = None,
        on_step: Callable[[int], None] | None = None, grad_clip: float | None = None, accumulate: int = 1,
        autocast: bool = False, progress: bool = True,
        emas: dict[str, tuple] | None = None) -> Fitted:
    """The one optimiser loop of fastdiff: teacher training and every distiller run their updates through it.

    It trains one network (`net`, `opt`, `loss_fn`) or a set of named ones (`net` = {name: Trained}): one update runs
    each in order, `steps` optimiser steps each (a method's update schedule: k critic steps, then the student's).
    Each optimiser step sets the learning rate `lr_at(update)`, evaluates the loss on `accumulate` micro-batches (DDP
    syncs the gradients of the last one only), stops on a non-finite loss, clips the gradient norm to `grad_clip` if
    given and steps the optimiser; bf16 autocast on CUDA with `autocast`. `emas` {name: (trained name, decay)}: EMAs
    of any trained network, updated after every update (e <- decay e + (1 - decay) p), saved and restored with it
    and returned in Fitted.emas; (trained name, decay, module) keeps the EMA in `module` (a copy of the network the
    caller made: a method that samples its EMA while training, for snapshots). Then `after_update(update, loss, lr, grad_norm)` (of the last network: a method's
    bookkeeping, logging), a checkpoint every `ckpt_every` updates and at the end (`state_path`, the previous one
    kept: every network and optimiser, the EMAs, update, every RNG stream, the recent losses, the wall-clock and
    `extra_state()`), `on_step`, and a graceful stop if SIGTERM/SIGINT asked for one (agreed by every rank;
    Preempted after the checkpoint).

    `resume` is a checkpoint this loop wrote (or None): the loop goes on from its update with the same random
    streams, so a resumed run ends bit-identical to an uninterrupted one. Raises FastdiffError on a non-finite loss.
    One network is saved under the keys `model` and `optimizer` (as fastdiff always has); a set under `modules` and
    `optimizers` by name.
    """
    trained = net if isinstance(net, dict) else {"model": Trained(net, opt, loss_fn)}
    if not trained or any(t.steps < 1 for t in trained.values()):
        raise FastdiffError(f"{label}: fit needs at least one network, each with steps >= 1")
    kept = {name: (spec[2] if len(spec) > 2 else copy.deepcopy(trained[spec[0]].net)).eval().requires_grad_(False)
            for name, spec in (emas or {}).items()}
    decays = {name: (spec[0], spec[1]) for name, spec in (emas or {}).items()}
    update, recent, wall = (_resume(resume, trained, kept, gen, device, salt) if resume is not None
                            else (0, [], 0.0))
    if resume is not None:
        log.info("resuming %s at update %d/%d", label, update, total)
    t0, saved = time.perf_counter() - wall, update

    def save() -> None:
        nonlocal saved
        rng = dist.capture_streams(gen, device)  # a collective: every rank
        if dist.is_main() and saved != update:
            if set(trained) == {"model"}:
                nets = {"model": trained["model"].net.state_dict(), "optimizer": trained["model"].opt.state_dict()}
            else:
                nets = {"modules": {k: t.net.state_dict() for k, t in trained.items()},
                        "optimizers": {k: t.opt.state_dict() for k, t in trained.items()}}
            save_checkpoint(state_path, {**extra_state(), **nets,
                                         **({"emas": {k: e.state_dict() for k, e in kept.items()}} if kept else {}),
                                         "update": update, "rng": rng, "recent": recent,
                                         "wall_clock_s": time.perf_counter() - t0}, keep_previous=True)
        saved = update

    steps = {name: (t, _Update(t.net, dist.wrap_ddp(t.net, device), t.opt, t.loss_fn,
                               grad_clip if t.grad_clip is None else t.grad_clip, accumulate,
                               autocast and device.type == "cuda",
                               f"in {label}" + ("" if len(trained) == 1 else f" ({name})"), state_path))
             for name, t in trained.items()}
    # The bar closes on any exit, so that an error line starts on a line of its own.
    with tqdm(total=total, initial=update, desc=label, disable=not progress or not dist.is_main(),
              dynamic_ncols=True) as bar:
        while update < total:
            for t, step in steps.values():
                lr = (t.lr_at or lr_at)(update)
                for _ in range(t.steps):
                    value, grad_norm = step(lr, update)
            with torch.no_grad():
                for name, (src, decay) in decays.items():
                    for pe, p in zip(kept[name].parameters(), trained[src].net.parameters()):
                        pe.lerp_(p, 1 - decay)
            update += 1
            recent = (recent + [value])[-50:]
            bar.update(1)
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
            # The method's own bookkeeping, the checkpoint (the final state too: a file lost later is rebuilt from
            # it), then a stop request if one came.
            if after_update is not None:
                after_update(update, value, lr, grad_norm)
            if update % ckpt_every == 0 or update == total:
                save()
            if on_step is not None:
                on_step(update)
            if update < total:
                stop_if_requested(device, save, f"in {label} at update {update}/{total}; checkpoint {state_path}")
    return Fitted(sum(recent) / max(len(recent), 1), time.perf_counter() - t0, kept)


def _resume(state: dict, trained: dict[str, Trained], kept: dict, gen: torch.Generator, device,
            salt: int) -> tuple[int, list[float], float]:
    """Load what fit saved into the networks, optimisers, EMAs and RNG streams; -> (update, recent losses,
    wall-clock s)."""
    if "modules" in state:
        for name, t in trained.items():
            t.net.load_state_dict(state["modules"][name])
            t.opt.load_state_dict(state["optimizers"][name])
    else:
        trained["model"].net.load_state_dict(state["model"])
        trained["model"].opt.load_state_dict(state["optimizer"])
    for name, module in kept.items():
        module.load_state_dict(state["emas"][name])
    rng = state["rng"]
    dist.restore_streams(rng if isinstance(rng, dict) else {"data": rng, "torch": [torch.get_rng_state()]},
                         gen, device, salt, update_of(state))  # (a list: a state of fastdiff before 0.2)
    return update_of(state), list(state.get("recent", [])), state.get("wall_clock_s", 0.0)


def update_of(state: dict) -> int:
    """The optimiser updates a state checkpoint (state.pt, a teacher's checkpoint.pt) holds: its key `update`, or
    `step` in files of earlier versions."""
    return int(state["update"] if "update" in state else state["step"])


@dataclass
class _Update:
    """One optimiser update of `fit`: the loss over `accumulate` micro-batches (DDP syncs the last one's gradients
    only), the non-finite guard, the optional gradient clip and the step. -> (mean loss, grad norm or None)."""

    net: torch.nn.Module
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    loss_fn: Callable[[torch.nn.Module], torch.Tensor]
    grad_clip: float | None
    accumulate: int
    autocast: bool
    where: str
    state_path: Path

    def __call__(self, lr: float, update: int) -> tuple[float, torch.Tensor | None]:
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(self.accumulate):
            last = micro == self.accumulate - 1
            with contextlib.nullcontext() if last or self.model is self.net else self.model.no_sync():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                    loss = self.loss_fn(self.model)
                if not torch.isfinite(loss):
                    raise FastdiffError(f"loss became {loss.item()} {self.where} at update {update}; the last good "
                                        f"checkpoint {self.state_path} is kept: lower --lr and re-run")
                (loss / self.accumulate if self.accumulate > 1 else loss).backward()
            total += loss.item()
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
                     if self.grad_clip is not None else None)
        self.opt.step()
        return total / self.accumulate, grad_norm
