"""The autoencoder of latent diffusion: `python -m fastdiff.autoencoder --preset digits [--field value ...]`.

Trains a small KL-regularised autoencoder (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", Sec. 3 and App. G: the KL-f variant) as a diffusers `AutoencoderKL`: `downsample` f (a power of two: one
encoder block per factor 2, plus one), `latent_channels`, `kl_weight` β. The loss per example is

    sum_pixels |x - D(z)| + β · KL(q(z|x) || N(0, I)),   z ~ q(z|x)

(the paper's L1 reconstruction and KL terms; its perceptual and adversarial terms are left out: on 8x8 digits there
is no network to take a perceptual loss from, and this is a floor to measure, not a result to chase), divided by the
number of pixels so that the learning rate does not depend on the image size.

When training ends the run dir gets `vae/` (a diffusers AutoencoderKL folder) whose `scaling_factor` is computed from
the data, as Stable Diffusion's 0.18215 was: 1 / std of the posterior means over the training set, so latents have
unit variance; and `autoencoder.json` with its reconstruction floor: the sweep's FID (same extractor, same reference
and sample count as `python -m fastdiff.bench --preset <data set>`) of the reconstructions of held-out images, beside
the FID of those images themselves (the data floor). A latent model cannot score below the reconstruction floor.
Resumable like every run: re-running the same command continues from `checkpoint.pt`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from fastdiff import config as cfgs
from fastdiff import distributed as dist
from fastdiff import runs
from fastdiff.checkpoint import CKPT_NAME, load_resumable
from fastdiff.data import data_seed, get_data, static_info
from fastdiff.errors import FastdiffError, run_cli
from fastdiff.io import staged_folder, write_text
from fastdiff.latent import Codec
from fastdiff.results import AUTOENCODER_INFO

log = logging.getLogger(__name__)

NON_RESULT_FIELDS = ("out_dir", "device", "log_every", "ckpt_every")
VAE_DIR, INFO_NAME = "vae", AUTOENCODER_INFO


@dataclass(frozen=True)
class AutoencoderConfig:
    """One autoencoder run."""

    dataset: str = "digits"  # an image data set: digits, cifar10 or folder
    data_root: str = ""  # folder holding the data set's files
    image_size: int = 32  # side of the images of a `folder` data set
    downsample: int = 2  # f: latent side = image side / f (a power of two)
    latent_channels: int = 4  # channels of the latent
    channels: int = 32  # width of the first encoder block (doubled at every downsampling)
    kl_weight: float = 1e-6  # beta of the KL term (the LDM KL-f autoencoders' 1e-6)
    updates: int = 3000  # optimiser updates
    batch_size: int = 128  # images per update
    lr: float = 1e-3  # Adam learning rate (after 100 updates of warm-up)
    seed: int = 0  # data split, batches, posterior noise and initial weights
    split_seed: int = -1  # the train/test split's seed (-1: seed)
    eval_samples: int = 500  # held-out images reconstructed for the floor (at most the test split)
    ckpt_every: int = 500  # updates between checkpoints
    log_every: int = 100  # updates between metrics.csv rows
    out_dir: str = "runs/autoencoder-digits"  # the run dir
    device: str = "auto"  # auto, cpu or cuda[:N]


PRESETS = {"digits": AutoencoderConfig()}


def validate(cfg: AutoencoderConfig) -> None:
    for name in ("updates", "batch_size", "latent_channels", "channels", "ckpt_every", "log_every", "eval_samples"):
        cfgs.check_range(cfg, name, getattr(cfg, name) >= 1, ">= 1")
    cfgs.check_range(cfg, "downsample", cfg.downsample >= 1 and cfg.downsample & (cfg.downsample - 1) == 0,
                     "a power of two (1, 2, 4, ...)")
    cfgs.check_range(cfg, "kl_weight", cfg.kl_weight >= 0, ">= 0")
    cfgs.check_range(cfg, "lr", cfg.lr > 0, "> 0")
    shape, _ = static_info(cfg.dataset, cfg.image_size)
    if len(shape) != 3:
        raise FastdiffError(f"--dataset {cfg.dataset}: the autoencoder needs images, not points")
    if shape[1] % cfg.downsample:
        raise FastdiffError(f"--downsample {cfg.downsample} does not divide the image side {shape[1]}")


def build_vae(cfg: AutoencoderConfig, image_channels: int):
    """The AutoencoderKL of `cfg`: log2(f) + 1 encoder/decoder blocks of widths channels·2^i, one ResNet layer each,
    GroupNorm of 8 groups at most (small widths), the mid-block's self-attention."""
    from fastdiff.models.diffusers_unet import require_diffusers

    n = int(math.log2(cfg.downsample)) + 1
    widths = [cfg.channels * 2 ** i for i in range(n)]
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 for w in widths) and g <= max(8, widths[0] // 4))
    return require_diffusers().AutoencoderKL(
        in_channels=image_channels, out_channels=image_channels, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(widths), layers_per_block=1,
        latent_channels=cfg.latent_channels, norm_num_groups=groups, sample_size=static_info(cfg.dataset,
                                                                                            cfg.image_size)[0][1],
        scaling_factor=1.0)


def vae_loss(vae, x: torch.Tensor, kl_weight: float, gen: torch.Generator) -> torch.Tensor:
    """(B,) per-example loss of the module docstring: (sum |x - D(z)| + β KL) / pixels, z drawn with `gen`."""
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(x.device)
    rec = vae.decode(z).sample
    pixels = x[0].numel()
    return ((rec - x).abs().flatten(1).sum(1) + kl_weight * posterior.kl()) / pixels


def train_autoencoder(cfg: AutoencoderConfig, progress: bool = True) -> Path:
    """Train (or resume) the autoencoder of `cfg`, then write vae/ (scaling from the data) and autoencoder.json (the
    reconstruction floor); returns the run dir. A finished run (vae/ present) is returned as it is."""
    validate(cfg)
    device = runs.resolve_device(cfg.device)
    run = Path(cfg.out_dir)
    with contextlib.ExitStack() as held:
        data = get_data(cfg.dataset, "train", cfg.data_root, data_seed(cfg), cfg.image_size)
        run = runs.prepare_run_dir(cfg.out_dir, cfgs.to_dict(cfg), NON_RESULT_FIELDS,
                                   cfgs.to_dict(AutoencoderConfig()))
        held.enter_context(runs.run_lock(run))
        if (run / INFO_NAME).is_file() and (run / VAE_DIR / "config.json").is_file():
            log.info("%s already finished; nothing to do", run)
            return run
        ckpt = load_resumable(run / CKPT_NAME, map_location=device)
        write_text(run / "config.json", cfgs.dumps(cfg))
        torch.manual_seed(cfg.seed)
        vae = build_vae(cfg, data.shape[0]).to(device)
        opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + 7)
        x_all = data.x.to(device)
        start = runs.update_of(ckpt) if ckpt is not None else 0
        metrics = runs.MetricsLog(run / "metrics.csv", ["update", "loss", "wall_s"], start)
        acc = [0.0, 0]
        t0 = time.perf_counter()

        def loss_fn(model) -> torch.Tensor:
            idx = torch.randint(len(x_all), (cfg.batch_size,), generator=gen).to(device)
            return vae_loss(model, x_all[idx], cfg.kl_weight, gen).mean()

        def after_update(update: int, loss: float, lr: float, grad_norm) -> None:
            acc[0], acc[1] = acc[0] + loss, acc[1] + 1
            if update % cfg.log_every == 0 or update == cfg.updates:
                metrics.append({"update": update, "loss": f"{acc[0] / acc[1]:.6f}",
                                "wall_s": f"{time.perf_counter() - t0:.1f}"})
                acc[0], acc[1] = 0.0, 0

        fitted = runs.fit(vae, opt, total=cfg.updates, loss_fn=loss_fn, gen=gen, salt=cfg.seed * 1000 + 7,
                          device=device, lr_at=lambda u: cfg.lr * min(1.0, (u + 1) / 100), state_path=run / CKPT_NAME,
                          ckpt_every=cfg.ckpt_every, label=f"autoencoder {cfg.dataset}", resume=ckpt,
                          extra_state=lambda: {"kind": "autoencoder", "config": cfgs.to_dict(cfg)},
                          after_update=after_update, grad_clip=1.0, progress=progress)
        vae.eval()
        codec = finish(vae, cfg, data.x, run, device, wall_s=fitted.seconds)
        log.info("autoencoder %s: scaling factor %.5g, id %s", run, codec.scaling_factor, codec.hash)
    return run


