"""A small MLP denoiser for 2-D data: (B, 2) x_t and (B,) t -> (B, 2)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fastdiff.models.embeddings import CondEmbedding
from fastdiff.models.fields import MLPFields


@dataclass(frozen=True)
class MLPConfig(MLPFields):
    """The MLP's fields (models/fields.py) plus what the data set fixes."""

    dim: int = 2  # dimension of the points
    num_classes: int = 0  # class labels (0: unconditional)


class MLPDenoiser(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = CondEmbedding(64, cfg.hidden, cfg.num_classes, cfg.scalar_cond)
        self.inp = nn.Linear(cfg.dim, cfg.hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(cfg.hidden), nn.Linear(cfg.hidden, cfg.hidden), nn.SiLU(),
                          nn.Linear(cfg.hidden, cfg.hidden)) for _ in range(cfg.layers))
        self.out = nn.Sequential(nn.LayerNorm(cfg.hidden), nn.Linear(cfg.hidden, cfg.dim))

    W_INPUT = "embed.scalar"  # the parameters a guided student adds to its teacher

    def zero_w_input(self) -> None:
        self.embed.zero_scalar()

    def forward(self, x, t, y=None, w=None):
        emb = self.embed(t, y, w)
        h = self.inp(x)
        for blk in self.blocks:
            h = h + blk(h + emb)  # residual MLP block with the conditioning added to its input
        return self.out(h)
