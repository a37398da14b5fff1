"""Attention dispatch table: the fastest self-attention implementation per shape, measured once per device.

`choose(q, k, v)` names an implementation and `run(name, q, k, v)` calls it; `fastdiff.ops.attention` uses both
for self-attention in its `auto` mode. On CUDA the first call for a key (device, versions, dtype, forward or
forward+backward, batch bucket, heads, N, d) times every candidate on the call's own tensors and keeps the winner
in memory and in a JSON file; later calls are a dict lookup (no synchronisation, no file I/O), so they can run
inside a CUDA graph capture. The file (`$FASTDIFF_DISPATCH_CACHE`, default `$FASTDIFF_CACHE/` or
`~/.cache/fastdiff/` + `attention-dispatch.json`) holds {"version": 1, "entries": {key: {"winner": name,
"times_us": {name: median µs}}}}. `FASTDIFF_DISPATCH=off` measures nothing and keeps the default choice (Triton
where it applies, else SDPA's own backend choice). Importing this module does not import Triton.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
import statistics
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastdiff.errors import FastdiffError
from fastdiff.io import cache_dir, write_text

log = logging.getLogger(__name__)

CACHE_NAME = "attention-dispatch.json"
CACHE_VERSION = 1
DISPATCH_MODES = ("on", "off")
WARMUP, REPEATS = 3, 10

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_TABLE: dict[str, str] = {}  # key -> winner, this process's view of the cache file


def _triton(q, k, v):
    from fastdiff.kernels.attention import attention as flash_attention

    return flash_attention(q, k, v)


def _sdpa_backend(backend: SDPBackend) -> Attention:
    """SDPA restricted to one backend; it raises RuntimeError where that backend does not support the inputs."""
    def attend(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return attend


# each (B, heads, N, d) q, k, v -> (B, heads, N, d) softmax(q k^T / sqrt(d)) v
CANDIDATES: dict[str, Attention] = {
    "triton": _triton,
    "sdpa-flash": _sdpa_backend(SDPBackend.FLASH_ATTENTION),
    "sdpa-efficient": _sdpa_backend(SDPBackend.EFFICIENT_ATTENTION),
    "sdpa-cudnn": _sdpa_backend(SDPBackend.CUDNN_ATTENTION),
    "sdpa-math": _sdpa_backend(SDPBackend.MATH),
}
IMPLEMENTATIONS: dict[str, Attention] = {"sdpa": F.scaled_dot_product_attention, **CANDIDATES}


def run(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) q, k, v -> (B, heads, N, d) attention by the implementation `name` (a key of
    IMPLEMENTATIONS: "sdpa" is SDPA with its default backend choice). ValueError for an unknown name."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[name](q, k, v)


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.cache
def _triton_version() -> str:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _needs_grad(q, k, v) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, triton: bool = True) -> str:
    """(B, heads, N, d) q on CUDA -> the table key, e.g. "NVIDIA H200|torch 2.14.1|triton 3.8.0|float16|fwd|B<=4|
    heads=8|N=256|d=64". B is rounded up to a power of two (the first batch seen in a bucket is the one timed), so
    the table stays small; "fwd+bwd" when autograd will differentiate the call, whose backward is then timed too;
    "triton -" when Triton is not installed or not a candidate (`triton` False)."""
    b, heads, n, d = q.shape
    bucket = 1 << max(b - 1, 0).bit_length()
    passes = "fwd+bwd" if _needs_grad(q, k, v) else "fwd"
    return (f"{_device_name(q.device.index)}|torch {torch.__version__}|triton {_triton_version() if triton else '-'}|"
            f"{str(q.dtype).removeprefix('torch.')}|{passes}|B<={bucket}|heads={heads}|N={n}|d={d}")


def cuda_timer(fn: Callable[[], object]) -> float:
    """Median wall time of `fn()` on the current CUDA stream in µs: WARMUP calls (Triton compiles in the first),
    then REPEATS calls each timed with a pair of CUDA events; synchronises the device."""
    for _ in range(WARMUP):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(REPEATS)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(1e3 * start.elapsed_time(end) for start, end in events)


def measure(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, candidates: dict[str, Attention],
            timer: Callable[[Callable[[], object]], float] = cuda_timer) -> dict[str, float]:
    """Time each candidate on (B, heads, N, d) q, k, v -> {name: time in µs, as `timer` reports it}.

    Forward only, or forward and backward (gradient of a ones-like output) when autograd needs the call. A
    candidate that raises (a backend without support for the shape, dtype or device, or out of memory) is left
    out with a debug log line; the dict is empty when all raise.
    """
    grad = _needs_grad(q, k, v)
    leaves = [t.detach().requires_grad_(grad) for t in (q, k, v)]
    times = {}
    for name, fn in candidates.items():
        def call(fn=fn):
            with torch.set_grad_enabled(grad):
                out = fn(*leaves)
                if grad:
                    torch.autograd.grad(out, leaves, torch.ones_like(out))
        try:
            with warnings.catch_warnings():  # SDPA warns why a backend does not apply, then raises
                warnings.simplefilter("ignore")
                times[name] = float(timer(call))
        except Exception as err:  # noqa: BLE001 - any failure only rules the candidate out
            log.debug("attention candidate %s skipped for %s: %s", name, tuple(q.shape), err)
    return times


def cache_path() -> Path:
    """$FASTDIFF_DISPATCH_CACHE, else attention-dispatch.json in $FASTDIFF_CACHE or ~/.cache/fastdiff."""
    if os.environ.get("FASTDIFF_DISPATCH_CACHE"):
        return Path(os.environ["FASTDIFF_DISPATCH_CACHE"])
    return cache_dir() / CACHE_NAME


def read_cache(path: Path) -> dict[str, dict]:
    """The entries of the cache file at `path`: {} when it is missing; also {} with a warning when it cannot be
    read or parsed, or is not this version's layout (the next measurement rewrites it)."""
    try:
        data = json.loads(path.read_text())
        entries = data["entries"] if data.get("version") == CACHE_VERSION else None
        if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
            raise ValueError(f"not a version-{CACHE_VERSION} attention dispatch table")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("ignoring the attention dispatch cache %s (%s); it will be rewritten", path, err)
        return {}
    return entries


