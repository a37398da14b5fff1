"""FID vs steps: `python -m fastdiff.bench --model RUN_DIR [--distill-dir RUN_DIR] [--preset digits] [...]`.

Sweeps (sampler, step count) pairs over one model family and appends one long-format row per
(sampler, steps, metric) to `<out_dir>/<dataset>/fid_vs_steps.csv`:

- ``ddpm``: ancestral sampling on the teacher's full grid k/T (one row, steps = T);
- ``ddpm-strided``, ``ddim`` (eta 0), ``ddim-eta1``: on strided integer grids, one line per `spacings` entry;
- ``dpm++2m`` and ``dpm++3m`` (DPM-Solver++(2M) and (3M), Lu et al. 2022) and ``unipc2-bh1``, ``unipc3-bh1``,
  ``unipc2-bh2``, ``unipc3-bh2`` (UniPC of order 2 or 3 with B(h) bh1 or bh2, Zhao et al. 2023): the training-free
  multistep solvers as diffusers runs them, on the uniform-logSNR grid, NFE = steps;
- ``heun`` (Karras et al. 2022 Alg. 1, Karras grid, steps = (nfe + 1) // 2 so that its NFE = 2 steps - 1 tracks
  the step counts; the true NFE is recorded);
- the students of `--distill-dir`: every checkpoint in its students/ whose role names a sampler of the sweep
  (fastdiff.checkpoint.role_of), by that sampler's row rule (fastdiff.registry): ``distilled`` (progressive
  students, DDIM eta 0 on their own grid i/N, one row each), ``consistency`` (the CD student students/cd.pt,
  multistep consistency sampling on grid cd{N} at every step count <= N), and any registered method's.

Every row uses the same `n_samples` and the same noise per sample index (fastdiff.noise: Philox keyed by (seed,
k, draw, element); `--noise torch-cpu` for fastdiff <= 0.5's CPU generators), so sample k is the same whatever
the batch size, and the curves differ only by the sampler. A re-run computes
only the rows missing from the CSV (key: every column that defines a row, not the measured ones). For each
row the first samples are kept in `samples/*.npz` (16 uint8 images or up to 500 float points) for the report.
Under torchrun whole batches are sharded over the ranks (batch j on rank j mod K); rank 0 scores and writes.

One process at a time holds a results folder. Finished batches of the row in progress are kept under
`partial/`, so a sweep stopped by SIGTERM/SIGINT (after the current batch, exit 143/130) or killed resumes
mid-row. A CSV holding another teacher's sweep is refused unless `--append`; the default `--out-dir` is
runs/results, apart from the committed reference results in results/.

Presets (`--preset`): ``digits`` (the CPU default: 500 samples, steps 1..64, the project's classifier features),
``toy2d`` (identity features + sliced Wasserstein, 2000 samples) and ``cifar10``, the protocol of DDIM (Song et al.
2021) and progressive distillation (Salimans & Ho 2022): 50k samples, torch-fidelity's Inception-v3 pool3 FID
against the 50k CIFAR-10 train images, x0 clipped, quadratic and linear spacing. It needs a GPU, `--data-root` (the
folder holding cifar-10-batches-py) and `--inception-weights PATH` (or internet). The published FIDs to compare with:

    published CIFAR-10 FID (50k samples)               steps: FID
    DDIM eta=0, quadratic spacing (Song et al. 2021)   10: 13.36   20: 6.84   50: 4.67   100: 4.16
    progressive distillation (Salimans & Ho 2022)       1: 9.12     2: 4.51    4: 3.00     8: 2.57
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Annotated, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
import torch_fidelity
from tqdm import tqdm

import fastdiff
from fastdiff import config as cfgs
from fastdiff import distributed as dist
from fastdiff import registry, runs
from fastdiff.conditioning import requested_classes
from fastdiff.guidance import to_fastdiff_w
from fastdiff.text import eval_prompts_csv
from fastdiff.errors import FastdiffError, run_cli
from fastdiff.features import ExtractorName, extract_features, resolve_extractor, slug, to_extractor_input
from fastdiff.graphs import CudaGraphs, use_graphs
from fastdiff.grids import Spacing, make_grid
from fastdiff.io import atomic_path, cache_dir, write_text
from fastdiff.metrics import Metric, Reference, class_accuracy, compute_metrics
from fastdiff.noise import ROW_NAMES, NoiseRNG
from fastdiff.results import (CONSTRAINTS_NAME, CSV_NAME, COLUMNS, ResultsCSV, git_commit, installed_versions,
                              teacher_hashes, to_csv_value)
from fastdiff.samplers import Variance
from fastdiff.schedules import Schedule
from fastdiff.sweep import (Family, Network, PartialRow, Spec, accuracy_metric, generate, load_family,
                            warm_up)
from fastdiff.scoring import Scorer
from fastdiff.uncertainty import load_ref_stats
from fastdiff.uncertainty import fid as fid_of

log = logging.getLogger(__name__)

# the sweep's samplers: every entry of the sampler registry (fastdiff.registry), checked when the config is
SamplerName = Annotated[str, cfgs.OneOf(registry.sampler_names)]
SAMPLERS: tuple[str, ...] = registry.installed_sampler_names()  # fastdiff's own (+ plugins'), in a sweep's order
CONFIG_NAME, SAMPLES_DIR, PARTIAL_DIR = "bench_config.json", "samples", "partial"
PROMPTS_NAME = "prompts.csv"  # a text family's prompt per sample index
GUIDANCE_SWEEP = (0.0, 1.0, 2.0, 4.0)
N_SAVED_IMAGES, N_SAVED_POINTS = 16, 500


@dataclass(frozen=True)
class BenchConfig:
    """One FID-vs-steps sweep. `model` is a teacher checkpoint or run dir (or empty to take the teacher of
    `distill_dir`); `dataset` empty means the model's; `n_ref` 0 means the whole `ref_split`.

    `guidance` (w values) sweeps a class- or text-conditional family under classifier-free guidance: sample k asks
    for class k % num_classes (a text family: in the held-out paraphrase fastdiff.text.eval_prompt(k)), the teacher
    is guided through the sampler, a guided student takes w as its input, and each row also gets the accuracy on the
    asked-for class (`class_accuracy`, `prompt_accuracy`). Weights are fastdiff's w (u + w (c - u)); written in
    another convention with `guidance_convention` (fastdiff.guidance.CONVENTIONS), they are converted once, here,
    and the rows record w. `name` is the results folder (default: dataset).
    """

    # the model family and its data
    model: str = ""  # a teacher run dir, checkpoint, diffusers folder or hub id (empty: the teacher of --distill-dir)
    distill_dir: str = ""  # a distillation run dir: its students join the sweep
    dataset: str = ""  # the reference data set (empty: the model's)
    data_root: str = ""  # folder of the reference data (empty: the teacher's)
    # the sampling runs
    samplers: tuple[SamplerName, ...] = SAMPLERS  # ddpm: its full grid once; distilled: every student; others: --steps
    spacings: tuple[Spacing, ...] = ("quadratic", "linspace")  # strided grids of ddpm-strided and ddim
    steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # sampling steps (Heun: NFE ~ these)
    variance: Variance = "large"  # DDPM's beta or beta-tilde
    clip: bool = True  # clip x0_hat to [-1, 1] (pixel models; never in latent space)
    guidance: tuple[float, ...] = ()  # classifier-free guidance weights to sweep (class- or text-conditional families)
    guidance_convention: Literal["fastdiff", "meng", "diffusers"] = "fastdiff"  # how --guidance is written; rows: w
    n_samples: int = 1000  # samples per row, the same per-index noise in every row
    batch_size: int = 500  # samples per forward (per process under torchrun)
    seed: int = 0  # the per-index noise
    noise: NoiseRNG = "philox"  # its generator: philox (counter-based, drawn on the device) or torch-cpu (<= 0.5's)
    cuda_graphs: CudaGraphs = "auto"  # time DDPM/DDIM/student rows as one CUDA graph per batch shape (auto: on CUDA)
    # the metric
    extractor: ExtractorName = "auto"  # features of FID, KID and precision/recall
    metrics: tuple[Metric, ...] = ("fid", "prc")  # prc: precision and recall
    ref_split: Literal["auto", "train", "test"] = "auto"  # the reference split (auto: held-out test; cifar10: train)
    n_ref: int = 0  # reference examples (0: the whole split)
    ref_stats: str = ""  # precomputed reference statistics .npz (mu, sigma: pytorch-fid, clean-fid, EDM) for FID
    inception_weights: str = ""  # local Inception-v3 weights file (offline)
    ci_resamples: int = 1000  # paired-bootstrap resamples of the FID differences to the anchor (0: none)
    ci_anchor: str = ""  # the row differences are taken to, SAMPLER:STEPS (empty: ddim at the most steps)
    teacher_samples: int = 0  # samples of the teacher (the anchor's sampler, own seeds) for KID to the teacher (0: none)
    timing_repeats: int = 0  # a separate wall-clock pass after the sweep: rounds over every row (0: none; >= 5)
    timing_batch: int = 0  # samples per timed batch of that pass (0: batch_size)
    # outputs
    out_dir: str = "runs/results"  # results folder: <out_dir>/<name>/fid_vs_steps.csv and the report
    name: str = ""  # the sweep's folder under out_dir (empty: the data set's name)
    append: bool = False  # add this teacher's rows to a CSV that holds another teacher's sweep
    device: str = "auto"  # auto, cpu or cuda[:N]


PRESETS = {
    # The CPU defaults, one spacing each (add --spacings quadratic,linspace for the DDIM paper's comparison); the
    # digits sweep is ~1900 forwards of 500 samples, 1000 of them the full-grid DDPM row and 127 (1 + 2 + ... + 64)
    # each multistep solver's, students aside. Scored against the 360 held-out test digits; KID to the teacher
    # against 1000 of its own DDIM-64 samples (64 forwards of 500 samples, once per teacher: cached).
    "digits": BenchConfig(steps=(1, 2, 4, 8, 16, 32, 64), spacings=("linspace",), n_samples=500, batch_size=500,
                          metrics=("fid", "kid", "prc"), teacher_samples=1000),
    "toy2d": BenchConfig(steps=(1, 2, 4, 8, 16, 32, 64), spacings=("linspace",), n_samples=2000, batch_size=2000,
                         clip=False, metrics=("fid", "prc", "swd"), n_ref=5000),
    # The papers' protocol; see the module docstring for the published numbers.
    "cifar10": BenchConfig(steps=(1, 2, 4, 8, 10, 16, 20, 32, 50, 64, 100, 128, 256), n_samples=50_000,
                           batch_size=1000, extractor="inception", metrics=("fid",)),
}


def validate(cfg: BenchConfig) -> None:
    """Reject a config a sweep cannot run, before anything is loaded or written."""
    cfgs.check_choices(cfg)
    if not cfg.samplers or not cfg.metrics or not cfg.steps:
        raise FastdiffError("need at least one --samplers, --metrics and --steps entry")
    if any(s < 1 for s in cfg.steps):
        raise FastdiffError(f"--steps must all be >= 1, got {cfg.steps}")
    cfgs.check_range(cfg, "n_samples", cfg.n_samples >= (10 if "prc" in cfg.metrics else 4),
                     ">= 10 with prc (precision/recall: 3 neighbours, in half-samples too), else >= 4")
    cfgs.check_range(cfg, "batch_size", cfg.batch_size >= 1, ">= 1")
    cfgs.check_range(cfg, "n_ref", cfg.n_ref >= 0, ">= 0 (0: the whole split)")
    cfgs.check_range(cfg, "ci_resamples", cfg.ci_resamples >= 0, ">= 0 (0: no FID differences)")
    cfgs.check_range(cfg, "teacher_samples", cfg.teacher_samples == 0 or cfg.teacher_samples >= 10,
                     "0 (no KID to the teacher) or >= 10")
    cfgs.check_range(cfg, "timing_repeats", cfg.timing_repeats == 0 or cfg.timing_repeats >= 5,
                     "0 (no timing pass) or >= 5 (a median of at least 5)")
    cfgs.check_range(cfg, "timing_batch", cfg.timing_batch >= 0, ">= 0 (0: --batch-size)")
    if cfg.ref_stats:
        load_ref_stats(cfg.ref_stats)  # readable, mu (d,) and sigma (d, d)
        if tuple(cfg.metrics) != ("fid",):
            raise FastdiffError("--ref-stats gives FID only (KID, precision and recall need the reference samples): "
                                "pass --metrics fid")
    if not cfg.model and not cfg.distill_dir:
        raise FastdiffError("pass --model (a teacher run dir or checkpoint) or --distill-dir (a distillation run dir)")


def build_specs(cfg: BenchConfig, T: int, students: Mapping[str, Sequence[tuple[str, int]]] | None = None,
                takes_w: Callable[[Spec], bool] = lambda spec: False) -> list[Spec]:
    """Every sampling run of the sweep, in the order of cfg.samplers, by each sampler's row rule (fastdiff.registry);
    strided grids stop at T. `students` {sampler: [(its own grid, its N), ...]}: the students of the run (a
    progressive student: ("student", N), one row; a consistency student: ("cd18", 18), a row per step count <= N);
    none without them. `takes_w(spec)`: whether the spec's network takes the guidance weight as its input (a guided
    student), which decides how a weight in another convention converts (fastdiff.guidance.to_fastdiff_w)."""
    specs: list[Spec] = []
    strided = sorted(s for s in set(cfg.steps) if s <= T)
    if len(strided) < len(set(cfg.steps)):
        log.info("strided grids of a %d-step teacher stop at %d steps", T, T)
    for name in cfg.samplers:
        entry = registry.sampler(name)
        eta = entry.eta
        variance = cfg.variance if entry.eta is None else ""
        if entry.rows == "full":
            specs.append(Spec(name, entry.grid, T, eta, variance))
        elif entry.rows == "strided":
            specs += [Spec(name, sp, s, eta, variance) for sp in cfg.spacings for s in strided]
        elif entry.rows == "every":
            specs += [Spec(name, entry.grid, s, eta, variance) for s in sorted(set(cfg.steps))]
        elif entry.rows == "heun":
            specs += [Spec(name, entry.grid, s, eta, variance) for s in sorted({(n + 1) // 2 for n in cfg.steps})]
        elif entry.rows == "own":
            specs += [Spec(name, grid, n, eta, variance) for grid, n in sorted((students or {}).get(name, ()),
                                                                                key=lambda g: g[1])]
        else:  # "upto": every step count up to the student's N, on its own grid
            specs += [Spec(name, grid, s, eta, variance) for grid, n in (students or {}).get(name, ())
                      for s in sorted(set(cfg.steps)) if s <= n]
    if cfg.guidance:
        specs = [dataclasses.replace(spec, guidance=to_fastdiff_w(w, cfg.guidance_convention, takes_w(spec)))
                 for spec in specs for w in cfg.guidance]
    return specs


def family_specs(cfg: BenchConfig, family: Family) -> list[Spec]:
    """`build_specs` for a loaded family: its teacher's T, its students, and which networks take w as an input."""
    grids = {name: [(net.grid, net.steps) for net in nets] for name, nets in family.students.items()}
    return build_specs(cfg, family.teacher.schedule.T, grids, lambda spec: _network(family, spec).takes_w)


