"""DDPM-style U-Net (Ho et al. 2020, App. B) conditioned on continuous t in [0, 1].

Residual blocks with GroupNorm and a timestep (+ class) embedding, self-attention at chosen
resolutions through the one dispatch function `fastdiff.ops.attention` (Triton on CUDA, SDPA elsewhere).
A text-conditioned U-Net (`cond_text`) also has a cross-attention block after each self-attention block (Rombach
et al. 2022, sec. 3.3): queries from the feature map, keys and values from the text encoder's tokens, padding masked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fastdiff.models.embeddings import CondEmbedding
from fastdiff.models.fields import UNetFields


@dataclass(frozen=True)
class UNetConfig(UNetFields):
    """The U-Net's fields (models/fields.py) plus what the data set fixes."""

    image_size: int = 32  # side of the (square) images
    in_channels: int = 3  # image channels
    num_classes: int = 0  # class labels (0: unconditional); label num_classes is the null label of CFG
    cond_text: bool = False  # text-conditioned: y is (B, L) token ids, read through cross-attention
    text_tokens: tuple[str, ...] = ()  # words added to the word encoder after training (fastdiff.personalize)


def _norm(ch: int) -> nn.GroupNorm:
    # DDPM's 32 groups, but at least 4 channels per group: with one channel per group (channels <= 32),
    # GroupNorm would subtract the per-channel t/class embedding that ResBlock adds right before it.
    return nn.GroupNorm(math.gcd(32, ch, max(ch // 4, 1)), ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.drop = _norm(cout), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H·W tokens."""

    def __init__(self, ch: int, head_dim: int):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm, self.qkv, self.proj = _norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, emb=None):
        from fastdiff.ops import attention

        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, N, d)
        out = attention(q.contiguous(), k.contiguous(), v.contiguous())
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class CrossAttnBlock(nn.Module):
    """Multi-head cross-attention of the H·W tokens to a (B, L, ctx_dim) sequence with a (B, L) key-padding mask
    (True: attend). Through `fastdiff.ops.attention`, which routes masked attention to SDPA."""

    def __init__(self, ch: int, ctx_dim: int, head_dim: int):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm, self.q, self.proj = _norm(ch), nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.kv = nn.Linear(ctx_dim, 2 * ch)
        self.controller = None  # fastdiff.control: an attached controller edits the attention probabilities
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, ctx, mask):
        from fastdiff.ops import attention

        b, c, h, w = x.shape
        q = self.q(self.norm(x)).reshape(b, self.heads, c // self.heads, h * w).transpose(-1, -2)
        k, v = self.kv(ctx.to(x.dtype)).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.controller is not None:  # cross-attention control needs the probabilities: the unfused path
            out = self.controller(self, q, k, v, mask)
        else:
            out = attention(q.contiguous(), k.contiguous(), v.contiguous(), mask=mask)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """(B, C, H, W) noisy images, (B,) t -> (B, C, H, W) output in the trained parameterization; y: (B,) class
    labels or, text-conditioned, (B, L) token ids (fastdiff.text); w: (B,) guidance weight of a guided student."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, emb_dim = cfg.channels, 4 * cfg.channels
        self.embed = CondEmbedding(ch, emb_dim, cfg.num_classes, cfg.scalar_cond)
        self.text = None
        if cfg.cond_text:
            from fastdiff.text import TextConditioning, build_encoder

            self.text = TextConditioning(build_encoder(cfg.text_encoder, cfg.text_dim, cfg.text_layers, 0,
                                                       cfg.text_tokens))

        def attn(cur):  # self-attention, then cross-attention to the text for a text-conditioned U-Net
            blocks = [AttnBlock(cur, cfg.head_dim)]
            return blocks + ([CrossAttnBlock(cur, self.text.dim, cfg.head_dim)] if self.text is not None else [])
        self.stem = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down, skips, res = nn.ModuleList(), [ch], cfg.image_size
        cur = ch
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(cur, ch * mult, emb_dim, cfg.dropout)]
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    blocks += attn(cur)
                self.down.append(nn.ModuleList(blocks))
                skips.append(cur)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, cfg.dropout), *attn(cur),
                                  ResBlock(cur, cur, emb_dim, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(cur + skips.pop(), ch * mult, emb_dim, cfg.dropout)]
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    blocks += attn(cur)
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(cur, cur, 3, padding=1)]))
                res *= 2
        self.out = nn.Sequential(_norm(cur), nn.SiLU(), nn.Conv2d(cur, cfg.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    W_INPUT = "embed.scalar"  # the parameters a guided student adds to its teacher

    def zero_w_input(self) -> None:
        self.embed.zero_scalar()

    def forward(self, x, t, y=None, w=None):
        if self.text is not None:
            if y is None:  # the null condition
                from fastdiff.text import NULL_TOKEN

                y = torch.full((x.shape[0], self.text.max_len), NULL_TOKEN, dtype=torch.long, device=x.device)
            ctx = self.text(y)
            emb = self.embed(t, None, w)
        else:
            ctx, emb = None, self.embed(t, y, w)

        def apply(blk, h):
            if isinstance(blk, CrossAttnBlock):
                return blk(h, *ctx)
            return blk(h, emb) if isinstance(blk, (ResBlock, AttnBlock)) else blk(h)

        h = self.stem(x)
        hs = [h]
        for blocks in self.down:
            for blk in blocks:
                h = apply(blk, h)
            hs.append(h)
        for blk in self.mid:
            h = apply(blk, h)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            for blk in blocks:
                h = apply(blk, h)
        return self.out(h)