def _default(triton: bool) -> str:
    return "triton" if triton else "sdpa"


def choose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, triton: bool = True) -> str:
    """(B, heads, N, d) self-attention q, k, v -> the name of the implementation to `run` for them.

    `triton`: whether the Triton kernel imports and supports these inputs (fastdiff.ops passes its check); when
    False it is neither measured nor chosen. A CPU tensor gets "sdpa" unmeasured: the Triton kernel runs on CPU
    only in its interpreter, and SDPA's backends are CUDA ones. On CUDA: `lookup` of the call's key, measuring
    the candidates with `cuda_timer` if need be. Without a table entry, FASTDIFF_DISPATCH=off or a CUDA graph
    capture in progress (where timing would break the capture) give the default choice, "triton" or "sdpa".
    FastdiffError for a FASTDIFF_DISPATCH other than on/off.
    """
    mode = os.environ.get("FASTDIFF_DISPATCH", "on")
    if mode not in DISPATCH_MODES:
        raise FastdiffError(f"FASTDIFF_DISPATCH={mode!r}: choose one of {', '.join(DISPATCH_MODES)}")
    if not q.is_cuda:
        return "sdpa"
    if mode == "off":
        return _default(triton)
    name = key(q, k, v, triton)
    if name in _TABLE:
        return _TABLE[name]
    if torch.cuda.is_current_stream_capturing():
        return _default(triton)
    candidates = {n: fn for n, fn in CANDIDATES.items() if triton or n != "triton"}
    return lookup(name, lambda: measure(q, k, v, candidates), _default(triton))


def lookup(name: str, measure_fn: Callable[[], dict[str, float]], default: str) -> str:
    """The implementation for table key `name`: from the in-memory table, else the cache file, else the fastest
    in `measure_fn()` ({implementation: µs}; `default` when that is empty), then stored in both. A cache file
    that cannot be written costs a warning and a measurement in the next process, nothing else."""
    if name in _TABLE:
        return _TABLE[name]
    path = cache_path()
    entries = read_cache(path)
    if entries.get(name, {}).get("winner") in IMPLEMENTATIONS:
        _TABLE[name] = entries[name]["winner"]
        return _TABLE[name]
    times = measure_fn()
    winner = min(times, key=times.get) if times else default
    log.info("attention dispatch %s -> %s (%s)", name, winner, ", ".join(f"{n} {t:.1f} us" for n, t in times.items()))
    entries[name] = {"winner": winner, "times_us": {n: round(t, 2) for n, t in times.items()}}
    try:
        write_text(path, json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1, sort_keys=True) + "\n")
    except (OSError, FastdiffError) as err:
        log.warning("could not write the attention dispatch cache %s (%s); measured again next run", path, err)
    _TABLE[name] = winner
    return winner
