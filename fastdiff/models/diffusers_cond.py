"""diffusers' `UNet2DConditionModel` with its CLIP text encoder as a fastdiff network: the adapter behind Stable-
Diffusion-style (latent, text-conditioned) pipeline teachers and their guided students (`diffusers-cond`).

`net(z, t, y=token_ids, w=None)`: the UNet at tau = t·T - 1 (fastdiff.models.diffusers_unet, the one time convention)
with `encoder_hidden_states` = the CLIP text model's last hidden states of the prompt's token ids, every token attended
(as the pipeline does). Rows of ids all NULL_TOKEN are the null condition of classifier-free guidance: Stable
Diffusion's unconditional input is the encoding of the empty prompt "", so the adapter's null sequence is exactly that,
computed once and frozen (it never trains, so a student exported back to the pipeline meets the same null).

A guided student takes w through the UNet's `time_cond_proj_dim`, as Latent Consistency Models do (Luo et al. 2023;
diffusers' LCM and Stable Diffusion pipelines): timestep_cond = the VDM-style sinusoidal embedding of (w - 1) · 1000
in `time_cond_proj_dim` dimensions, w being fastdiff's weight (u + w (c - u)), so that the pipeline's
`guidance_scale` equals w (the pipelines embed guidance_scale - 1). The projection `time_embedding.cond_proj` is zeroed
when the student is made from its teacher, so it starts as the conditional teacher at every w.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastdiff.errors import FastdiffError
from fastdiff.models.diffusers_unet import require_diffusers, timesteps

W_EMBED_DIM = 256  # time_cond_proj_dim of a guided student made here (LCM-SD's)


@dataclass(frozen=True)
class DiffusersCondConfig:
    """A `UNet2DConditionModel` (its diffusers config as sorted JSON), the CLIP text model and tokenizer it reads
    (`text_encoder`: the pipeline folder holding text_encoder/ and tokenizer/), the time convention and, for a guided
    student, the w input through `time_cond_proj_dim`."""

    unet_config: str  # json.dumps(UNet2DConditionModel config, sort_keys=True), without diffusers' private keys
    text_encoder: str  # folder with text_encoder/ and tokenizer/ (a pipeline's), loaded with transformers
    T: int = 1000
    discrete: bool = True  # trained on integer timesteps only
    scalar_cond: bool = False  # a guidance-weight input (time_cond_proj_dim)
    num_classes: int = 0  # text-conditioned: no class labels

    @property
    def unet_dict(self) -> dict[str, Any]:
        cfg = json.loads(self.unet_config)
        if self.scalar_cond and not cfg.get("time_cond_proj_dim"):
            cfg["time_cond_proj_dim"] = W_EMBED_DIM
        return cfg


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) fastdiff w -> (B, dim) timestep_cond: sin/cos of (w - 1)·1000 at frequencies 10000^(-i/(dim/2 - 1)),
    zero-padded to an odd dim (diffusers' LatentConsistencyModelPipeline.get_guidance_scale_embedding of w - 1)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    arg = ((w.float() - 1.0) * 1000.0)[:, None] * freqs.to(w.device)[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class DiffusersCondUNet(nn.Module):
    """`net(z, t, y=None, w=None) -> out` (module docstring). `.unet` is the diffusers model, `.text` the
    TextConditioning (frozen CLIP; null = the empty prompt's encoding)."""

    W_INPUT = "unet.time_embedding.cond_proj"  # the parameters a guided student adds to its teacher

    def __init__(self, cfg: DiffusersCondConfig, unet: nn.Module | None = None):
        super().__init__()
        from fastdiff.text import ClipTextEncoder, TextConditioning

        diffusers = require_diffusers()
        self.cfg = cfg
        self.unet = unet if unet is not None else diffusers.UNet2DConditionModel.from_config(cfg.unet_dict)
        self.text = TextConditioning(ClipTextEncoder(cfg.text_encoder))
        with torch.no_grad():
            self.text.null.copy_(self.text.encode([""])[0])
        self.text.null.requires_grad_(False)

    def zero_w_input(self) -> None:
        nn.init.zeros_(self.unet.time_embedding.cond_proj.weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None, w=None) -> torch.Tensor:
        from fastdiff.text import NULL_TOKEN

        if y is None:
            y = torch.full((x.shape[0], self.text.max_len), NULL_TOKEN, dtype=torch.long, device=x.device)
        if y.ndim != 2:
            raise FastdiffError("a diffusers text-conditioned UNet takes token ids (B, L), not class labels")
        hidden, _ = self.text(y)
        dim = self.unet.config.time_cond_proj_dim
        if dim and w is None:
            raise FastdiffError("this UNet has a guidance-weight input (time_cond_proj_dim): pass w")
        cond = guidance_embedding(w, dim).to(x.dtype) if dim else None
        tau = timesteps(t, self.cfg.T, self.cfg.discrete).to(x.device)
        return self.unet(x, tau, encoder_hidden_states=hidden.to(x.dtype), timestep_cond=cond).sample