def device_name(device: torch.device) -> str:
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def samples_file(spec: Spec, network: Network, cfg: BenchConfig) -> str:
    """Relative path (to the CSV's folder) of the .npz keeping a row's first samples (independent of n: same noise)."""
    eta = "" if spec.eta is None else f"_eta{spec.eta:g}"
    eta += "" if spec.guidance is None else f"_w{spec.guidance:g}"
    name = f"{spec.sampler}_{spec.grid}_s{spec.steps}{eta}{'_' + spec.variance if spec.variance else ''}" \
           f"_clip{int(network.clip(cfg.clip))}_{network.hash}_seed{cfg.seed}.npz"
    return f"{SAMPLES_DIR}/{slug(name)}"


def save_samples(path: Path, x: torch.Tensor, spec: Spec, nfe: int) -> None:
    """Keep the first 16 images as uint8 (N, C, H, W), or the first 500 points as float32 (N, D)."""
    keep = to_extractor_input(x[:N_SAVED_IMAGES] if x.ndim == 4 else x[:N_SAVED_POINTS]).numpy()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, samples=keep, sampler=spec.sampler, grid=spec.grid, steps=spec.steps, nfe=nfe)


def results_csv_path(out_dir, name: str) -> Path:
    """Where a sweep named `name` (a data set, or a results folder name) writes its CSV under `out_dir`."""
    return Path(out_dir) / slug(name) / CSV_NAME


