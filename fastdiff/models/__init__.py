"""Denoising networks: a DDPM-style U-Net for images, an MLP for 2-D data, diffusers' UNet2DModel (the
`diffusers-unet2d` architecture: diffusers teachers, and students that export to diffusers) and UNet2DConditionModel
with its CLIP text encoder (`diffusers-cond`: Stable-Diffusion-style pipeline teachers and their students)."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from torch import nn

from fastdiff.models.diffusers_cond import DiffusersCondConfig
from fastdiff.models.diffusers_unet import DiffusersUNetConfig, config_json, unet2d_config
from fastdiff.models.mlp import MLPConfig, MLPDenoiser
from fastdiff.models.unet import UNet, UNetConfig

__all__ = ["MLPConfig", "MLPDenoiser", "UNet", "UNetConfig", "build_model", "model_config", "network_to_dict",
           "network_from_dict"]
ARCHS = {"unet": UNetConfig, "mlp": MLPConfig, "diffusers-unet2d": DiffusersUNetConfig,
         "diffusers-cond": DiffusersCondConfig}


def build_model(cfg) -> nn.Module:
    """A network from a UNetConfig, MLPConfig or DiffusersUNetConfig (the last needs the diffusers extra)."""
    if isinstance(cfg, UNetConfig):
        return UNet(cfg)
    if isinstance(cfg, MLPConfig):
        return MLPDenoiser(cfg)
    if isinstance(cfg, DiffusersUNetConfig):
        from fastdiff.models.diffusers_unet import DiffusersUNet

        return DiffusersUNet(cfg)
    if isinstance(cfg, DiffusersCondConfig):
        from fastdiff.models.diffusers_cond import DiffusersCondUNet

        return DiffusersCondUNet(cfg)
    raise TypeError(f"no model for config {type(cfg).__name__}")


def model_config(arch: str, data_shape: Sequence[int], num_classes: int,
                 fields: dict[str, Any]) -> UNetConfig | MLPConfig | DiffusersUNetConfig:
    """The config of an `arch` network for examples of `data_shape` ((C, H, W) or (D,)) and `num_classes` labels
    (0: unconditional), taking the other fields (channels, hidden, dropout, ...) from `fields`; keys that are not
    fields of the network's config are ignored. `fields["cond"] == "text"` makes a text-conditioned U-Net."""
    text = fields.get("cond") == "text"
    if text and arch != "unet":
        from fastdiff.errors import FastdiffError

        raise FastdiffError(f"--cond text needs --arch unet (cross-attention); got --arch {arch}")
    if arch == "diffusers-unet2d":  # the U-Net fields mapped onto a UNet2DModel config; T: the time convention
        if num_classes or fields.get("scalar_cond"):
            from fastdiff.errors import FastdiffError

            raise FastdiffError("--arch diffusers-unet2d takes no class label or guidance weight yet; use --arch unet "
                                "for class-conditional or guided runs")
        unet = unet2d_config(data_shape[1], data_shape[0], fields["channels"], fields["channel_mult"],
                             fields["num_res_blocks"], fields["attn_resolutions"], fields["head_dim"],
                             fields["dropout"])
        return DiffusersUNetConfig(unet_config=config_json(unet), T=fields["T"])
    cls = ARCHS[arch]
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in names}
    shape = {"dim": data_shape[0]} if arch == "mlp" else {"image_size": data_shape[1], "in_channels": data_shape[0]}
    cond = {"cond_text": True} if text else {}
    return cls(**{**given, **shape, "num_classes": 0 if text else num_classes, **cond})


def network_to_dict(cfg: UNetConfig | MLPConfig) -> dict[str, Any]:
    """JSON-ready description of a network, stored in every checkpoint: {"arch": ..., **its config}."""
    arch = next(name for name, cls in ARCHS.items() if isinstance(cfg, cls))
    return {"arch": arch, **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}}


def network_from_dict(data: dict[str, Any]) -> UNetConfig | MLPConfig:
    """Inverse of network_to_dict."""
    fields = {k: v for k, v in data.items() if k != "arch"}
    return ARCHS[data["arch"]](**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
