"""Denoising networks: a DDPM-style U-Net for images and an MLP for 2-D data."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from torch import nn

from fastdiff.models.mlp import MLPConfig, MLPDenoiser
from fastdiff.models.unet import UNet, UNetConfig

__all__ = ["MLPConfig", "MLPDenoiser", "UNet", "UNetConfig", "build_model", "model_config", "network_to_dict",
           "network_from_dict"]
ARCHS = {"unet": UNetConfig, "mlp": MLPConfig}


def build_model(cfg) -> nn.Module:
    """A network from a UNetConfig or MLPConfig."""
    if isinstance(cfg, UNetConfig):
        return UNet(cfg)
    if isinstance(cfg, MLPConfig):
        return MLPDenoiser(cfg)
    raise TypeError(f"no model for config {type(cfg).__name__}")


def model_config(arch: str, data_shape: Sequence[int], num_classes: int,
                 fields: dict[str, Any]) -> UNetConfig | MLPConfig:
    """The config of an `arch` network for examples of `data_shape` ((C, H, W) or (D,)) and `num_classes` labels
    (0: unconditional), taking the other fields (channels, hidden, dropout, ...) from `fields`; keys that are not
    fields of the network's config are ignored."""
    cls = ARCHS[arch]
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in names}
    shape = {"dim": data_shape[0]} if arch == "mlp" else {"image_size": data_shape[1], "in_channels": data_shape[0]}
    return cls(**{**given, **shape, "num_classes": num_classes})


def network_to_dict(cfg: UNetConfig | MLPConfig) -> dict[str, Any]:
    """JSON-ready description of a network, stored in every checkpoint: {"arch": ..., **its config}."""
    arch = next(name for name, cls in ARCHS.items() if isinstance(cfg, cls))
    return {"arch": arch, **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}}


def network_from_dict(data: dict[str, Any]) -> UNetConfig | MLPConfig:
    """Inverse of network_to_dict."""
    fields = {k: v for k, v in data.items() if k != "arch"}
    return ARCHS[data["arch"]](**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
