"""Cross-attention control (Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention Control"):
prompt-to-prompt word swap and attention re-weighting of one token, on any text-conditioned fastdiff U-Net — a
teacher sampled by DDIM or a distilled student on its own grid.

Both need the cross-attention probabilities M = softmax(q k^T / sqrt(d)) (B, heads, N pixels, L tokens), which a fused
attention kernel never materialises: `attach(net, controller)` sets the controller on every `CrossAttnBlock`, which
then hands it (q, k, v, mask) instead of calling `fastdiff.ops.attention`; the controller computes M unfused, edits
it and returns M v. `detach` (or the `controlled` context) restores the fused path.

- `WordSwap`: the batch holds the source prompts' rows, then as many target prompts' rows (with classifier-free
  guidance the network sees [cond; uncond] halves: each half is laid out so, and `groups` = 2). For the first
  `inject_steps` network calls the target rows' maps are replaced by the source rows' (the target keeps its own
  values v: the swapped word's content is placed where the source's word was). The paper injects for the first τ
  fraction of the steps; with T sampler steps, inject_steps = round(τ T). For a 1- to 4-step student that fraction
  is 0 or a whole step: τ = 0 gives the target prompt's own image, and injecting the only step of a 1-step student
  fixes every map to the source's — the layout is the source's, the content comes only from the target's values.
- `Reweight`: multiplies the maps of one token position by `scale` (the paper's attention re-weighting, before the
  product with v, no renormalisation) on the rows `rows` (the conditional ones under CFG).

The step counter advances once per network call (`controlled` wraps the network); DDIM and the students call it
once per step (CFG is one batched call).
"""
from __future__ import annotations

import contextlib
import math

import torch


class Controller:
    """The unfused cross-attention every controller runs: (B, heads, N, d) q, (B, heads, L, d) k, v, (B, L) mask ->
    (B, heads, N, d) M v with M edited by `edit`. `step`: network calls so far (see `controlled`)."""

    def __init__(self):
        self.step = 0

    def __call__(self, block, q, k, v, mask):
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :].to(logits.device), float("-inf"))
        return self.edit(logits.softmax(-1), block) @ v

    def edit(self, probs: torch.Tensor, block) -> torch.Tensor:
        return probs


class WordSwap(Controller):
    """Prompt-to-prompt word swap (module docstring): rows [source (n); target (n)] in each of `groups` blocks."""

    def __init__(self, n: int, inject_steps: int, groups: int = 1):
        super().__init__()
        self.n, self.inject_steps, self.groups = n, inject_steps, groups

    def edit(self, probs, block):
        if self.step >= self.inject_steps:
            return probs
        p = probs.reshape(self.groups, 2, self.n, *probs.shape[1:]).clone()
        p[:, 1] = p[:, 0]
        return p.reshape(probs.shape)


class Reweight(Controller):
    """Attention re-weighting: the maps of token position `token` times `scale` on rows [0, rows)."""

    def __init__(self, token: int, scale: float, rows: int):
        super().__init__()
        self.token, self.scale, self.rows = token, scale, rows

    def edit(self, probs, block):
        p = probs.clone()
        p[:self.rows, ..., self.token] *= self.scale
        return p


def attach(net, controller: Controller | None) -> int:
    """Set `controller` on every cross-attention block of `net` (None: back to the fused path); -> blocks set.
    ValueError when `net` has none (not a text-conditioned fastdiff U-Net)."""
    from fastdiff.models.unet import CrossAttnBlock

    blocks = [m for m in net.modules() if isinstance(m, CrossAttnBlock)]
    if not blocks:
        raise ValueError("cross-attention control needs a text-conditioned fastdiff U-Net (it has no cross-attention)")
    for m in blocks:
        m.controller = controller
    return len(blocks)


@contextlib.contextmanager
def controlled(net, controller: Controller):
    """Within the block, `net` runs with `controller` attached; yields the network as a sampler model whose every
    call advances controller.step."""
    attach(net, controller)

    def model(x, t, *args, **kw):
        out = net(x, t, *args, **kw)
        controller.step += 1
        return out

    try:
        yield model
    finally:
        attach(net, None)


def token_position(prompt: str, word: str) -> int:
    """The position of `word` in `prompt`'s token ids (the word tokenizer's: one id per word)."""
    words = prompt.lower().replace(",", " , ").split()
    if word not in words:
        raise ValueError(f"{word!r} is not a word of {prompt!r}")
    return words.index(word)
