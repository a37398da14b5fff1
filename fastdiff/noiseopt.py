"""Guidance by an embedding loss on the initial noise: optimise x_T by gradient through a differentiable sampler
(a distilled student on its own grid, or DDIM at few steps) against a loss in an embedding space.

    x_T <- x_T - lr · Adam(∇_{x_T} L(E(S(x_T))))

S is the whole sampler (every network call and update is differentiated: under autograd `ops.sampler_step` takes its
torch path, since the fused kernel has no backward), E an embedding, L a loss in it. The cost of one iteration is
one forward and one backward through S, i.e. grows with the number of steps S takes — what makes a 1- to 4-step
student attractive here (`optimize_noise` returns the measured seconds per iteration per image).

Losses (each `(B, C, H, W) images in [-1, 1] -> (B,) losses`, differentiable):
- `ClassifierLoss`: −log p(class | x) under the project's digit classifier (offline);
- `FeatureCosineLoss`: 1 − cos(f(x), f̄) to the mean classifier feature of target images;
- `ClipLoss`: 1 − cos(CLIP image embedding, CLIP text embedding of a prompt), a transformers `CLIPModel` from a
  local folder (`save_pretrained` of a model and its tokenizer/processor config; no download).
Only x_T is optimised (the intermediate states are not free variables here).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fastdiff.errors import FastdiffError


@dataclass
class NoiseResult:
    x_T: torch.Tensor  # (B, ...) the optimised initial noise
    x0: torch.Tensor  # (B, ...) its sample
    losses: list[float]  # mean loss before each iteration, then after the last
    seconds_per_image: float  # wall-clock of one iteration (forward + backward through the sampler) per image


def optimize_noise(sample_fn: Callable[[torch.Tensor], torch.Tensor], x_T: torch.Tensor,
                   loss_fn: Callable[[torch.Tensor], torch.Tensor], iterations: int = 20, lr: float = 0.05
                   ) -> NoiseResult:
    """Adam on x_T (a copy) for `iterations` steps of loss_fn(sample_fn(x_T)).sum(); -> NoiseResult."""
    if iterations < 0:
        raise FastdiffError(f"iterations must be >= 0, got {iterations}")
    x = x_T.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    losses, t0 = [], time.perf_counter()
    for _ in range(iterations):
        loss = loss_fn(sample_fn(x))
        losses.append(float(loss.detach().mean()))
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    seconds = (time.perf_counter() - t0) / max(iterations, 1) / len(x)
    with torch.no_grad():
        x0 = sample_fn(x)
        losses.append(float(loss_fn(x0).mean()))
    return NoiseResult(x.detach(), x0, losses, seconds)


class ClassifierLoss(nn.Module):
    """−log p(`target` | x) under the project's classifier for `dataset` (fastdiff.features)."""

    def __init__(self, dataset: str, target: int):
        super().__init__()
        from fastdiff.features import classifier_weights, load_classifier

        self.net = load_classifier(classifier_weights(dataset)[0]).requires_grad_(False)
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.net(x.clamp(-1, 1))[1].log_softmax(-1)[:, self.target]


class FeatureCosineLoss(nn.Module):
    """1 − cos(f(x), mean f(targets)) with f the classifier's features."""

    def __init__(self, dataset: str, targets: torch.Tensor):
        super().__init__()
        from fastdiff.features import classifier_weights, load_classifier

        self.net = load_classifier(classifier_weights(dataset)[0]).requires_grad_(False)
        with torch.no_grad():
            self.register_buffer("target", self.net(targets.clamp(-1, 1))[0].mean(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1 - nn.functional.cosine_similarity(self.net(x.clamp(-1, 1))[0], self.target[None], dim=-1)


class ClipLoss(nn.Module):
    """1 − cos(image embedding of x, text embedding of `prompt`) under a transformers CLIPModel in `folder`.
    Images are mapped from [-1, 1] to [0, 1], repeated to 3 channels if grey, resized (bilinear) to the vision
    model's image_size and normalised with CLIP's mean and std."""

    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, folder: str, prompt: str):
        super().__init__()
        try:
            from transformers import CLIPModel, CLIPTokenizer
        except ImportError:
            raise FastdiffError("a CLIP loss needs transformers: pip install -e '.[text]'") from None
        if not (Path(folder) / "config.json").is_file():
            raise FastdiffError(f"--clip {folder}: no CLIPModel (config.json) there; save one with "
                                "CLIPModel.save_pretrained and its tokenizer beside it")
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().requires_grad_(False)
        tokens = CLIPTokenizer.from_pretrained(folder, local_files_only=True)(
            [prompt], padding=True, truncation=True, max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt")
        with torch.no_grad():
            text = self.model.get_text_features(**tokens)
        self.register_buffer("text", nn.functional.normalize(_tensor(text), dim=-1))
        self.size = self.model.config.vision_config.image_size
        self.register_buffer("mean", torch.tensor(self.MEAN)[None, :, None, None])
        self.register_buffer("std", torch.tensor(self.STD)[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img = (x.clamp(-1, 1) + 1) / 2
        img = img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img
        img = nn.functional.interpolate(img, size=(self.size, self.size), mode="bilinear", align_corners=False)
        emb = nn.functional.normalize(_tensor(self.model.get_image_features(pixel_values=(img - self.mean) / self.std)),
                                      dim=-1)
        return 1 - (emb * self.text).sum(-1)


def _tensor(out) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4.x) or an output object holding it (5.x)."""
    return out if isinstance(out, torch.Tensor) else getattr(out, "pooler_output", out[0])