def check_not_mixed(csv_path: Path, teacher_hash: str, append: bool) -> None:
    """Refuse to add a teacher's rows to a CSV that holds another teacher's sweep, unless asked to (--append)."""
    others = teacher_hashes(csv_path) - {teacher_hash}
    if others and not append:
        raise FastdiffError(f"{csv_path} holds the sweep of teacher {', '.join(sorted(others))}, not of "
                            f"{teacher_hash}: pass --append to add this sweep to that file (the report draws each "
                            "sweep apart), or choose another --out-dir")


def run_sweep(cfg: BenchConfig, *, family: Family | None = None, progress: bool = True) -> Path:
    """Run (or resume) the sweep of `cfg`; returns the CSV path. `family` replaces loading cfg.model / cfg.distill_dir
    (e.g. an analytic denoiser in tests). Nothing is written before every input has been checked; the results
    folder is locked while the sweep runs, and a stop request ends it after the current batch (Preempted)."""
    validate(cfg)
    device = runs.resolve_device(cfg.device)
    use_graphs(cfg.cuda_graphs, device, "ddim")  # --cuda-graphs on without CUDA: an error before anything runs
    if cfg.cuda_graphs == "on" and cfg.noise != "philox":
        raise FastdiffError("--cuda-graphs on needs --noise philox: CPU generators draw on the host")
    family = family or load_family(cfg, device)
    extractor = dist.on_main(resolve_extractor, cfg.extractor, family.dataset, family.scored_shape,  # trained once
                          inception_weights=cfg.inception_weights, data_root=cfg.data_root)
    stats = load_ref_stats(cfg.ref_stats) if cfg.ref_stats else None
    if stats is not None:  # FID against the published statistics: their checksum is the row's reference
        family = dataclasses.replace(family, stats=stats[0],
                                     reference=Reference(family.reference.x, f"stats-{slug(Path(cfg.ref_stats).stem)}"
                                                                             f"-{stats[1]}"))
    if tuple(family.reference.x.shape[1:]) != family.scored_shape:
        raise FastdiffError(f"reference data of shape {tuple(family.reference.x.shape[1:])} does not match the model's "
                            f"samples {family.scored_shape}; check --dataset")
    specs = family_specs(cfg, family)
    if cfg.ci_anchor and anchor_spec(cfg, specs) is None:
        raise FastdiffError(f"--ci-anchor {cfg.ci_anchor!r} is not a row of this sweep; give SAMPLER:STEPS of one, "
                            f"e.g. {specs[0].sampler}:{specs[0].steps}")
    csv_path = results_csv_path(cfg.out_dir, cfg.name or family.dataset)
    out = csv_path.parent
    with contextlib.ExitStack() as held:
        with dist.same_outcome():  # rank 0's refused or locked --out-dir is an error on every rank, not a hang
            if dist.is_main():
                held.enter_context(runs.run_lock(out))
                check_not_mixed(csv_path, family.teacher.hash, cfg.append)
            results = ResultsCSV(csv_path) if dist.is_main() else None
        if cfg.guidance and family.teacher.cond == "text" and dist.is_main():
            write_text(out / PROMPTS_NAME, eval_prompts_csv(cfg.n_samples, family.teacher.num_classes))
        _sweep(cfg, family, specs, extractor, results, out, device, progress)
        if cfg.timing_repeats and dist.world_size() == 1:
            from fastdiff.timing import timing_pass

            log.info("timing pass: %s", timing_pass(specs, lambda s: _network(family, s), family.data_shape, cfg,
                                                    device, device_name(device), out, progress))
        elif cfg.timing_repeats:
            log.warning("the timing pass runs in one process only; run it without torchrun")
    return csv_path


