"""Conditioning embeddings shared by the U-Net and the MLP denoiser."""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """(B,) continuous t in [0, 1] -> (B, dim) sinusoidal features of scale·t (Vaswani et al. 2017)."""
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)  # at least fp32: fp16 phases of 1000·t are too coarse
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = scale * t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class CondEmbedding(nn.Module):
    """t (and optionally a class label, with a null class for guidance) -> (B, emb_dim).

    Labels run 0..num_classes-1; index num_classes is the null ("unconditional") class, also used when
    y is None. `scalar_cond` adds one more continuous input embedded like t (the guidance weight w of a
    guided student, Meng et al. 2023).
    """

    def __init__(self, base_dim: int, emb_dim: int, num_classes: int = 0, scalar_cond: bool = False):
        super().__init__()
        self.base_dim, self.num_classes = base_dim, num_classes
        self.time = nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.scalar = (nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                       if scalar_cond else None)

    def zero_scalar(self) -> None:
        """Zero the w embedding's output layer (a guided student made from its teacher starts as the teacher)."""
        nn.init.zeros_(self.scalar[-1].weight)
        nn.init.zeros_(self.scalar[-1].bias)

    def forward(self, t, y=None, w=None) -> torch.Tensor:
        emb = self.time(sinusoidal(t, self.base_dim))
        if self.label is not None:
            if y is None:
                y = torch.full((t.shape[0],), self.num_classes, dtype=torch.long, device=t.device)
            emb = emb + self.label(y)
        if self.scalar is not None:
            w = torch.zeros_like(t) if w is None else w
            emb = emb + self.scalar(sinusoidal(w, self.base_dim, scale=100.0))
        return emb
