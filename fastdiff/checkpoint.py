"""Checkpoint I/O shared by train, distill and bench.

A checkpoint is a dict of tensors and plain data (no pickled code): `kind` ("teacher"/"student"),
`config` (the TrainConfig dict that built the network), `model` (state_dict), and for resumable runs
`optimizer`, `ema`, `step`, `rng`. Written atomically, loaded with `weights_only=True`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastdiff.errors import FastdiffError
from fastdiff.io import atomic_path
from fastdiff.schedules import Schedule

CKPT_NAME = "checkpoint.pt"


def save_checkpoint(path, payload: dict) -> None:
    """Write `payload` to `path` atomically (a reader never sees half a file)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by save_checkpoint; FastdiffError if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FastdiffError(f"checkpoint {str(path)!r} does not exist; pass a run dir or a .pt file written by fastdiff")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated/corrupt files
        raise FastdiffError(f"checkpoint {str(path)!r} is corrupt or not a fastdiff checkpoint ({type(err).__name__}); "
                            "delete it to start over or point to another file") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise FastdiffError(f"{str(path)!r} is not a fastdiff checkpoint (no config/model); point to one written by fastdiff")
    return ckpt


def file_hash(path) -> str:
    """First 12 hex digits of the file's sha256: the model id recorded with every result."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def resolve_path(path_or_dir) -> Path:
    """A run dir means its checkpoint.pt; a file means itself."""
    p = Path(path_or_dir)
    return p / CKPT_NAME if p.is_dir() else p


@dataclass
class LoadedModel:
    """A network ready for the samplers (`net(x, t)`), with what is needed to sample and report."""

    net: nn.Module
    schedule: Schedule
    param: str
    dataset: str
    kind: str
    steps: int | None
    hash: str
    config: dict
    data_shape: tuple[int, ...]
    path: Path


def load_model(path_or_run_dir, device="cpu", use_ema: bool = True) -> LoadedModel:
    """Load a teacher (EMA weights by default) or a student checkpoint for sampling."""
    from fastdiff.train import TrainConfig, build_network

    path = resolve_path(path_or_run_dir)
    ckpt = load_checkpoint(path)
    from fastdiff.config import from_dict

    cfg = from_dict(TrainConfig, ckpt["config"])
    net = build_network(cfg)
    state = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    net.load_state_dict(state)
    net.to(device).eval().requires_grad_(False)
    return LoadedModel(net=net, schedule=Schedule(cfg.schedule, cfg.T), param=ckpt.get("param", cfg.param),
                       dataset=cfg.dataset, kind=ckpt.get("kind", "teacher"), steps=ckpt.get("steps"),
                       hash=file_hash(path), config=json.loads(json.dumps(ckpt["config"])),
                       data_shape=tuple(ckpt.get("data_shape", ())), path=path)