def _sweep(cfg: BenchConfig, family: Family, specs: list[Spec], extractor, results: ResultsCSV | None, out: Path,
           device: torch.device, progress: bool) -> None:
    """Sample, score and write every row of `specs` missing from `results` (rank 0 scores and writes)."""
    anchor = anchor_spec(cfg, specs)
    teacher_ref = teacher_reference(cfg, family, anchor)
    provenance = {"dataset": family.dataset, "teacher_hash": family.teacher.hash, "clip": cfg.clip, "guidance": None,
                  "noise": ROW_NAMES[cfg.noise], "n_samples": cfg.n_samples, "seed": cfg.seed, "extractor": extractor.id,
                  "extractor_accuracy": extractor.accuracy, "reference": family.reference.name,
                  "batch_size": cfg.batch_size, "device": device_name(device), "threads": torch.get_num_threads(),
                  "torch_version": torch.__version__,
                  "torch_fidelity_version": torch_fidelity.__version__, "fastdiff_version": fastdiff.__version__,
                  "fastdiff_commit": git_commit()}
    todo = dist.on_main(lambda: [i for i, s in enumerate(specs)
                              if not all(results.has(r) for r in _rows(s, _network(family, s), cfg, provenance, {},
                                                                        teacher_ref=teacher_ref))])
    todo = [specs[i] for i in todo]
    log.info("%s: %d of %d sampling runs to do (%s, extractor %s%s)", out / CSV_NAME, len(todo), len(specs),
             family.dataset, extractor.id, "" if extractor.accuracy is None else f", accuracy {extractor.accuracy:.4f}")
    if dist.is_main():
        write_text(out / CONSTRAINTS_NAME, installed_versions())
        write_text(out / CONFIG_NAME, json.dumps({"config": cfgs.to_dict(cfg),
                                                  "extractor": dataclasses.asdict(extractor),
                                                  "students": family.student_names(), **provenance},
                                                 indent=2, sort_keys=True) + "\n")
    scorer = None
    if todo:
        scorer = _scorer(cfg, family, extractor, device, anchor, teacher_ref)
        if anchor in todo:  # scored first: every later row's differences are taken to it
            todo.insert(0, todo.pop(todo.index(anchor)))
        elif anchor is not None:  # scored in an earlier run: the same per-index noise gives its samples again
            x, *_ = generate(anchor, _network(family, anchor), family.data_shape, cfg, device)
            if scorer is not None:
                scorer.set_anchor(anchor.label, extract_features(x, extractor, device).numpy())
    warmed: set[str] = set()
    for i, spec in enumerate(tqdm(todo, desc=f"bench {family.dataset}", unit="row",
                                  disable=not (progress and dist.is_main()))):
        if i:
            runs.stop_if_requested(device, lambda: None, f"before row {spec.label}; every finished row is in "
                                                         f"{out / CSV_NAME}")
        network = _network(family, spec)
        if network.hash not in warmed:
            warm_up(network, family.data_shape, min(cfg.batch_size, cfg.n_samples), device)
            warmed.add(network.hash)
        keys = _rows(spec, network, cfg, provenance, {}, teacher_ref=teacher_ref)
        partial = PartialRow(out / PARTIAL_DIR / _partial_name(spec, keys[0], cfg))
        x, nfe, times, graphed = generate(spec, network, family.data_shape, cfg, device, partial)
        if not dist.is_main():
            continue
        features = extract_features(x, extractor, device).numpy()
        stats = family.stats  # published reference statistics (--ref-stats): FID from them
        values = ({"fid": fid_of(features, stats)} if stats is not None else
                  compute_metrics(x, family.reference, extractor, [m for m in cfg.metrics if m in ("fid", "swd")],
                                  device=device, seed=cfg.seed))
        if spec == anchor:
            scorer.set_anchor(anchor.label, features)
        scores, intervals = scorer.score(features)
        values.update(scores)
        accuracy = accuracy_metric(spec, network, family.dataset)
        if accuracy:
            values[accuracy] = class_accuracy(x, requested_classes(range(cfg.n_samples), network.num_classes, "cpu"),
                                              family.dataset)
        measured = {"nfe": nfe, "wall_clock_s_per_batch": median(times), "wall_clock_s_total": sum(times),
                    "cuda_graph": graphed,
                    "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        rows = _rows(spec, network, cfg, provenance, measured, values, intervals, teacher_ref)
        save_samples(out / rows[0]["samples_file"], x, spec, nfe)
        results.add([r for r in rows if not results.has(r)])
        partial.clear()
        log.info("%s (nfe %d): %s", spec.label, nfe, ", ".join(f"{k}={v:.5g}" for k, v in values.items()))
    if dist.is_main() and (out / PARTIAL_DIR).is_dir() and not any((out / PARTIAL_DIR).iterdir()):
        (out / PARTIAL_DIR).rmdir()
    dist.barrier()


@dataclass(frozen=True)
class TeacherReference:
    """Samples of the teacher itself that KID to the teacher (`kid_teacher` rows) is measured against: the anchor's
    sampler, `n` samples on per-index noise of their own seed (never the sweep's)."""

    spec: Spec
    n: int
    seed: int

    @property
    def name(self) -> str:
        """The `reference` column of the kid_teacher rows."""
        return f"teacher-{self.spec.sampler}-{self.spec.grid}-{self.spec.steps}-n{self.n}-seed{self.seed}"


TEACHER_SEED_OFFSET = 2**32  # the teacher reference's noise seed: the sweep's + this, apart from any sweep's own


def teacher_reference(cfg: BenchConfig, family: Family, anchor: Spec | None) -> TeacherReference | None:
    """The sweep's teacher reference (cfg.teacher_samples of the anchor's sampler), or None: not asked for, no KID, no
    anchor, a guidance sweep or published reference statistics."""
    if not cfg.teacher_samples or "kid" not in cfg.metrics or anchor is None or cfg.guidance or family.stats is not None:
        return None
    return TeacherReference(anchor, cfg.teacher_samples, cfg.seed + TEACHER_SEED_OFFSET)


def teacher_features(cfg: BenchConfig, family: Family, ref: TeacherReference, extractor, device) -> np.ndarray | None:
    """(n, d) features of the teacher reference's samples (rank 0; None elsewhere), cached under the cache folder by
    teacher, sampler, n, seed, noise and extractor (drawn on every rank when missing)."""
    path = cache_dir() / "teacher-samples" / slug(f"{family.teacher.hash}-{ref.name}-{cfg.noise}-{extractor.id}.npy")
    if dist.on_main(path.is_file):
        return np.load(path) if dist.is_main() else None
    log.info("teacher reference: %d samples of %s (seed %d)", ref.n, ref.spec.label, ref.seed)
    x, *_ = generate(ref.spec, family.teacher, family.data_shape,
                     dataclasses.replace(cfg, n_samples=ref.n, seed=ref.seed), device)
    if not dist.is_main():
        return None
    features = extract_features(x, extractor, device).numpy()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, features)
    return features


