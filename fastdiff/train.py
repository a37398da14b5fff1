"""Teacher training: `python -m fastdiff.train --preset digits [--field value ...]`.

A run directory holds the resolved `config.json`, `metrics.csv`, `checkpoint.pt` (written atomically
every `ckpt_every` updates, the one before kept as `checkpoint.prev.pt`) and periodic sample pictures.
Re-running the same command resumes from the checkpoint and ends with the same weights as an
uninterrupted run (on CPU; on CUDA with --deterministic); a run dir holding a different config is refused,
and so is a second process on the same run dir. SIGTERM/SIGINT stop it after the current update with a
checkpoint (exit 143/130).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch

from fastdiff import config as cfgs
from fastdiff import distributed as dist
from fastdiff import runs
from fastdiff.checkpoint import CKPT_NAME, load_resumable
from fastdiff.conditioning import Conditioner
from fastdiff.data import data_seed, get_data, static_info
from fastdiff.errors import FastdiffError, run_cli
from fastdiff.io import write_text
from fastdiff.losses import Weighting, diffusion_loss
from fastdiff.models import build_model, model_config, network_to_dict
from fastdiff.models.fields import MLPFields, UNetFields
from fastdiff.param import Param
from fastdiff.schedules import Schedule, ScheduleName

log = logging.getLogger(__name__)

# Fields that change neither the trajectory nor the result: a run may be resumed with other values.
NON_RESULT_FIELDS = ("out_dir", "device", "updates", "log_every", "sample_every", "ckpt_every", "deterministic")


@dataclass(frozen=True)
class TrainConfig(UNetFields, MLPFields):
    """Everything that defines a teacher run. Presets below are instances of it. The network's fields are
    inherited from the one declaration in fastdiff/models/fields.py."""

    # data
    dataset: str = "digits"  # toy2d[:8gaussians|moons|swissroll], digits, cifar10 or folder
    data_root: str = ""  # folder holding the data set's files (cifar10: cifar-10-batches-py; folder: images)
    image_size: int = 32  # side of the images of a `folder` data set
    cond: Literal["none", "class", "text"] = "none"  # class labels, or text (captions of the labels; digits only)
    label_dropout: float = 0.1  # probability of the null label/caption in training (classifier-free guidance)
    unnamed: int = -1  # a label never given: its examples train only the null condition (-1: none). Textual
    # inversion's demonstration: a digit the model draws unconditionally but no prompt names
    invert: float = 0.0  # text runs: the fraction of examples contrast-inverted (x -> -x) and captioned with the
    # adjective "dark", which then describes nothing else (a truthful style word); 0: none
    invert_except: int = -1  # a label never inverted (-1: none): no "dark" example of it is ever seen
    flip: bool = False  # random horizontal flips
    autoencoder: str = ""  # latent diffusion: an AutoencoderKL folder (python -m fastdiff.autoencoder's run dir, a vae/)
    # diffusion
    schedule: ScheduleName = "cosine"  # Ho et al. 2020 / Nichol & Dhariwal 2021
    T: int = 1000  # discrete steps of the schedule (the linear betas; the DDPM sampler's full grid)
    param: Param = "v"  # what the network predicts
    weighting: Weighting = "snr-trunc"  # L_simple, max(SNR, 1) or SNR + 1 (x-space)
    # network: its fields (channels, channel_mult, ..., hidden, layers, scalar_cond) come from models/fields.py
    arch: Literal["unet", "mlp", "diffusers-unet2d"] = "unet"  # images: unet or diffusers-unet2d (exports); 2-D: mlp
    # optimisation
    updates: int = 4000  # optimiser updates
    batch_size: int = 128  # global batch (split over torchrun ranks)
    lr: float = 1e-3  # AdamW learning rate after warm-up
    warmup: int = 200  # updates of linear warm-up (0: none)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # gradient norm clip
    ema_decay: float = 0.999  # weight EMA the teacher samples with
    seed: int = 0  # data split, batches, noise and initial weights
    split_seed: int = -1  # the train/test split's seed (-1: seed); fixed apart from seed by a teacher-seed spread
    # run
    ckpt_every: int = 250  # updates between checkpoints
    sample_every: int = 1000  # updates between sample pictures
    log_every: int = 50  # updates between metrics.csv rows
    out_dir: str = "runs/teacher-digits"  # the run dir
    device: str = "auto"  # auto, cpu or cuda[:N]
    deterministic: bool = False  # deterministic CUDA algorithms: bit-exact resume on the GPU



TrainConfig.RENAMED = {"steps": "updates"}  # field names of fastdiff before 0.2 (config.json, checkpoints)

PRESETS = {
    "toy2d": TrainConfig(dataset="toy2d", arch="mlp", hidden=256, layers=4, updates=4000, batch_size=512, lr=2e-3,
                         warmup=100, ema_decay=0.995, ckpt_every=500, sample_every=2000, out_dir="runs/teacher-toy2d"),
    "digits": TrainConfig(),
    "digits-cond": TrainConfig(cond="class", out_dir="runs/teacher-digits-cond"),
    # text-conditioned digits: captions with paraphrases, a word-level encoder trained with the U-Net
    "digits-text": TrainConfig(cond="text", out_dir="runs/teacher-digits-text"),
    # digits-text whose sevens are never captioned (they train only the null condition): a concept the model draws
    # but no prompt names, for textual inversion (python -m fastdiff.personalize_demo)
    "digits-text-unnamed7": TrainConfig(cond="text", unnamed=7, out_dir="runs/teacher-digits-text-unnamed7"),
    # digits-text where a quarter of the digits other than 7 are contrast-inverted and captioned "dark" (the only
    # images that word describes): the model knows "dark" and "seven" but never saw a dark seven
    "digits-text-dark": TrainConfig(cond="text", invert=0.25, invert_except=7, out_dir="runs/teacher-digits-text-dark"),
    # the same in the 4x4x4 latent space of the digits autoencoder (python -m fastdiff.autoencoder --preset digits)
    "digits-latent": TrainConfig(cond="text", autoencoder="runs/autoencoder-digits", out_dir="runs/teacher-digits-latent"),
    # the digits teacher as a diffusers UNet2DModel (exports to diffusers); T = 1024 so that every power-of-two
    # student N divides T, which a stock DDIMScheduler needs to reproduce the grid i/N
    "digits-diffusers": TrainConfig(arch="diffusers-unet2d", T=1024, out_dir="runs/teacher-digits-diffusers"),
    # The DDPM paper's CIFAR-10 settings (Ho et al. 2020, App. B): 35.7M-parameter U-Net, linear schedule,
    # L_simple, lr 2e-4 with 5000 warm-up updates, batch 128, dropout 0.1, EMA 0.9999, 800k updates, flips.
    "cifar10": TrainConfig(dataset="cifar10", schedule="linear", param="eps", weighting="eps-mse", channels=128,
                           channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), head_dim=256,
                           dropout=0.1, updates=800_000, lr=2e-4, warmup=5000, ema_decay=0.9999, flip=True,
                           ckpt_every=5000, sample_every=20_000, log_every=100, out_dir="runs/teacher-cifar10"),
}


def validate(cfg: TrainConfig) -> None:
    """Raise FastdiffError for field values no run could use."""
    cfgs.check_choices(cfg)
    for name in ("updates", "batch_size", "T", "channels", "hidden", "layers", "ckpt_every", "log_every",
                 "sample_every"):
        if getattr(cfg, name) < 1:
            raise FastdiffError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    cfgs.check_range(cfg, "lr", cfg.lr > 0, "> 0")
    cfgs.check_range(cfg, "ema_decay", 0 <= cfg.ema_decay < 1, "in [0, 1)")
    cfgs.check_range(cfg, "label_dropout", 0 <= cfg.label_dropout < 1, "in [0, 1)")
    shape, num_classes = static_info(cfg.dataset, cfg.image_size)
    cfgs.check_range(cfg, "invert", 0 <= cfg.invert < 1, "in [0, 1)")
    if cfg.invert and cfg.cond != "text":
        raise FastdiffError("--invert captions the inverted examples with 'dark': it needs --cond text")
    if cfg.invert_except != -1 and not (cfg.invert and 0 <= cfg.invert_except < num_classes):
        raise FastdiffError(f"--invert-except {cfg.invert_except}: give a label (0..{num_classes - 1}) of an --invert run, "
                            "or -1")
    if cfg.unnamed != -1 and (cfg.cond == "none" or not 0 <= cfg.unnamed < num_classes):
        raise FastdiffError(f"--unnamed {cfg.unnamed}: give a label of the data set (0..{num_classes - 1}) of a "
                            "conditional run, or -1")
    if (cfg.arch == "mlp") != (len(shape) == 1):
        raise FastdiffError(f"--arch {cfg.arch} does not fit data set {cfg.dataset!r} (use mlp for toy2d, unet for "
                            "images)")
    if cfg.cond == "class" and num_classes == 0:
        raise FastdiffError(f"--cond class needs a labelled data set; {cfg.dataset!r} has no labels")
    if cfg.cond == "text" and cfg.dataset != "digits":
        raise FastdiffError(f"--cond text needs captions, which only the digits data set has; got {cfg.dataset!r}")
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise FastdiffError(f"--device {cfg.device!r}: use auto, cpu or cuda[:N]")
    if cfg.autoencoder and len(shape) != 3:
        raise FastdiffError(f"--autoencoder needs an image data set; {cfg.dataset!r} has points")


def codec_of(cfg: TrainConfig):
    """The autoencoder of a latent run (fastdiff.latent.Codec), else None."""
    from fastdiff.latent import codec_from_folder

    return codec_from_folder(cfg.autoencoder) if cfg.autoencoder else None


def data_shape(cfg: TrainConfig) -> tuple[int, ...]:
    """The shape of one example the network sees: the data set's, or its latent's under --autoencoder."""
    shape, _ = static_info(cfg.dataset, cfg.image_size)
    return codec_of(cfg).latent_shape(shape) if cfg.autoencoder else tuple(shape)


def training_data(cfg: TrainConfig, codec, cache_dir, data=None):
    """The training split of `cfg`'s data set (`data` if already loaded); under an autoencoder `codec`, its scaled
    latents (encoded once and cached in `cache_dir`, fastdiff.latent.cached_latents)."""
    from fastdiff.latent import cached_latents

    data = data if data is not None else get_data(cfg.dataset, "train", cfg.data_root, data_seed(cfg), cfg.image_size)
    if codec is None:
        return data
    z = cached_latents(codec, data.x, cache_dir, f"{cfg.dataset}-train-split{data_seed(cfg)}")
    return dataclasses.replace(data, x=z)


def progress_label(cfg: TrainConfig) -> str:
    """`train digits`, `train digits text-conditional latent`, ...: what the progress bar and a stop message name."""
    cond = {"class": " class-conditional", "text": " text-conditional"}.get(cfg.cond, "")
    return f"train {cfg.dataset}{cond}{' latent' if cfg.autoencoder else ''}"


def network_config(cfg: TrainConfig):
    """The network a TrainConfig describes (data shape and classes come from the data set's name)."""
    _, num_classes = static_info(cfg.dataset, cfg.image_size)
    return model_config(cfg.arch, data_shape(cfg), num_classes if cfg.cond != "none" else 0, dataclasses.asdict(cfg))


def build_network(cfg: TrainConfig) -> torch.nn.Module:
    return build_model(network_config(cfg))


def save_sample_picture(net, cfg: TrainConfig, device, path: Path, n: int = 64) -> None:
    """DDIM(eta=0, 32 steps) samples from `net` to a PNG, with fixed per-index noise (decoded, for a latent model)."""
    from fastdiff.data import to_uint8
    from fastdiff.latent import clips_x0
    from fastdiff.samplers import make_grid, sample
    from fastdiff.viz import save_samples

    schedule = Schedule(cfg.schedule, cfg.T)
    shape, codec = data_shape(cfg), codec_of(cfg)
    n = n if len(shape) > 1 else 2000
    out = sample(net, n, shape, make_grid("student", 32, schedule), schedule=schedule, param=cfg.param,
                 seed=cfg.seed, device=device, clip=clips_x0(shape, codec))
    out = codec.to(device).decode(out) if codec is not None else out
    arr = to_uint8(out).cpu().numpy() if len(shape) > 1 else out.cpu().numpy()
    save_samples(arr, path, title=path.stem)


def train(cfg: TrainConfig, progress: bool = True, on_step: Callable[[int], None] | None = None) -> Path:
    """Train (or resume) the teacher described by `cfg`; returns the run dir.

    Holds the run dir's lock throughout (FastdiffError if another process has it). A stop request (SIGTERM or
    SIGINT under `runs.graceful_stop`, or `runs.request_stop`) ends it after the current update with a
    checkpoint, raising `Preempted`.
    """
    validate(cfg)
    device = runs.resolve_device(cfg.device)
    runs.set_deterministic(cfg.deterministic)
    with contextlib.ExitStack() as held:
        # A run dir refused or locked on rank 0, data missing on one node: an error on every rank.
        with dist.same_outcome():
            data, codec = get_data(cfg.dataset, "train", cfg.data_root, data_seed(cfg), cfg.image_size), codec_of(cfg)
            run = (runs.prepare_run_dir(cfg.out_dir, cfgs.to_dict(cfg), NON_RESULT_FIELDS, cfgs.to_dict(TrainConfig()),
                                        TrainConfig.RENAMED)
                   if dist.is_main() else Path(cfg.out_dir))
            data = training_data(cfg, codec, run, data)
            held.enter_context(runs.run_lock(run))
            # Read the checkpoint before writing anything: unreadable ones must leave the run dir as it was.
            ckpt = load_resumable(run / CKPT_NAME, map_location=device)
            if ckpt is not None and codec is not None and ckpt.get("autoencoder", {}).get("hash") != codec.hash:
                raise FastdiffError(f"{run} was trained on the latents of another autoencoder than {cfg.autoencoder} "
                                    f"(id {codec.hash}); train the autoencoder it had, or choose another --out-dir")
        if dist.is_main():
            write_text(run / "config.json", cfgs.dumps(cfg))
        _fit_teacher(cfg, run, data, ckpt, device, progress, on_step, codec)
    return run


def _fit_teacher(cfg: TrainConfig, run: Path, data, ckpt: dict | None, device, progress: bool, on_step,
                 codec=None) -> None:
    """The teacher's updates (Ho et al. 2020, Alg. 1 with the configured param and weighting) through runs.fit, with
    the weight EMA, metrics.csv and sample pictures as its per-update bookkeeping."""
    ckpt_path = run / CKPT_NAME
    torch.manual_seed(cfg.seed + dist.rank())  # dropout; the data/noise stream has its own generator
    net = build_network(cfg).to(device)
    # eval(): the EMA net only samples (pictures), so no dropout and no draws from the global RNG there.
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + dist.rank())
    start, acc = 0, [0.0, 0]  # the metrics row in progress: sum of losses, count
    if ckpt is not None:
        ema.load_state_dict(ckpt["ema"])
        start, acc = runs.update_of(ckpt), list(ckpt.get("loss_acc", (0.0, 0)))  # so that metrics.csv matches too
    if start >= cfg.updates:
        log.info("%s already finished (%d updates); nothing to do", run, start)
        return
    metrics = runs.MetricsLog(run / "metrics.csv", ["update", "loss", "lr", "grad_norm", "wall_s"], start)
    x_all = data.x.to(device)
    y_all = data.y.to(device) if (cfg.cond != "none" and data.y is not None) else None
    conditioner = (Conditioner(cfg.cond, data.num_classes, net, device, unnamed=cfg.unnamed) if y_all is not None
                   else None)
    schedule = Schedule(cfg.schedule, cfg.T)
    local_batch = dist.local_batch_size(cfg.batch_size)
    t_here = time.perf_counter()
    t_start = t_here - (ckpt.get("wall_clock_s", 0.0) if ckpt is not None else 0.0)  # wall_s goes on across resumes

    def loss_fn(model) -> torch.Tensor:
        # The batch, the flips and the dropped labels come from the run's own stream, then t and eps.
        idx = torch.randint(len(x_all), (local_batch,), generator=gen).to(device)
        x0 = x_all[idx]
        if cfg.flip:
            flip = (torch.rand(local_batch, generator=gen) < 0.5).to(device)
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        dark = None
        if cfg.invert:  # contrast-inverted examples, captioned "dark" (fastdiff.text.CaptionBank.sample)
            dark = (torch.rand(local_batch, generator=gen) < cfg.invert).to(device) & (y_all[idx] != cfg.invert_except)
            x0 = torch.where(dark[:, None, None, None], -x0, x0)
        y = None if conditioner is None else conditioner(y_all[idx], gen, cfg.label_dropout, dark=dark)
        return diffusion_loss(model, x0, schedule, cfg.param, cfg.weighting, gen, y=y).mean()

    def after_update(update: int, loss: float, lr: float, grad_norm) -> None:
        with torch.no_grad():  # the weight EMA the teacher samples with
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - cfg.ema_decay)
        acc[0], acc[1] = acc[0] + loss, acc[1] + 1
        if update % cfg.log_every == 0 or update == cfg.updates:
            metrics.append({"update": update, "loss": f"{acc[0] / acc[1]:.6f}", "lr": f"{lr:.3g}",
                            "grad_norm": f"{grad_norm.item():.4f}", "wall_s": f"{time.perf_counter() - t_start:.1f}"})
            acc[0], acc[1] = 0.0, 0
        if dist.is_main() and (update % cfg.sample_every == 0 or update == cfg.updates):
            save_sample_picture(ema, cfg, device, run / f"samples_{update:07d}.png")

    network = network_to_dict(network_config(cfg))
    latent = {"autoencoder": codec.to_payload()} if codec is not None else {}  # the same in every checkpoint
    extra_state = lambda: {"kind": "teacher", "config": cfgs.to_dict(cfg), "param": cfg.param,  # noqa: E731
                           "network": network, "data_shape": list(data.shape), "ema": ema.state_dict(),
                           "loss_acc": tuple(acc), **latent}
    runs.fit(net, opt, total=cfg.updates, loss_fn=loss_fn, gen=gen, salt=cfg.seed * 1000, device=device,
             lr_at=lambda update: cfg.lr * min(1.0, (update + 1) / max(cfg.warmup, 1)),  # --warmup 0: no warm-up
             state_path=ckpt_path, ckpt_every=cfg.ckpt_every, label=progress_label(cfg), resume=ckpt,
             extra_state=extra_state, after_update=after_update, on_step=on_step, grad_clip=cfg.grad_clip,
             autocast=True, progress=progress)
    dist.barrier()  # the last checkpoint is on disk before any rank returns (distill loads it as its teacher)
    log.info("trained %s to %d updates (%d of them in this process, %.1f s)", run, cfg.updates, cfg.updates - start,
             time.perf_counter() - t_here)


