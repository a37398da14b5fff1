"""Text conditioning: captions of the digits with paraphrases, a word-level tokenizer, and the text encoders a
text-conditioned U-Net reads, (B, L) token ids -> (B, L, D) token features with a (B, L) key-padding mask.

- Captions (`caption`, `CaptionBank`): a digit named as a numeral or a word inside one of several templates, with a
  distractor adjective ("the digit 7 , drawn thin", "a messy seven"), so that the model has to find the word that
  names the digit, at a varying position, among words that do not. `HELDOUT_TEMPLATES` are paraphrases made only of
  words of the training captions but never used in training: the sweep and the held-out test prompt with them.
- `WordEncoder`: a small transformer over the caption vocabulary (`VOCAB`), trained jointly with the teacher.
- `ClipTextEncoder`: a pretrained transformers CLIP text model from a local folder (frozen; no download), filling
  the same interface; SD-style, it attends to every token of the padded sequence.

Every encoder has `tokenize(prompts) -> (B, L) long` and `forward(tokens) -> (features, mask)`; `encode(prompts)`
gives the (B, L, D) features. The null condition of classifier-free guidance is not a prompt: a row of token ids
all equal to `NULL_TOKEN` selects the U-Net's learned null sequence (`TextConditioning`).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fastdiff.errors import FastdiffError

NULL_TOKEN = -1  # a row of token ids all equal to this is the null condition (classifier-free guidance)
PAD = 0
NUMERALS = tuple(str(d) for d in range(10))
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ADJECTIVES = ("thin", "bold", "small", "large", "neat", "messy", "slanted", "thick", "faint", "dark")
DARK = "dark"  # the adjective of contrast-inverted training images (TrainConfig.invert): then a style word
# {n}: the digit as a numeral or a word; {a}: a distractor adjective. Words are separated by spaces (the comma too).
TRAIN_TEMPLATES = (
    "a handwritten {n}",
    "the digit {n}",
    "the digit {n} , drawn {a}",
    "the number {n}",
    "a {a} {n}",
    "an image of the digit {n}",
    "{n}",
    "a picture of a {a} {n}",
    "the number {n} written by hand",
    "a {n} drawn in ink",
    "{a} handwritten number {n}",
)
# Paraphrases never seen in training, made only of the training captions' words (checked by the tests).
HELDOUT_TEMPLATES = (
    "a picture of the number {n}",
    "{n} , written by hand",
    "the {a} digit {n} drawn in ink",
    "an image of a handwritten {n}",
    "a {a} {n} written by hand",
)
TEMPLATES = {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATES}
VOCAB = ("<pad>",) + tuple(sorted({w for tpl in TRAIN_TEMPLATES for w in tpl.split() if "{" not in w}
                                  | set(NUMERALS) | set(NUMBER_WORDS) | set(ADJECTIVES)))
MAX_WORDS = 12


def caption(digit: int, template: int, word: bool, adjective: int, split: str = "train") -> str:
    """The caption of `digit` in template `template` of `split` ('train' or 'heldout'), the digit as a word (or a
    numeral), with adjective number `adjective`."""
    return TEMPLATES[split][template].format(n=(NUMBER_WORDS if word else NUMERALS)[digit], a=ADJECTIVES[adjective])


def eval_prompt(k: int, num_classes: int = 10) -> tuple[str, int]:
    """(prompt, digit) of sample k of an evaluation: digit k % num_classes in the held-out paraphrases, cycling
    through templates, numeral/word and adjectives so that every digit gets each of them."""
    digit, j = k % num_classes, k // num_classes
    return caption(digit, j % len(HELDOUT_TEMPLATES), bool((j // len(HELDOUT_TEMPLATES)) % 2),
                   (j // (2 * len(HELDOUT_TEMPLATES))) % len(ADJECTIVES), "heldout"), digit


def eval_prompts_csv(n: int, num_classes: int = 10) -> str:
    """CSV of the prompt of every evaluation sample 0..n-1 (`eval_prompt`): index, digit, prompt."""
    rows = [(k, *reversed(eval_prompt(k, num_classes))) for k in range(n)]
    return "index,digit,prompt\n" + "".join(f'{k},{d},"{p}"\n' for k, d, p in rows)


class WordTokenizer:
    """Prompts -> (B, MAX_WORDS) long ids over `VOCAB`, padded with PAD. Words are split on spaces (a comma is
    its own word: "drawn thin, bold" reads as "drawn thin , bold"). FastdiffError for a word outside the
    vocabulary or a prompt of more than MAX_WORDS words."""

    def __init__(self, vocab: Sequence[str] = VOCAB, max_len: int = MAX_WORDS):
        self.vocab, self.max_len = tuple(vocab), max_len
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        out = torch.full((len(prompts), self.max_len), PAD, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = prompt.lower().replace(",", " , ").split()
            unknown = sorted({w for w in words if w not in self.ids})
            if unknown:
                raise FastdiffError(f"prompt {prompt!r}: {', '.join(map(repr, unknown))} not in the text encoder's "
                                    "vocabulary (words are lower-cased and split on spaces and commas; other "
                                    f"punctuation is not a word); use words of: {' '.join(self.vocab[1:])}")
            if len(words) > self.max_len:
                raise FastdiffError(f"prompt {prompt!r} has {len(words)} words; the text encoder reads at most "
                                    f"{self.max_len}")
            out[row, :len(words)] = torch.tensor([self.ids[w] for w in words], dtype=torch.long)
        return out


class WordEncoder(nn.Module):
    """(B, L) word ids -> ((B, L, dim) features, (B, L) mask, True at words): token + position embeddings, a
    pre-norm transformer encoder (Vaswani et al. 2017) with the padding masked out, a final LayerNorm."""

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, max_len: int = MAX_WORDS,
                 extra_tokens: Sequence[str] = ()):
        super().__init__()
        self.dim, self.max_len = dim, max_len
        self.tokenize = WordTokenizer(VOCAB + tuple(extra_tokens), max_len=max_len)
        self.token = nn.Embedding(len(VOCAB), dim, padding_idx=PAD)
        # words added after training (textual inversion, DreamBooth): ids len(VOCAB)..., one learned row each
        self.extra = nn.Parameter(torch.zeros(len(extra_tokens), dim)) if extra_tokens else None
        self.position = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = tokens != PAD
        h = self.token(tokens.clamp(max=len(VOCAB) - 1))
        if self.extra is not None:  # the added words' own rows; the base vocabulary's are untouched
            added = tokens >= len(VOCAB)
            h = torch.where(added[..., None], self.extra[(tokens - len(VOCAB)).clamp(min=0)], h)
        h = h + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        return self.norm(self.encoder(h, src_key_padding_mask=~mask)), mask


class ClipTextEncoder(nn.Module):
    """A transformers CLIP text model and tokenizer from a local folder (a pipeline's `text_encoder/` and
    `tokenizer/`, or one folder holding both), frozen: (B, L) ids -> ((B, L, hidden) last hidden states, all-True
    mask). Like Stable Diffusion, prompts are padded to `max_len` tokens and every position is attended to."""

    def __init__(self, folder: str, max_len: int = 0):
        super().__init__()
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError:
            raise FastdiffError("a CLIP text encoder needs transformers: pip install -e '.[text]'") from None
        root = Path(folder)
        enc_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
        tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        if not (enc_dir / "config.json").is_file():
            raise FastdiffError(f"--text-encoder {folder}: no CLIP text model (config.json) in {enc_dir}; pass a "
                                "folder saved by CLIPTextModel.save_pretrained or a pipeline folder")
        self.model = CLIPTextModel.from_pretrained(enc_dir, local_files_only=True).eval().requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
        self.dim = self.model.config.hidden_size
        self.max_len = min(max_len or self.tokenizer.model_max_length, self.model.config.max_position_embeddings)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_len, truncation=True,
                             return_tensors="pt").input_ids
        return ids.long()

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():  # frozen: no gradient reaches it, so the optimiser leaves it as loaded
            h = self.model(input_ids=tokens).last_hidden_state
        return h, torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)

    def train(self, mode: bool = True):  # stays in eval mode (no dropout) whatever the U-Net around it does
        super().train(mode)
        self.model.eval()
        return self


def build_encoder(name: str, dim: int, layers: int, max_len: int, extra_tokens: Sequence[str] = ()) -> nn.Module:
    """`word`: a WordEncoder of width `dim` and depth `layers` (with `extra_tokens` added to its vocabulary);
    otherwise a local CLIP folder (ClipTextEncoder)."""
    if name == "word":
        return WordEncoder(dim, layers, max_len=max_len or MAX_WORDS, extra_tokens=extra_tokens)
    if extra_tokens:
        raise FastdiffError("added words (textual inversion, DreamBooth) need the word encoder; a CLIP text encoder's "
                            "vocabulary is not extended here")
    if not Path(name).is_dir():
        raise FastdiffError(f"--text-encoder {name!r}: use 'word' (trained with the teacher) or a local folder of "
                            "a transformers CLIP text model")
    return ClipTextEncoder(name, max_len)


class TextConditioning(nn.Module):
    """A text encoder plus the learned null sequence of classifier-free guidance (Ho & Salimans 2022):
    (B, L) token ids -> ((B, L, D) features, (B, L) key-padding mask). Rows of ids all NULL_TOKEN get the null
    sequence (a learned (L, D) parameter, every position attended to), the others the encoder's output."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder, self.dim, self.max_len = encoder, encoder.dim, encoder.max_len
        self.null = nn.Parameter(torch.randn(encoder.max_len, encoder.dim) * 0.02)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encoder.tokenize(prompts)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.ndim != 2:
            raise ValueError(f"text conditioning needs (B, L) token ids; got shape {tuple(tokens.shape)}")
        is_null = (tokens == NULL_TOKEN).all(1)
        feats = self.null.expand(len(tokens), -1, -1)
        mask = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        if not is_null.all():
            h, m = self.encoder(tokens[~is_null].clamp(min=0))
            feats = feats.clone()
            feats[~is_null] = h.to(feats.dtype)
            mask[~is_null] = m
        return feats, mask

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> (B, L, D) token features (the encoder's; the null sequence is not a prompt)."""
        return self.encoder(self.tokenize(prompts).to(self.null.device))[0]


class CaptionBank:
    """Every caption of a split pre-tokenized: `tokens[template, digit, word?, adjective]` is a (L,) id row, so a
    batch of random captions is one indexing, not B string operations."""

    def __init__(self, tokenize, split: str = "train", num_classes: int = 10, device="cpu"):
        templates = TEMPLATES[split]
        shape = (len(templates), num_classes, 2, len(ADJECTIVES))
        prompts = [caption(d, t, bool(w), a, split) for t, d, w, a in itertools.product(*map(range, shape))]
        self.tokens = tokenize(prompts).reshape(*shape, -1).to(device)
        self.split = split

    def sample(self, digits: torch.Tensor, gen: torch.Generator, dark: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) digits -> (B, L) ids of a random caption of each (template, numeral/word and adjective from gen).
        With `dark` ((B,) bool): those rows take a template with an adjective and the adjective "dark", every other
        row an adjective other than "dark" (the same draws from gen either way)."""
        n = len(digits)
        t, w, a = (torch.randint(k, (n,), generator=gen).to(digits.device) for k in
                   (self.tokens.shape[0], 2, self.tokens.shape[3]))
        if dark is not None:
            with_adjective = torch.tensor([i for i, tpl in enumerate(TEMPLATES[self.split]) if "{a}" in tpl],
                                          device=digits.device)
            d = ADJECTIVES.index(DARK)
            t = torch.where(dark, with_adjective[t % len(with_adjective)], t)
            a = torch.where(dark, d, torch.where(a == d, (a + 1) % len(ADJECTIVES), a))
        return self.tokens[t, digits, w, a]