def _scorer(cfg: BenchConfig, family: Family, extractor, device, anchor: Spec | None,
            teacher_ref: TeacherReference | None) -> Scorer | None:
    """Rank 0's Scorer of the sweep (None elsewhere): the reference set's features (or the published statistics'
    FID alone) and the teacher reference's features."""
    teacher = teacher_features(cfg, family, teacher_ref, extractor, device) if teacher_ref is not None else None
    if not dist.is_main():
        return None
    ref = None if family.stats is not None else extract_features(family.reference.x, extractor, device).numpy()
    return Scorer(ref, family.stats if ref is None else ref, teacher, cfg.metrics, cfg.n_samples,
                  cfg.ci_resamples if anchor is not None else 0, cfg.seed)


def _partial_name(spec: Spec, key_row: dict, cfg: BenchConfig) -> str:
    """The partial/ folder of one row: readable label + a digest of its key and batch size (batches by start)."""
    digest = hashlib.sha256(repr((sorted(key_row.items()), cfg.batch_size)).encode()).hexdigest()[:10]
    return slug(f"{spec.sampler}_{spec.grid}_s{spec.steps}_{digest}")


def grid_hash(spec: Spec, schedule: Schedule) -> str:
    """sha256 prefix of the row's float64 time grid: a changed grid definition never reuses an old row."""
    ts = make_grid(spec.grid, spec.steps, schedule).to(torch.float64).contiguous()
    return hashlib.sha256(ts.numpy().tobytes()).hexdigest()[:12]