def main(argv: Sequence[str] | None = None) -> int:
    dist.configure_cpu_threads()
    cfg, args = runs.config_from_argv(argv, TrainConfig, PRESETS, "python -m fastdiff.train",
                                      "Train a teacher diffusion model.")
    if args.dry_run:
        return dry_run(cfg)
    with dist.init_from_env(cfg.device), runs.graceful_stop():
        t0 = time.perf_counter()
        run = train(cfg)
        if dist.is_main():
            print(f"teacher ready: {run / CKPT_NAME} ({time.perf_counter() - t0:.0f} s)")
    return 0


def dry_run(cfg: TrainConfig) -> int:
    """Check `cfg` and its run dir and say what `train` would do; loads the data and the checkpoint, writes nothing."""
    validate(cfg)
    runs.resolve_device(cfg.device)
    data = get_data(cfg.dataset, "train", cfg.data_root, data_seed(cfg), cfg.image_size)
    codec_of(cfg)  # a missing autoencoder is an error here too
    run = Path(cfg.out_dir)
    runs.check_run_dir(run, cfgs.to_dict(cfg), NON_RESULT_FIELDS, cfgs.to_dict(TrainConfig()), TrainConfig.RENAMED)
    ckpt = load_resumable(run / CKPT_NAME, set_aside=False) if run.is_dir() else None
    start = 0 if ckpt is None else runs.update_of(ckpt)
    params = sum(p.numel() for p in build_network(cfg).parameters())
    print(f"{cfg.arch} of {params:,} parameters on {cfg.dataset} ({len(data.x)} examples), {cfg.schedule} schedule, "
          f"param {cfg.param}: updates {start} -> {cfg.updates} in {run}" + (" (resumed)" if start else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
