"""Conditional networks (class labels or text) as sampler models, with classifier-free guidance (Ho & Salimans 2022).

Convention (the seed's, fastdiff's everywhere): out = out_uncond + w (out_cond - out_uncond), so w = 0 is the
unconditional model, w = 1 the conditional one and w > 1 guides. The unconditional output is the network's at the
null condition (fastdiff.conditioning.null_condition: the null class, or the learned null text sequence), the
condition dropped to during training with probability `label_dropout`. Weights in the other conventions in use
are converted by `to_fastdiff_w` / `from_fastdiff_w`, the one place that knows them (`CONVENTIONS`).
"""
from __future__ import annotations

from typing import Literal

import torch

from fastdiff.conditioning import null_condition
from fastdiff.errors import FastdiffError
from fastdiff.param import denoiser
from fastdiff.schedules import Schedule

Convention = Literal["fastdiff", "meng", "diffusers"]
CONVENTIONS = {
    "fastdiff": "u + w (c - u): w = 0 unconditional, w = 1 conditional",
    # Ho & Salimans 2022 eq. 6 and Meng et al. 2023 write the guided model as (1 + w) c - w u
    "meng": "(1 + w) c - w u (Ho & Salimans 2022, Meng et al. 2023): w = 0 conditional; fastdiff w = 1 + w",
    # diffusers' pipelines: noise_uncond + guidance_scale (noise_text - noise_uncond), and guidance off (the
    # conditional model alone) when guidance_scale <= 1. A student with a w input (time_cond_proj_dim, as LCM) is
    # never guided by CFG there: the pipeline embeds guidance_scale - 1 for every scale, and fastdiff embeds w - 1
    # (fastdiff.models.diffusers_cond.guidance_embedding), so s = w at every s.
    "diffusers": "guidance_scale s: u + s (c - u) for s > 1, the conditional model for s <= 1; fastdiff w = s "
                 "(s <= 1: w = 1 for a CFG model; a w-input student: w = s at every s)",
}


def to_fastdiff_w(value: float, convention: str, takes_w: bool = False) -> float:
    """fastdiff's w for a guidance weight `value` written in `convention` (see CONVENTIONS), for a model guided by CFG
    or (`takes_w`) a student that takes w as its input; FastdiffError for an unknown convention."""
    if convention == "fastdiff":
        return float(value)
    if convention == "meng":
        return 1.0 + float(value)
    if convention == "diffusers":
        # diffusers samples a CFG model's conditional output alone at s <= 1; a w-input student gets s itself
        return float(value) if value > 1 or takes_w else 1.0
    raise FastdiffError(f"unknown guidance convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")


def from_fastdiff_w(w: float, convention: str, takes_w: bool = False) -> float:
    """The weight that gives fastdiff's w in `convention` (for a CFG model, or a `takes_w` student); FastdiffError
    where that convention cannot express it (for a CFG model, diffusers' guidance_scale never gives 0 <= w < 1)."""
    if convention == "diffusers" and w < 1 and not takes_w:
        raise FastdiffError(f"w = {w:g} (below the conditional model) has no diffusers guidance_scale: diffusers "
                            "samples the conditional model alone for guidance_scale <= 1")
    return float(w) - 1.0 if convention == "meng" else to_fastdiff_w(w, convention, takes_w)


def conditional(net, y: torch.Tensor, w: torch.Tensor | None = None):
    """`model(x, t) -> out`: net at condition y ((B,) class labels or (B, L) token ids) (and guidance input w (B,)
    for a guided student)."""
    return lambda x, t: net(x, t, y, w) if w is not None else net(x, t, y)


def guided(net, y: torch.Tensor, num_classes: int):
    """`model(x, t) -> (out_cond, out_uncond)` from ONE batched forward over [x; x] with conditions [y; null].

    y: (B,) class labels, the null being label `num_classes`; or (B, L) token ids of a text model, whose null is a
    row of NULL_TOKEN (`num_classes` is then unused).

    Pass it to any sampler with `guidance=w`; the sampler (or the fused sampler-step kernel) combines the pair.
    """
    def model(x, t):
        b = x.shape[0]
        out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null_condition(y, num_classes)]))
        return out[:b], out[b:]

    return model


def combine(out_cond: torch.Tensor, out_uncond: torch.Tensor, w) -> torch.Tensor:
    """out_uncond + w (out_cond - out_uncond); w a float or a per-sample (B,) tensor."""
    if isinstance(w, torch.Tensor):
        w = w.to(out_cond).reshape(w.shape + (1,) * (out_cond.ndim - w.ndim))
    return torch.lerp(out_uncond, out_cond, w)  # exact at w = 0 and w = 1


def guided_x0_eps(net, param: str, schedule: Schedule, y, w, num_classes: int):
    """Classifier-free-guided teacher (z, t) -> (x0_hat, eps_hat) with a per-sample weight w (B,).

    One batched forward over [z; z] with labels [y; null]; the guided output u + w (c - u) is formed in the
    network's parameterization, which is affine in (x0, eps) at fixed (z, t), so it equals guiding x0 and eps.
    """
    pair = guided(net, y, num_classes)
    return denoiser(lambda x_t, t: combine(*pair(x_t, t), w), schedule, param)