def _network(family: Family, spec: Spec) -> Network:
    """The network a row samples: the teacher, or the student of the row's sampler on the row's grid."""
    return family.network(spec)


def _metric_names(metrics: Sequence[str], teacher_ref: bool = False) -> list[str]:
    """The CSV metric names the requested metrics produce (KID: kid, and kid_teacher with a teacher reference; prc:
    precision and recall)."""
    expand = {"kid": ["kid"] + (["kid_teacher"] if teacher_ref else []), "prc": ["precision", "recall"]}
    return [name for m in metrics for name in expand.get(m, [m])]


def anchor_spec(cfg: BenchConfig, specs: Sequence[Spec]) -> Spec | None:
    """The row that FID differences and ratios are taken to, fixed before any row is scored: --ci-anchor
    SAMPLER:STEPS, else the teacher's DDIM at its largest step count (the first spacing and guidance weight);
    None when the sweep has no such row."""
    if cfg.ci_anchor:
        sampler, _, steps = cfg.ci_anchor.partition(":")
        found = [s for s in specs if s.sampler == sampler and str(s.steps) == steps.strip()]
    else:
        ddim = [s for s in specs if s.sampler == "ddim"]
        found = [s for s in ddim if s.steps == max(d.steps for d in ddim)]
    return found[0] if found else None


