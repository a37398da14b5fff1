"""Samples from a teacher or a student as a picture grid: `python -m fastdiff.sample --model M --prompt TEXT`.

The sampler follows the model: a progressive student on its own N-step grid, a consistency student by multistep
consistency sampling (`--steps` of them, <= its discretization), a teacher (or guided distillation's first-stage
network) by DDIM (eta = 0) with `--steps` steps. A text-conditioned model takes `--prompt`, a class-conditional one
`--label`; classifier-free guidance at `--guidance` (fastdiff's w, or as written in `--guidance-convention`): a
teacher guided through the sampler, a guided (w-conditioned) student through its w input. Without --prompt/--label a
conditional model samples unconditionally (its null condition) and --guidance has no effect; the output says so.
Sample k starts from the per-index noise of (`--seed`, k).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch

from fastdiff import registry, runs
from fastdiff.errors import FastdiffError, run_cli
from fastdiff.noise import NoiseRNG


@dataclass(frozen=True)
class SampleConfig:
    model: str = ""  # a teacher or student checkpoint or run dir
    prompt: str = ""  # a text-conditioned model's prompt
    label: int = -1  # a class-conditional model's class (-1: none)
    guidance: float = 2.0  # classifier-free guidance weight (with --prompt or --label)
    guidance_convention: Literal["fastdiff", "meng", "diffusers"] = "fastdiff"  # how --guidance is written
    steps: int = 0  # sampling steps (0: a student's own grid, 4 consistency steps, 32 DDIM steps for a teacher)
    n: int = 16  # samples
    seed: int = 0  # per-index noise
    noise: NoiseRNG = "philox"  # its generator: philox (fastdiff.noise) or torch-cpu (fastdiff <= 0.5's)
    out: str = "samples.png"  # the picture grid (PNG)
    device: str = "auto"  # auto, cpu or cuda[:N]


def plan(cfg: SampleConfig, model):
    """-> (Spec of the sampler run, model(x, t) to sample, CFG weight for the sampler); FastdiffError for inputs the
    model cannot take."""
    from fastdiff.sweep import Spec, as_network, conditioned

    network = as_network(model)
    kind = "unconditional" if network.cond == "none" else f"conditioned on {network.cond}"
    if cfg.prompt and cfg.label >= 0:
        raise FastdiffError("give --prompt (a text model) or --label (a class model), not both")
    if cfg.prompt and network.cond != "text":
        raise FastdiffError(f"--prompt needs a text-conditioned model; {model.path} is {kind}")
    if cfg.label >= 0 and network.cond != "class":
        raise FastdiffError(f"--label needs a class-conditional model; {model.path} is {kind}")
    if model.sampler:  # a student: the sampler its checkpoint names (fastdiff.registry), on its own grid
        entry, n, grid = registry.sampler(model.sampler), int(model.role["steps"]), model.role["grid"]
        who = entry.student_label or f"{entry.name} student"
        if entry.rows == "upto":
            steps = cfg.steps or min(4, n)
            if steps > n:
                raise FastdiffError(f"--steps {steps}: the {who} was trained on {n} steps; give --steps <= {n}")
        else:
            if cfg.steps not in (0, n):
                raise FastdiffError(f"--steps {cfg.steps}: a {who} samples on its own {n}-step grid; leave --steps "
                                    "out")
            steps = n
        spec = Spec(entry.name, grid, steps, entry.eta)
    else:  # a teacher, or guided distillation's w-conditioned first stage (no grid of its own)
        spec = Spec("ddim", "linspace", cfg.steps or 32, 0.0)
    if not (cfg.prompt or cfg.label >= 0):
        return spec, model.net, None
    y = (model.net.text.tokenize([cfg.prompt] * cfg.n) if cfg.prompt
         else torch.full((cfg.n,), cfg.label, dtype=torch.long))
    model_fn, w = conditioned(network, y.to(next(model.net.parameters()).device), guidance_w(cfg, model))
    return spec, model_fn, w


def guidance_w(cfg: SampleConfig, model) -> float:
    """fastdiff's w for --guidance as written in --guidance-convention, for this model: a CFG teacher, or a student
    that takes w as its input (fastdiff.guidance.to_fastdiff_w)."""
    from fastdiff.guidance import to_fastdiff_w
    from fastdiff.sweep import as_network

    return to_fastdiff_w(cfg.guidance, cfg.guidance_convention, as_network(model).takes_w)


def _load(cfg: SampleConfig):
    """-> (loaded model, device) after checking cfg."""
    from fastdiff.checkpoint import load_model

    if not cfg.model:
        raise FastdiffError("pass --model (a teacher or student checkpoint or run dir)")
    if cfg.n < 1:
        raise FastdiffError(f"--n must be >= 1, got {cfg.n}")
    if not cfg.out.endswith(".png"):
        raise FastdiffError(f"--out {cfg.out!r}: the picture grid is a PNG; give a path ending in .png")
    device = runs.resolve_device(cfg.device)
    return load_model(cfg.model, device), device


def generate(cfg: SampleConfig, loaded=None) -> tuple[torch.Tensor, int]:
    """-> ((n, ...) samples in [-1, 1], NFE) of `cfg` (a latent model's decoded by its autoencoder); `loaded`: the
    (model, device) of `_load(cfg)` when the caller has it."""
    from fastdiff.samplers import initial_noise
    from fastdiff.sweep import run_sampler

    model, device = loaded or _load(cfg)
    spec, net, w = plan(cfg, model)
    shape = tuple(model.data_shape)
    x, gens = initial_noise(range(cfg.n), shape, cfg.seed, device, rng=cfg.noise)
    with torch.no_grad():
        out = run_sampler(spec, net, x, model.schedule, model.param, model.clip, gens, w)
        images = model.codec.decode(out.x) if model.codec is not None else out.x
    return images.cpu(), out.nfe


def main(argv: Sequence[str] | None = None) -> int:
    from fastdiff import distributed as dist
    from fastdiff.data import to_uint8
    from fastdiff.viz import save_samples

    dist.configure_cpu_threads()
    cfg, args = runs.config_from_argv(argv, SampleConfig, {"default": SampleConfig()}, "python -m fastdiff.sample",
                                      "Sample a teacher or student into a picture grid.", default_preset="default")
    loaded = _load(cfg)
    conditioned = bool(cfg.prompt) or cfg.label >= 0
    how = (f"guidance w = {guidance_w(cfg, loaded[0]):g}" if conditioned
           else "unconditional (no --prompt/--label: --guidance has no effect)")
    if args.dry_run:
        spec, _, _ = plan(cfg, loaded[0])
        print(f"{cfg.n} samples by {spec.label}, {how} -> {cfg.out}")
        return 0
    x, nfe = generate(cfg, loaded)
    what = f"{cfg.prompt!r}, " if cfg.prompt else f"class {cfg.label}, " if cfg.label >= 0 else ""
    save_samples(to_uint8(x).numpy() if x.ndim == 4 else x.numpy(), Path(cfg.out), title=f"{what}NFE {nfe}")
    print(f"wrote {cfg.out}: {cfg.n} samples, NFE {nfe}, {how}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
