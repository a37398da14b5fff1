"""What a conditional network is given, in one place for training, distillation and the sweep.

A network's condition `y` is either class labels, (B,) long with `num_classes` the null label, or text, (B, L)
long token ids with rows all `NULL_TOKEN` the null condition (fastdiff.text). `cond` names the kind: "none",
"class" or "text" (TrainConfig.cond).
"""
from __future__ import annotations

import torch

from fastdiff.text import NULL_TOKEN, CaptionBank, eval_prompt


def null_condition(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The null condition of classifier-free guidance shaped like `y`: the null label, or a NULL_TOKEN row."""
    return torch.full_like(y, NULL_TOKEN if y.ndim == 2 else num_classes)


def text_module(net):
    """The TextConditioning of a text-conditioned network (a fastdiff U-Net, possibly DDP-wrapped)."""
    return getattr(net, "module", net).text


class Conditioner:
    """Draws the condition of a training batch from its examples' labels: the labels themselves ("class"), or a
    random training caption of each label ("text", pre-tokenized by the network's tokenizer); with probability
    `dropout` the null condition instead (classifier-free guidance's condition dropout). Examples of label
    `unnamed` always get the null condition: the network learns to draw them, but no condition asks for them."""

    def __init__(self, cond: str, num_classes: int, net=None, device="cpu", unnamed: int = -1):
        self.cond, self.num_classes, self.unnamed = cond, num_classes, unnamed
        self.bank = (CaptionBank(text_module(net).tokenize, "train", num_classes, device) if cond == "text"
                     else None)

    def __call__(self, labels: torch.Tensor, gen: torch.Generator, dropout: float = 0.0,
                 dark: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) labels -> (B,) labels or (B, L) caption ids; `dark` ((B,) bool, text only): the examples that were
        contrast-inverted, whose captions say "dark" (and no other caption does)."""
        y = self.bank.sample(labels, gen, dark) if self.bank is not None else labels
        if dropout > 0:  # class runs draw only this: their batches are as before text conditioning existed
            drop = (torch.rand(len(labels), generator=gen) < dropout).to(labels.device)
            y = torch.where(drop.reshape((-1,) + (1,) * (y.ndim - 1)), null_condition(y, self.num_classes), y)
        if self.unnamed >= 0:
            hide = (labels == self.unnamed).reshape((-1,) + (1,) * (y.ndim - 1))
            y = torch.where(hide, null_condition(y, self.num_classes), y)
        return y


def requested_classes(indices, num_classes: int, device) -> torch.Tensor:
    """The class sample k asks for in an evaluation: k % num_classes (the same in every row)."""
    return torch.as_tensor(list(indices), device=device) % num_classes


def eval_condition(cond: str, net, indices, num_classes: int, device) -> torch.Tensor:
    """The condition of evaluation samples `indices`: class k % num_classes, or for text the held-out paraphrase
    `fastdiff.text.eval_prompt(k)` that asks for that digit."""
    if cond == "text":
        prompts = [eval_prompt(k, num_classes)[0] for k in indices]
        return text_module(net).tokenize(prompts).to(device)
    return requested_classes(indices, num_classes, device)