def _rows(spec: Spec, network: Network, cfg: BenchConfig, provenance: dict, measured: dict,
          values: dict | None = None, intervals: dict | None = None,
          teacher_ref: TeacherReference | None = None) -> list[dict]:
    """The CSV rows (all values as strings) of one sampling run, one per metric; values None -> keys only;
    `intervals` {metric: its interval columns}; kid_teacher rows name the teacher reference as their reference."""
    base = {**provenance, **measured, "model_hash": network.hash, "sampler": spec.sampler, "grid": spec.grid,
            "grid_hash": grid_hash(spec, network.schedule), "eta": spec.eta, "variance": spec.variance,
            "steps": spec.steps, "guidance": spec.guidance, "autoencoder": network.autoencoder,
            "clip": network.clip(cfg.clip),
            "samples_file": samples_file(spec, network, cfg),
            **{f"train_{k}": v for k, v in (network.cost or {}).items()
               if k in ("updates", "teacher_evals", "student_passes", "wall_clock_s", "device")}}
    accuracy = accuracy_metric(spec, network, base["dataset"])
    names = _metric_names(cfg.metrics, teacher_ref is not None) + ([accuracy] if accuracy else [])
    own = {"kid_teacher": {"reference": teacher_ref.name}} if teacher_ref is not None else {}
    return [{c: to_csv_value({**base, **own.get(m, {}), **(intervals or {}).get(m, {}), "metric": m,
                              "value": (values or {}).get(m)}.get(c)) for c in COLUMNS}
            for m in names]


def main(argv: Sequence[str] | None = None) -> int:
    dist.configure_cpu_threads()
    cfg, args = runs.config_from_argv(argv, BenchConfig, PRESETS, "python -m fastdiff.bench",
                                      "FID vs steps for every sampler of one model family.")
    if args.dry_run:
        return dry_run(cfg)
    with dist.init_from_env(cfg.device), runs.graceful_stop():
        path = run_sweep(cfg)
        if dist.is_main():  # inside: once the process group is gone every process counts as rank 0
            print(f"results: {path}\nreport:  python -m fastdiff.report {cfg.out_dir}")
    return 0


def dry_run(cfg: BenchConfig) -> int:
    """Print the sampling runs `cfg` would do (all of them, resumed or not); loads the models, writes nothing."""
    validate(cfg)
    family = load_family(cfg, runs.resolve_device(cfg.device))
    specs = family_specs(cfg, family)
    print(f"{len(specs)} sampling runs x {len(_metric_names(cfg.metrics))} metrics, {cfg.n_samples} samples each, "
          f"dataset {family.dataset}, reference {family.reference.name}:")
    for spec in specs:
        print(f"  {spec.label}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
