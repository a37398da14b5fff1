"""The networks' user-facing fields, declared once: the model configs and the teacher's TrainConfig inherit them, so
a field has one name, one type, one default and one comment (which is also its --help text)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NetworkFields:
    scalar_cond: bool = False  # a scalar input besides t (the guidance weight w of guided students)


@dataclass(frozen=True)
class UNetFields(NetworkFields):
    channels: int = 48  # U-Net base channels
    channel_mult: tuple[int, ...] = (1, 2)  # channels per resolution, as multiples of `channels`
    num_res_blocks: int = 1  # residual blocks per resolution
    attn_resolutions: tuple[int, ...] = (4,)  # feature-map sides with self-attention
    head_dim: int = 32  # attention head width
    dropout: float = 0.0  # dropout in the residual blocks
    # text conditioning (--cond text): cross-attention to a text encoder's tokens at the self-attention resolutions
    text_encoder: str = "word"  # word: a word-level transformer trained with the teacher; or a local CLIP folder
    text_dim: int = 64  # width of the word encoder's tokens
    text_layers: int = 2  # transformer layers of the word encoder


@dataclass(frozen=True)
class MLPFields(NetworkFields):
    hidden: int = 256  # MLP width
    layers: int = 4  # MLP residual blocks
