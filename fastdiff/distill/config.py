"""The configuration of a distillation run: `DistillConfig`, its presets, and the checks made before any work."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastdiff import config as cfgs
from fastdiff.errors import FastdiffError
from fastdiff.noise import NoiseRNG
from fastdiff.param import Param
from fastdiff.train import PRESETS as TRAIN_PRESETS

NON_RESULT_FIELDS = ("out_dir", "data_root", "device", "ckpt_every", "eval_samples", "bench", "results_dir",
                     "bench_steps",
                     "eval_guidance", "inception_weights", "deterministic", "append_results", "bench_samples",
                     "bench_samplers", "bench_teacher_samples", "full", "noise")


@dataclass(frozen=True)
class DistillCommon:
    """What every distillation run has (the teacher, the students' training, the evaluation, the sweep);
    DistillConfig adds one section per registered method with options (`cfg.pd`, `cfg.cd`)."""

    # the teacher
    teacher: str = ""  # a teacher run dir, checkpoint, diffusers folder or hub id (empty: train/reuse the preset's)
    teacher_preset: str = "digits"  # the TrainConfig preset of the teacher (its data set and schedule)
    teacher_updates: int = 0  # updates of a teacher trained here (0: the preset's)
    teacher_seed: int = -1  # seed of a teacher trained here (-1: the preset's); its data split stays the preset's
    dataset: str = ""  # the data set a diffusers --teacher was trained on (digits, cifar10, folder, ...)
    data_root: str = ""  # folder of that data set's files (cifar10: cifar-10-batches-py; folder: images)
    method: str = "pd"  # registered methods, comma-separated, run in order: pd (Salimans & Ho 2022), cd (Song et al. 2023), pd,cd
    param: Param = "v"  # what the students predict (eps fails at few steps: the paper's point)
    lr: float = 2e-4  # Adam learning rate (PD: annealed linearly to 0 in every round)
    batch_size: int = 128  # global batch (split over torchrun ranks)
    seed: int = 0  # batches, noise, evaluation noise
    ckpt_every: int = 100  # updates between state checkpoints
    eval_samples: int = 500  # samples of each round's FID (student vs the teacher's DDIM at the same steps)
    out_dir: str = "runs/distill-digits"  # the run dir
    device: str = "auto"  # auto, cpu or cuda[:N]
    deterministic: bool = False  # deterministic CUDA algorithms: bit-exact resume on the GPU
    # guided distillation (Meng et al. 2023; CD: LCM-style)
    guided: bool = False  # distil the CFG teacher: PD first into a w-conditioned student, CD with w as an input
    w_min: float = 0.0  # guidance weights drawn from U[w_min, w_max] in training
    w_max: float = 4.0  # see w_min
    eval_guidance: float = 2.0  # the w at which guided rounds are evaluated
    # the sweep and report at the end
    bench: bool = True  # run the FID-vs-steps sweep and write the report after the rounds
    noise: NoiseRNG = "philox"  # the evaluations' and the sweep's per-sample noise (torch-cpu: fastdiff <= 0.5's)
    bench_steps: tuple[int, ...] = ()  # sampling steps of the sweep (empty: the bench preset's)
    bench_samples: int = 0  # samples per row (0: the bench preset's)
    bench_samplers: tuple[str, ...] = ()  # samplers of the sweep (empty: the bench preset's)
    bench_teacher_samples: int = 0  # teacher samples that KID to the teacher is measured against (0: the preset's)
    full: bool = False  # the full sweep: adds DDPM (1000 steps), strided DDPM, DDIM eta=1, 2 UniPC variants, 10/20
    results_dir: str = "runs/results"  # where the sweep's CSV, plots and report go
    append_results: bool = False  # add this teacher's rows to a CSV that holds another teacher's sweep
    inception_weights: str = ""  # local Inception-v3 weights for RGB data (rounds' FID and the sweep)


def _sections() -> list[tuple[str, type, dataclasses.Field]]:
    from fastdiff.distill.protocol import get_method, method_names

    return [(name, get_method(name).options, dataclasses.field(default_factory=get_method(name).options))
            for name in method_names() if get_method(name).options is not None]


# DistillCommon + a section per registered method with options: fastdiff's own (pd, cd) and installed packages'
DistillConfig = dataclasses.make_dataclass("DistillConfig", _sections(), bases=(DistillCommon,), frozen=True)
DistillConfig.__module__ = __name__
DistillConfig.__doc__ = """A distillation run: DistillCommon's fields, and `cfg.<method>` the options of each registered
method (fastdiff.distill.protocol.Method.options): `cfg.pd` progressive distillation's, `cfg.cd` consistency
distillation's. `teacher_preset` names the TrainConfig preset of the teacher."""
# field names of fastdiff before 0.2 (config.json); the flat names of the methods' options come from their FLAT
DistillConfig.RENAMED = {"teacher_steps": "teacher_updates", "steps_per_round": "pd.updates_per_round"}


def _options(method: str, **kw):
    from fastdiff.distill.protocol import get_method

    return get_method(method).options(**kw)


PRESETS = {
    # Sized for a 2-core CPU, the whole default (teacher, three methods, sweep with the 1000-step DDPM row) within
    # 45 min: the sweep stops at 64 steps, where DDIM has converged (10 and 20: DDIM's paper). PD, CD and DMD2 from the
    # same teacher at equal cost in forward-equivalents (PD's 1200 updates; CD's 1200 at the same cost per update;
    # DMD2's fewer, dearer ones), each evaluated at every PD student's cost. PD's updates go where they matter: 100 per
    # round from 64 steps down to 4, 400 for the rounds to 2 and 1 step (the paper doubles its last two rounds).
    # DMD2: a 1-step generator with 2 fake-score updates per generator update, measured better at this cost than
    # DMD2's 5 (1-step FID-classifier 2.96 vs 9.01) and than a 4-step generator (21.8 at 1 NFE), which both would
    # not fit the budget beside.
    "digits": DistillConfig(method="pd+cd+dmd2", pd=_options("pd", updates_per_round=100, last_rounds_factor=4),
                            dmd2=_options("dmd2", fake_updates=2), bench_steps=(1, 2, 4, 8, 16, 32, 64)),
    # the digits run on the diffusers UNet2DModel architecture: its students export with python -m fastdiff.export
    "digits-diffusers": DistillConfig(teacher_preset="digits-diffusers",
                                      pd=_options("pd", start_steps=16, updates_per_round=400),
                                      out_dir="runs/distill-digits-diffusers",
                                      bench_steps=(1, 2, 4, 8, 16, 32, 64)),
    "toy2d": DistillConfig(teacher_preset="toy2d", pd=_options("pd", start_steps=64, updates_per_round=400), lr=5e-4,
                           batch_size=512,
                           eval_samples=2000, out_dir="runs/distill-toy2d"),
    # Meng et al. 2023: a class-conditional teacher under classifier-free guidance, distilled first into one
    # network that takes the guidance weight w as an input, then progressively.
    "digits-guided": DistillConfig(teacher_preset="digits-cond", guided=True,
                                   pd=_options("pd", start_steps=16, updates_per_round=300, guided_base_updates=800),
                                   out_dir="runs/distill-digits-guided",
                                   bench_steps=(1, 2, 4, 8, 16, 32)),
    # The text-conditioned digits teacher (captions with paraphrases, cross-attention) distilled under guidance: the
    # w-conditioned first stage and two PD rounds 16 -> 8 -> 4 steps (1400 updates), and LCM-style guided CD with as
    # many updates; the sweep: FID and prompt accuracy against w, the prompts held-out paraphrases.
    "digits-text": DistillConfig(teacher_preset="digits-text", guided=True, method="pd+cd",
                                 pd=_options("pd", start_steps=16, rounds=2, updates_per_round=300,
                                             last_rounds_factor=1, guided_base_updates=800),
                                 cd=_options("cd", eval_every=400), out_dir="runs/distill-digits-text",
                                 bench_steps=(1, 2, 4, 8, 16, 32)),
    # digits-text's protocol in the 4x4x4 latent space of the digits autoencoder (trained first if missing)
    "digits-latent": DistillConfig(teacher_preset="digits-latent", guided=True, method="pd+cd",
                                   pd=_options("pd", start_steps=16, rounds=2, updates_per_round=300,
                                               last_rounds_factor=1, guided_base_updates=800),
                                   cd=_options("cd", eval_every=400), out_dir="runs/distill-digits-latent",
                                   bench_steps=(1, 2, 4, 8, 16, 32)),
    # Salimans & Ho 2022 (CIFAR-10): 8192 -> 1 steps, 50k updates per round (100k for the last two),
    # Adam lr 5e-5 linearly annealed to 0, batch 128, no EMA during distillation.
    "cifar10": DistillConfig(teacher_preset="cifar10", pd=_options("pd", start_steps=8192, updates_per_round=50_000),
                             lr=5e-5,
                             ckpt_every=2000, eval_samples=10_000, out_dir="runs/distill-cifar10"),
}


def methods_of(cfg: DistillConfig) -> tuple[str, ...]:
    """The names of the run's methods, in order (--method: registered names joined by "," or "+")."""
    from fastdiff.distill.protocol import parse_methods

    return tuple(m.name for m in parse_methods(cfg.method))


def fields_of_other_methods(cfg: DistillConfig) -> tuple[str, ...]:
    """The dotted config fields (cfgs.flatten) that only methods not in this run read: the sections of the methods
    neither run nor used by one that runs (its run dir does not depend on them)."""
    from fastdiff.distill.protocol import get_method

    mine = methods_of(cfg)
    read = set(mine) | {used for name in mine for used in get_method(name).uses}
    unread = {name for name, _, _ in _sections()} - read
    return tuple(path for path, _, _ in cfgs.leaves(DistillConfig) if path.partition(".")[0] in unread)


def validate(cfg: DistillConfig) -> None:
    if cfg.teacher_preset not in TRAIN_PRESETS:
        raise FastdiffError(f"unknown --teacher-preset {cfg.teacher_preset!r}; choose one of "
                            f"{', '.join(TRAIN_PRESETS)}")
    cfgs.check_choices(cfg)
    for name in ("batch_size", "ckpt_every", "eval_samples"):
        if getattr(cfg, name) < 1:
            raise FastdiffError(f"--{name.replace('_', '-')} must be >= 1")
    from fastdiff.registry import sampler_names

    unknown = [name for name in cfg.bench_samplers if name not in sampler_names()]
    if unknown:
        raise FastdiffError(f"--bench-samplers: unknown {', '.join(unknown)}; choose from {', '.join(sampler_names())}")
    cfgs.check_range(cfg, "lr", cfg.lr > 0, "> 0")
    from fastdiff.distill.protocol import get_method, parse_methods

    for method in parse_methods(cfg.method):
        for needed in (method.name, *method.uses):
            if get_method(needed).options is not None and not hasattr(cfg, needed):
                raise FastdiffError(f"--method {method.name}: method {needed!r} has options but DistillConfig has no "
                                    "section for it (register it before fastdiff.distill.config is imported, e.g. as "
                                    "an entry point)")
        method.validate(cfg)
    if (cfg.dataset or cfg.data_root) and not cfg.teacher:
        raise FastdiffError("--dataset/--data-root name the data of a diffusers --teacher; a preset teacher's data "
                            "comes from --teacher-preset")
    cfgs.check_range(cfg, "bench_samples", cfg.bench_samples >= 0, ">= 0 (0: the bench preset's)")
    cfgs.check_range(cfg, "bench_teacher_samples", cfg.bench_teacher_samples == 0 or cfg.bench_teacher_samples >= 10,
                     "0 (the bench preset's) or >= 10")


def dataset_of(cfg: DistillConfig) -> str:
    """The run's data set: --dataset (a diffusers teacher's), else the teacher preset's."""
    return (cfg.dataset or TRAIN_PRESETS[cfg.teacher_preset].dataset).partition(":")[0]


def sweep_name(cfg: DistillConfig) -> str:
    """The results folder of the run's sweep: the data set's name, `-guided` for a guided family (`-text` for a text
    teacher preset's), `-diffusers` for a
    teacher of the diffusers UNet2DModel architecture (a preset's, or a diffusers --teacher), `-tseed<S>` for a
    teacher trained here with --teacher-seed S other than the preset's."""
    dataset = dataset_of(cfg)
    preset_seed = TRAIN_PRESETS[cfg.teacher_preset].seed
    tag = f"-tseed{cfg.teacher_seed}" if not cfg.teacher and cfg.teacher_seed not in (-1, preset_seed) else ""
    return _sweep_base(cfg, dataset) + tag


def _sweep_base(cfg: DistillConfig, dataset: str) -> str:
    from fastdiff.interop import is_diffusers_source

    if cfg.guided:  # a text teacher's family is <dataset>-text, a class teacher's <dataset>-guided
        preset = TRAIN_PRESETS[cfg.teacher_preset]
        return f"{dataset}-{'latent' if preset.autoencoder else 'text' if preset.cond == 'text' else 'guided'}"
    diffusers_arch = (is_diffusers_source(cfg.teacher) if cfg.teacher
                      else TRAIN_PRESETS[cfg.teacher_preset].arch == "diffusers-unet2d")
    return f"{dataset}-diffusers" if diffusers_arch else dataset
