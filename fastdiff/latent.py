"""Latent diffusion (Rombach et al. 2022): the autoencoder a latent model samples through, as one object.

A `Codec` is a diffusers `AutoencoderKL` (trained by `python -m fastdiff.autoencoder`, or a pipeline's `vae/`) with
its latent scaling: a diffusion model sees z = (mean(x) - shift) · scaling_factor, where mean(x) is the encoder's
posterior mean (its mode; the cached latents of training), and the decoder gets z / scaling_factor + shift — Stable
Diffusion's convention (its scaling_factor 0.18215 is 1/std of its latents; shift 0). The codec travels *inside* every
checkpoint of a latent teacher and its students (`to_payload`): a student taken away samples and decodes without the
autoencoder's folder.

x0 is not clipped in latent space: the [-1, 1] box is a property of pixels (`clips_x0`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from fastdiff.errors import FastdiffError
from fastdiff.io import atomic_path

log = logging.getLogger(__name__)


def clips_x0(data_shape, codec: "Codec | None") -> bool:
    """Whether samplers clip x0^ to [-1, 1] for a model of examples `data_shape`: on pixel images only (not 2-D
    points, not latents, whose range is the autoencoder's)."""
    return len(data_shape) > 1 and codec is None


class Codec:
    """An AutoencoderKL with its latent scaling; `encode(x) -> z`, `decode(z) -> x`, both batched, no gradient.

    x: (B, C, H, W) images in [-1, 1]; z: (B, latent_channels, H / f, W / f) scaled latents (f = `downsample`).
    `hash` (12 hex digits) identifies the weights, config and scaling; rows of a sweep record it."""

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift = float(cfg.shift_factor or 0.0)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)
        self.image_channels = int(cfg.in_channels)
        self.hash = _hash(self.config_json, self.vae.state_dict())

    @property
    def config_json(self) -> str:
        return json.dumps({k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}, sort_keys=True)

    def latent_shape(self, image_shape) -> tuple[int, int, int]:
        c, h, w = image_shape
        if c != self.image_channels or h % self.downsample or w % self.downsample:
            raise FastdiffError(f"the autoencoder takes {self.image_channels}-channel images with sides divisible by "
                                f"{self.downsample}; the data has shape {tuple(image_shape)}")
        return self.latent_channels, h // self.downsample, w // self.downsample

    def image_shape(self, latent_shape) -> tuple[int, int, int]:
        _, h, w = latent_shape
        return self.image_channels, h * self.downsample, w * self.downsample

    def to(self, device) -> "Codec":
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B, c, h, w) scaled latents (the posterior mean)."""
        dev = next(self.vae.parameters()).device
        out = [(self.vae.encode(x[i:i + batch_size].to(dev)).latent_dist.mean - self.shift) * self.scaling_factor
               for i in range(0, len(x), batch_size)]
        return torch.cat(out).to(x.device)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """(B, c, h, w) scaled latents -> (B, C, H, W) images (data scale, unclamped)."""
        dev = next(self.vae.parameters()).device
        out = [self.vae.decode(z[i:i + batch_size].to(dev, torch.float32) / self.scaling_factor + self.shift).sample
               for i in range(0, len(z), batch_size)]
        return torch.cat(out).to(z.device)

    def to_payload(self) -> dict[str, Any]:
        """What a checkpoint stores: the config (JSON), the weights and the id."""
        return {"config": self.config_json, "state": {k: v.detach().cpu() for k, v in self.vae.state_dict().items()},
                "hash": self.hash}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "Codec":
        vae = _autoencoder_class().from_config(json.loads(payload["config"]))
        vae.load_state_dict(payload["state"])
        return cls(vae)

    @classmethod
    def from_folder(cls, folder) -> "Codec":
        """An AutoencoderKL folder (config.json + weights), a pipeline folder (its vae/), or an autoencoder run dir of
        `python -m fastdiff.autoencoder` (its vae/). FastdiffError when there is none."""
        root = Path(folder)
        for cand in (root, root / "vae"):
            if (cand / "config.json").is_file() and _class_of(cand / "config.json") == "AutoencoderKL":
                try:
                    return cls(_autoencoder_class().from_pretrained(cand, low_cpu_mem_usage=False))
                except Exception as err:  # missing/corrupt weights: diffusers raises many types
                    raise FastdiffError(f"cannot load the autoencoder in {cand} ({type(err).__name__})") from None
        hint = " (its training has not finished: run python -m fastdiff.autoencoder)" if (root / "checkpoint.pt").exists() \
            else ""
        raise FastdiffError(f"--autoencoder {str(folder)!r}: no AutoencoderKL (config.json with _class_name "
                            f"AutoencoderKL) in it or in its vae/{hint}")


def _class_of(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def _autoencoder_class():
    from fastdiff.models.diffusers_unet import require_diffusers

    return require_diffusers().AutoencoderKL


def _hash(config_json: str, state: dict) -> str:
    h = hashlib.sha256(config_json.encode())
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(state[name].shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


@functools.lru_cache(maxsize=4)
def codec_from_folder(folder: str) -> Codec:
    return Codec.from_folder(folder)


def cached_latents(codec: Codec, x: torch.Tensor, cache_dir, name: str) -> torch.Tensor:
    """The scaled latents of images `x`, encoded once and kept in `cache_dir/latents-<name>-<codec id>.pt` (keyed by
    the autoencoder and a digest of the images, so another autoencoder or data never reuses them)."""
    digest = hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()[:10]
    path = Path(cache_dir) / f"latents-{name}-{codec.hash}-{digest}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a cache cut short by a kill is computed again
            log.warning("latent cache %s is unreadable; encoding again", path)
    z = codec.encode(x)
    try:
        with atomic_path(path) as tmp:
            torch.save(z, tmp)
    except FastdiffError as err:  # a read-only folder: the latents are still returned
        log.warning("cannot cache latents at %s (%s)", path, err)
    return z