def finish(vae, cfg: AutoencoderConfig, x_train: torch.Tensor, run: Path, device, wall_s=None) -> Codec:
    """Set the scaling factor from the data, save vae/, measure the reconstruction floor into autoencoder.json."""
    with torch.no_grad():
        means = torch.cat([vae.encode(x_train[i:i + 512].to(device)).latent_dist.mean.cpu()
                           for i in range(0, len(x_train), 512)])
    scale = 1.0 / float(means.std())
    vae.register_to_config(scaling_factor=scale)
    with staged_folder(run / VAE_DIR) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    codec = Codec(vae)
    info = {"id": codec.hash, "scaling_factor": scale, "latent_mean": float(means.mean()),
            "latent_shape": list(codec.latent_shape(tuple(x_train.shape[1:]))),
            "image_shape": list(x_train.shape[1:]), "parameters": sum(p.numel() for p in vae.parameters()),
            "train_wall_clock_s": wall_s, **floor(codec, cfg, device)}
    write_text(run / INFO_NAME, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return codec


def floor(codec: Codec, cfg: AutoencoderConfig, device) -> dict:
    """The reconstruction floor: FID of `eval_samples` held-out test images and of their reconstructions against the
    training split (the bench preset's extractor and reference size), and the per-pixel mean absolute and squared
    reconstruction errors."""
    from fastdiff.bench import PRESETS as BENCH_PRESETS
    from fastdiff.bench import BenchConfig
    from fastdiff.features import resolve_extractor
    from fastdiff.metrics import compute_metrics, load_reference

    bench = BENCH_PRESETS.get(cfg.dataset, BenchConfig())
    seed = data_seed(cfg)
    x = get_data(cfg.dataset, "test", cfg.data_root, seed, cfg.image_size).x[:cfg.eval_samples]
    rec = codec.decode(codec.encode(x.to(device))).cpu()
    extractor = resolve_extractor(bench.extractor, cfg.dataset, tuple(x.shape[1:]), data_root=cfg.data_root)
    # against the training split: the held-out test split is what is reconstructed here (scored against itself, the
    # real images' FID would be 0 by construction)
    reference = load_reference(cfg.dataset, "train", bench.n_ref, cfg.data_root, seed=seed)
    fid = lambda s: compute_metrics(s, reference, extractor, ("fid",), device=device, seed=0)["fid"]  # noqa: E731
    return {"recon_fid": fid(rec), "data_fid": fid(x), "recon_l1": float((rec.clamp(-1, 1) - x).abs().mean()),
            "recon_mse": float(((rec.clamp(-1, 1) - x) ** 2).mean()), "eval_images": len(x),
            "eval_split": "test", "extractor": extractor.id, "reference": reference.name}


def main(argv: Sequence[str] | None = None) -> int:
    dist.configure_cpu_threads()
    cfg, args = runs.config_from_argv(argv, AutoencoderConfig, PRESETS, "python -m fastdiff.autoencoder",
                                      "Train the KL autoencoder of latent diffusion and measure its reconstruction "
                                      "floor.")
    if args.dry_run:
        validate(cfg)
        print(f"AutoencoderKL f={cfg.downsample}, {cfg.latent_channels} latent channels, beta {cfg.kl_weight:g} on "
              f"{cfg.dataset}: {cfg.updates} updates in {cfg.out_dir}")
        return 0
    with runs.graceful_stop():
        run = train_autoencoder(cfg)
    info = json.loads((run / INFO_NAME).read_text())
    print(f"autoencoder ready: {run / VAE_DIR} (scaling factor {info['scaling_factor']:.5g}; reconstruction FID "
          f"{info['recon_fid']:.3g} vs data {info['data_fid']:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
