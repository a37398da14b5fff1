"""Checkpoint I/O shared by train, distill and bench.

A checkpoint is a dict of tensors and plain data (no pickled code): `kind` ("teacher"/"student"),
`config` (the TrainConfig dict of the run), `network` (the network it holds: {"arch", **its config}, so that
loading needs no training code), `model` (state_dict), and for resumable runs
`optimizer`, `ema`, `step`, `rng`. Written atomically and fsynced, loaded with `weights_only=True`.

Resumable state keeps the previous good checkpoint beside the latest (`checkpoint.prev.pt` next to
`checkpoint.pt`): `load_resumable` falls back to it, with a warning, when the latest is missing, truncated or
corrupt, and fails (naming both files) only when neither can be read.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastdiff.data import static_info
from fastdiff.distributed import is_main
from fastdiff.errors import FastdiffError
from fastdiff.io import atomic_path
from fastdiff.models import build_model, model_config, network_from_dict, network_to_dict
from fastdiff.schedules import Schedule

log = logging.getLogger(__name__)

CKPT_NAME = "checkpoint.pt"


def previous_path(path) -> Path:
    """Where the checkpoint before `path` is kept: checkpoint.pt -> checkpoint.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path, payload: dict, keep_previous: bool = False) -> None:
    """Write `payload` to `path` atomically and durably (a reader never sees half a file).

    With `keep_previous` the checkpoint it replaces becomes `previous_path(path)` (the fallback of
    load_resumable). A full disk or read-only folder raises FastdiffError with the size needed; the files
    already there are left as they were.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getbuffer()
    with atomic_path(path, needed=len(data), previous=previous_path(path) if keep_previous else None) as tmp:
        tmp.write_bytes(data)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by save_checkpoint; FastdiffError if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FastdiffError(f"checkpoint {str(path)!r} does not exist; pass a run dir or a .pt file written by "
                            "fastdiff, or a diffusers folder (model_index.json, or a UNet2DModel's config.json)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated/corrupt files
        raise FastdiffError(f"checkpoint {str(path)!r} is corrupt or not a fastdiff checkpoint ({type(err).__name__}); "
                            "delete it to start over or point to another file") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or not ("model" in ckpt or "modules" in ckpt):
        raise FastdiffError(f"{str(path)!r} is not a fastdiff checkpoint (no config/model); point to one written "
                            "by fastdiff")
    return ckpt


def load_resumable(path, map_location="cpu", set_aside: bool = True) -> dict | None:
    """The latest readable state of a resumable run: `path`, else its previous checkpoint (with a warning; with
    `set_aside` the unreadable latest is renamed `<name>.corrupt` so the next save cannot push the good one out);
    None when neither exists (a fresh run). FastdiffError naming both files when neither can be read."""
    path = Path(path)
    prev = previous_path(path)
    if not path.exists() and not prev.exists():
        return None
    problems = []
    for candidate in (path, prev):
        if not candidate.exists():
            problems.append(f"{candidate} is missing")
            continue
        try:
            ckpt = load_checkpoint(candidate, map_location=map_location)
        except FastdiffError as err:
            problems.append(str(err).split(";")[0])
            continue
        if candidate == prev:
            log.warning("%s; resuming from the previous checkpoint %s", problems[0], prev)
            if set_aside and path.exists() and is_main():  # one rank sets it aside; the others read prev as well
                os.replace(path, path.with_name(path.name + ".corrupt"))
        return ckpt
    raise FastdiffError(f"no readable checkpoint to resume from: {problems[0]}, and {problems[1]}; "
                        "delete both to start over or choose another --out-dir")


def weights_hash(ckpt: dict, state: dict) -> str:
    """The model id recorded with every result: 12 hex digits of a sha256 over what the model computes: its network
    (architecture and config), schedule, param, kind, grid N and the weights `state` it samples with (names,
    dtypes, shapes, bytes); not where or how long it was trained.

    Not the file's sha256: the file also holds the optimiser and RNG state, and torch.save's bytes depend on how
    the tensors share storage (a resumed run's file differs from an uninterrupted one's with equal tensors).
    """
    cfg = ckpt["config"]
    network = network_to_dict(network_of(ckpt))
    if network["arch"] == "diffusers-unet2d":  # fastdiff's short config and diffusers' full one: one network
        from fastdiff.models.diffusers_unet import full_config

        network = {**network, "unet_config": full_config(network["unet_config"])}
    if not network.get("text_tokens", True):  # added in 0.5: networks without added words keep their ids
        network = {k: v for k, v in network.items() if k != "text_tokens"}
    if network["arch"] == "diffusers-cond":  # where its text encoder was read from is not what it computes
        network = {k: v for k, v in network.items() if k != "text_encoder"}
    described = [network, cfg["schedule"], cfg["T"], ckpt.get("param", cfg["param"]),
                 ckpt.get("kind"), ckpt.get("steps")]
    schedule = schedule_of(ckpt).to_dict()
    if schedule != {"kind": cfg["schedule"], "T": cfg["T"]}:  # beyond kind and T (ids of older runs unchanged)
        described.append(schedule)
    h = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tensor.dtype}:{tuple(state[name].shape)}".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()[:12]


def resolve_path(path_or_dir) -> Path:
    """A run dir means its checkpoint.pt; a file, a diffusers folder or a hub id means itself."""
    from fastdiff.interop import is_diffusers_source

    p = Path(path_or_dir)
    return p / CKPT_NAME if p.is_dir() and not is_diffusers_source(p) else p


def schedule_of(ckpt: dict) -> Schedule:
    """The schedule a checkpoint samples with: its `schedule` entry (a diffusers teacher's betas, kept by its
    students), else its training config's kind and T."""
    if ckpt.get("schedule"):
        return Schedule.from_dict(ckpt["schedule"])
    return Schedule(ckpt["config"]["schedule"], ckpt["config"]["T"])


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
    network: dict | None = None  # the network it holds, as checkpoints describe it (network_to_dict)
    cost: dict | None = None  # a student's training cost, cumulative from its teacher (see distill.stages)
    source: dict | None = None  # a diffusers model: where it came from and its scheduler's inference-grid keys
    codec: object = None  # a latent model's autoencoder (fastdiff.latent.Codec): it samples latents, decoded to images
    role: dict | None = None  # a student's method, sampler, own grid and N, and whether a sweep samples it (role_of)

    @property
    def method(self) -> str:
        """The distillation method that made a student ("" for a teacher)."""
        return (self.role or {}).get("method", "")

    @property
    def sampler(self) -> str:
        """The sampler (fastdiff.registry) a student is sampled with ("" for a teacher or a first stage)."""
        return (self.role or {}).get("sampler") or ""

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one sample as scored: data_shape, or the decoded image's for a latent model."""
        return tuple(self.codec.image_shape(self.data_shape)) if self.codec is not None else tuple(self.data_shape)

    @property
    def clip(self) -> bool:
        """Whether its samplers clip x0^ to [-1, 1] (pixel images; not points, not latents)."""
        from fastdiff.latent import clips_x0

        return clips_x0(self.data_shape, self.codec)


