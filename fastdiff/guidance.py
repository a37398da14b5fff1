"""Class-conditional networks as sampler models, with classifier-free guidance (Ho & Salimans 2022).

Convention (the seed's): out = out_uncond + w (out_cond - out_uncond), so w = 0 is the unconditional model,
w = 1 the conditional one and w > 1 guides. The unconditional output is the network's at the null class
(index `num_classes`, the label dropped to during training with probability `label_dropout`).
"""
from __future__ import annotations

import torch

from fastdiff.param import denoiser
from fastdiff.schedules import Schedule


def null_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.full_like(y, num_classes)


def conditional(net, y: torch.Tensor, w: torch.Tensor | None = None):
    """`model(x, t) -> out`: net at class labels y (B,) (and guidance input w (B,) for a guided student)."""
    return lambda x, t: net(x, t, y, w) if w is not None else net(x, t, y)


def guided(net, y: torch.Tensor, num_classes: int):
    """`model(x, t) -> (out_cond, out_uncond)` from ONE batched forward over [x; x] with labels [y; null].

    Pass it to any sampler with `guidance=w`; the sampler (or the fused sampler-step kernel) combines the pair.
    """
    def model(x, t):
        b = x.shape[0]
        out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null_labels(y, num_classes)]))
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
