"""Denoising networks: a DDPM-style U-Net for images and an MLP for 2-D data."""
from __future__ import annotations

from torch import nn

from fastdiff.models.mlp import MLPConfig, MLPDenoiser
from fastdiff.models.unet import UNet, UNetConfig

__all__ = ["MLPConfig", "MLPDenoiser", "UNet", "UNetConfig", "build_model"]


def build_model(cfg) -> nn.Module:
    """A network from a UNetConfig or MLPConfig."""
    if isinstance(cfg, UNetConfig):
        return UNet(cfg)
    if isinstance(cfg, MLPConfig):
        return MLPDenoiser(cfg)
    raise TypeError(f"no model for config {type(cfg).__name__}")