def network_of(ckpt: dict):
    """The network config a checkpoint describes: its `network` entry, or (checkpoints of fastdiff before 0.2) the
    one its training config implies."""
    if "network" in ckpt:
        return network_from_dict(ckpt["network"])
    cfg = ckpt["config"]
    shape, num_classes = static_info(cfg["dataset"], cfg.get("image_size", 32))
    return model_config(cfg["arch"], shape, num_classes if cfg.get("cond") == "class" else 0, cfg)


def load_model(path_or_run_dir, device="cpu", use_ema: bool = True, dataset: str = "",
               data_root: str = "") -> LoadedModel:
    """Load a teacher (EMA weights by default) or a student checkpoint for sampling; or a diffusers model (a pipeline
    or UNet2DModel folder, or a hub id; see fastdiff.interop), trained on `dataset` (in `data_root`).

    Raises FastdiffError if the file is missing, unreadable or not a fastdiff checkpoint or diffusers model."""
    from fastdiff.interop import is_diffusers_source, read_diffusers

    if is_diffusers_source(path_or_run_dir):
        got = read_diffusers(str(path_or_run_dir), device, dataset, data_root)
        ckpt = {k: got[k] for k in ("config", "network", "param", "kind", "steps")}
        ckpt["schedule"] = got["schedule"].to_dict()
        return LoadedModel(net=got["net"], schedule=got["schedule"], param=got["param"], dataset=got["dataset"],
                           kind=got["kind"], steps=got["steps"], hash=weights_hash(ckpt, got["net"].state_dict()),
                           config=got["config"], data_shape=got["data_shape"], path=Path(str(path_or_run_dir)),
                           network=got["network"], source=got["recorded"], codec=got.get("codec"))
    path = resolve_path(path_or_run_dir)
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    network = network_of(ckpt)
    net = build_model(network)
    state = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    net.load_state_dict(state)
    net.to(device).eval().requires_grad_(False)
    return LoadedModel(net=net, schedule=schedule_of(ckpt), param=ckpt.get("param", cfg["param"]),
                       dataset=cfg["dataset"], kind=ckpt.get("kind", "teacher"), steps=ckpt.get("steps"),
                       hash=weights_hash(ckpt, state), config=cfg,
                       data_shape=tuple(ckpt.get("data_shape", ())), path=path, network=network_to_dict(network),
                       cost=ckpt.get("cost"), codec=_codec(ckpt, device), role=role_of(ckpt, path))


def role_of(ckpt: dict, path: Path | None = None) -> dict | None:
    """A student checkpoint's role: {method, sampler, grid, steps (its N), swept} as the method wrote it (its
    `role` entry), or as fastdiff before 0.7 implied it: a file with a consistency block is a CD student (sampler
    consistency on grid cd{N}; swept when it is students/cd.pt, not a cd_u* snapshot), one with a grid N a
    progressive student (sampler distilled on grid student), one without (guided distillation's first stage) no
    sampler. None for a teacher."""
    if ckpt.get("kind") != "student":
        return None
    if ckpt.get("role"):
        return dict(ckpt["role"])
    if ckpt.get("cd"):
        n = int(ckpt["cd"]["steps"])
        return {"method": "cd", "sampler": "consistency", "grid": f"cd{n}", "steps": n,
                "swept": path is not None and path.name == "cd.pt"}
    if ckpt.get("steps"):
        return {"method": "pd", "sampler": "distilled", "grid": "student", "steps": int(ckpt["steps"]), "swept": True}
    return {"method": "pd", "sampler": None, "grid": "", "steps": 0, "swept": False}


def _codec(ckpt: dict, device):
    """The autoencoder a latent checkpoint carries (fastdiff.latent.Codec on `device`), else None."""
    if not ckpt.get("autoencoder"):
        return None
    from fastdiff.latent import Codec

    return Codec.from_payload(ckpt["autoencoder"]).to(device)


def load_student(path, device="cpu") -> LoadedModel:
    """A distilled student by path; `.steps` is its own grid N (sample it with DDIM eta=0 on t_i = i/N).

    Raises FastdiffError if `path` is missing, unreadable or not a student checkpoint."""
    model = load_model(path, device)
    if model.kind != "student":
        raise FastdiffError(f"{path} is a {model.kind} checkpoint, not a distilled student")
    return model
