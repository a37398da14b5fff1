"""A separate wall-clock pass over a sweep's rows (`python -m fastdiff.bench ... --timing-repeats 5`).

The FID run's own timings come from one pass through the rows, each row sampled in a different minute: on a shared
machine whose speed swings within minutes, that compares the machine's moods as much as the samplers. This pass
samples one batch (`--timing-batch` samples, the sweep's first indices and noise) of every row, round-robin, and
repeats the round `timing_repeats` times, so a slow phase hits every row alike; the median of the repeats is kept.
Writes `<results folder>/timing.csv` (replaced by each pass: a measurement of the machine it ran on), with the torch
threads, the CPU model and the 1-minute load average before and after; the report's time-to-quality table uses it.
Network loading, noise drawing and scoring are not timed; one warm-up forward per network comes first.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import os
import platform
from pathlib import Path
from statistics import median
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from fastdiff.io import write_text
from fastdiff.results import git_commit
from fastdiff.sweep import Network, Spec, sample_batch, warm_up

TIMING_NAME = "timing.csv"
FIELDS = ["model_hash", "sampler", "grid", "steps", "guidance", "nfe", "batch", "repeats", "median_s", "min_s",
          "max_s", "ms_per_sample", "threads", "cpu_model", "load_before", "load_after", "device", "torch_version",
          "fastdiff_commit", "timestamp", "cuda_graph"]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timing_pass(specs: Sequence[Spec], network_of: Callable[[Spec], Network], shape: tuple[int, ...], cfg,
                device: torch.device, device_label: str, out: Path, progress: bool = True) -> Path:
    """Time one batch of every spec `cfg.timing_repeats` times, interleaved; -> the timing.csv written in `out`."""
    batch = cfg.timing_batch or cfg.batch_size
    tcfg = dataclasses.replace(cfg, batch_size=batch, n_samples=batch)
    for net in {id(network_of(s)): network_of(s) for s in specs}.values():
        warm_up(net, shape, batch, device)
    seconds: list[list[float]] = [[] for _ in specs]
    graphs: list[dict] = [{} for _ in specs]  # each row's captured loop (fastdiff.graphs), reused over the repeats
    nfe = [0] * len(specs)
    graphed = [False] * len(specs)
    load_before = os.getloadavg()[0]
    with tqdm(total=cfg.timing_repeats * len(specs), desc="timing pass", unit="batch", disable=not progress) as bar:
        for _ in range(cfg.timing_repeats):
            for i, spec in enumerate(specs):  # round-robin: a slow minute of the machine hits every row alike
                r = sample_batch(spec, network_of(spec), shape, tcfg, device, 0, graphs[i])
                seconds[i].append(r["seconds"])
                nfe[i], graphed[i] = r["nfe"], r["cuda_graph"]
                bar.update()
    common = {"batch": batch, "repeats": cfg.timing_repeats, "threads": torch.get_num_threads(),
              "cpu_model": cpu_model(), "load_before": f"{load_before:.2f}", "load_after": f"{os.getloadavg()[0]:.2f}",
              "device": device_label, "torch_version": torch.__version__, "fastdiff_commit": git_commit(),
              "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, FIELDS)
    writer.writeheader()
    for spec, times, n, g in zip(specs, seconds, nfe, graphed):
        writer.writerow({**common, "model_hash": network_of(spec).hash, "sampler": spec.sampler, "grid": spec.grid,
                         "steps": spec.steps, "guidance": "" if spec.guidance is None else spec.guidance, "nfe": n,
                         "median_s": repr(median(times)), "min_s": repr(min(times)), "max_s": repr(max(times)),
                         "ms_per_sample": repr(1000 * median(times) / batch), "cuda_graph": str(g).lower()})
    path = out / TIMING_NAME
    write_text(path, buf.getvalue())
    return path
