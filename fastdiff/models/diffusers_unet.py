"""diffusers' `UNet2DModel` as a fastdiff network: the adapter behind diffusers teachers and `--arch diffusers-unet2d`.

The time convention, in one place. fastdiff's alpha_bar(k/T) is diffusers' `alphas_cumprod[k-1]` (k = 1..T), so a
network that diffusers calls at integer timestep tau is called here at continuous t with

    tau = t * T - 1        (a float; t = 1 -> tau = T - 1, t = 1/T -> tau = 0).

t reaches networks in the sample's dtype (float32), whose rounding moves t*T off an integer by up to ~T·6e-8; tau is
therefore computed in float64 and snapped to the nearest integer when within T·2^-22 of it (an undo of that
rounding, so that a grid point calls the network at the very timestep diffusers would).

A *discrete* network (a diffusers teacher, trained on integer timesteps 0..T-1 only) is never called below tau = 0:
times t < 1/T are clamped to tau = 0 with one warning per network. fastdiff-trained networks (`discrete=False`)
saw continuous t in [1e-3, 1] and take tau as it comes.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from fastdiff.errors import FastdiffError

log = logging.getLogger(__name__)

PIP = 'pip install -e ".[diffusers]"'


def require_diffusers():
    """The diffusers module, or FastdiffError with the pip command when the optional extra is missing."""
    try:
        import diffusers  # noqa: F401
        import safetensors  # noqa: F401
    except ImportError:
        raise FastdiffError(f"diffusers models need the optional extra: {PIP}") from None
    return diffusers


@dataclass(frozen=True)
class DiffusersUNetConfig:
    """A `UNet2DModel` described by its diffusers config (JSON with sorted keys, so that the config is hashable and
    its network id is stable) and the time convention: T training steps, discrete or continuous training times."""

    unet_config: str  # json.dumps(UNet2DModel config, sort_keys=True), without diffusers' private keys
    T: int = 1000
    discrete: bool = False  # trained on integer timesteps only (an imported diffusers model)
    num_classes: int = 0  # class conditioning is not supported for this architecture yet
    scalar_cond: bool = False  # nor a guidance-weight input

    @property
    def unet_dict(self) -> dict[str, Any]:
        return json.loads(self.unet_config)


def unet2d_config(image_size: int, in_channels: int, channels: int, channel_mult: Sequence[int], num_res_blocks: int,
                  attn_resolutions: Sequence[int], head_dim: int, dropout: float) -> dict[str, Any]:
    """The `UNet2DModel` config fastdiff's U-Net fields describe: one down/up block per resolution (attention
    blocks where the side is in `attn_resolutions`; heads of `head_dim` channels, at most the block's width),
    GroupNorm groups = the largest of 32, 16, 8, ... dividing every
    block's channels, DDPM's positional time embedding."""
    widths = [channels * m for m in channel_mult]
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 for w in widths))
    sides = [image_size // 2**i for i in range(len(widths))]
    down = ["AttnDownBlock2D" if s in attn_resolutions else "DownBlock2D" for s in sides]
    up = ["AttnUpBlock2D" if s in attn_resolutions else "UpBlock2D" for s in reversed(sides)]
    return {"sample_size": image_size, "in_channels": in_channels, "out_channels": in_channels,
            "block_out_channels": widths, "layers_per_block": num_res_blocks, "down_block_types": down,
            "up_block_types": up, "attention_head_dim": min(head_dim, min(widths)), "norm_num_groups": groups,
            "dropout": dropout,
            "time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0}


def config_json(config: dict[str, Any]) -> str:
    """A diffusers config as the sorted JSON DiffusersUNetConfig stores (private `_` keys dropped)."""
    return json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True)


def full_config(config_json_str: str) -> str:
    """The same UNet2DModel config with every init argument diffusers fills by default written out (sorted JSON):
    a config as fastdiff writes it and the config.json diffusers saves describe one network with one string."""
    import inspect

    diffusers = require_diffusers()
    given = json.loads(config_json_str)
    defaults = {name: p.default for name, p in inspect.signature(diffusers.UNet2DModel.__init__).parameters.items()
                if name != "self" and p.default is not inspect.Parameter.empty}
    full = {**defaults, **given}
    return json.dumps(json.loads(json.dumps(full)), sort_keys=True)  # tuples -> lists, as in a saved config.json


def timesteps(t: torch.Tensor, T: int, discrete: bool) -> torch.Tensor:
    """(B,) continuous t -> (B,) float32 diffusers timesteps tau = t·T - 1 (module docstring: the snap and, for
    discrete networks, the clamp at 0)."""
    tau = t.double() * T - 1
    near = tau.round()
    tau = torch.where((tau - near).abs() <= T * 2.0**-22, near, tau)
    if discrete and bool((tau < 0).any()):
        tau = tau.clamp(min=0.0)
    return tau.float()


class DiffusersUNet(nn.Module):
    """`net(x, t) -> out`: a `UNet2DModel` called at tau = t·T - 1 (see the module docstring). `.unet` is the
    diffusers model itself (what export saves)."""

    def __init__(self, cfg: DiffusersUNetConfig, unet: nn.Module | None = None):
        super().__init__()
        diffusers = require_diffusers()
        self.cfg = cfg
        self.unet = unet if unet is not None else diffusers.UNet2DModel.from_config(cfg.unet_dict)
        self._warned = False

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None, w=None) -> torch.Tensor:
        if y is not None or w is not None:
            raise FastdiffError("the diffusers-unet2d architecture takes no class label or guidance weight yet; "
                                "use --arch unet for class-conditional or guided runs")
        if self.cfg.discrete and not self._warned and bool((t.double() * self.cfg.T < 1 - 1e-6).any()):
            self._warned = True
            log.warning("network times t < 1/T = %.3g reach a diffusers model trained on timesteps 0..%d only: "
                        "clamped to timestep 0", 1 / self.cfg.T, self.cfg.T - 1)
        tau = timesteps(t, self.cfg.T, self.cfg.discrete).to(x.device)
        return self.unet(x, tau).sample


def check_unet_config(config: dict[str, Any], where: str) -> None:
    """FastdiffError unless `config` is a UNet2DModel config fastdiff can call as `net(x, t)` (output channels equal
    input channels: no learned variance; no class embedding)."""
    if config.get("out_channels", 3) != config.get("in_channels", 3):
        raise FastdiffError(f"{where}: out_channels {config.get('out_channels')} != in_channels "
                            f"{config.get('in_channels')} (a learned-variance model); fastdiff needs one output per "
                            "input channel")
    if config.get("class_embed_type") or config.get("num_class_embeds"):
        raise FastdiffError(f"{where}: class-conditional UNet2DModel is not supported yet; use an unconditional one")
    if not isinstance(config.get("sample_size"), int) or math.isnan(float(config["sample_size"])):
        raise FastdiffError(f"{where}: sample_size must be one integer (square images)")
