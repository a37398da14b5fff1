"""Sampling the rows of a sweep: the model family (teacher, students, reference data), one sampler run (`Spec`) on
per-index noise, whole batches sharded over the ranks, and the finished batches of a row kept on disk.

Sample k's initial and per-step noise is a function of (seed, k, draw, element) (fastdiff.noise, the sweep's
`--noise` generator), so it is the same whatever the batch size or the rank that draws it; under torchrun batch j goes to rank j mod K and the
gathered set is bit-identical to a single-process run.
"""
from __future__ import annotations

import io
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fastdiff import distributed as dist
from fastdiff import registry, runs
from fastdiff.samplers import Sample, initial_noise
from fastdiff.conditioning import eval_condition
from fastdiff.errors import FastdiffError
from fastdiff.graphs import GraphedLoop, use_graphs
from fastdiff.grids import make_grid
from fastdiff.io import write_bytes
from fastdiff.data import data_seed, reference_split
from fastdiff.metrics import Reference, load_reference
from fastdiff.schedules import Schedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Network:
    """A network to sample: `net(x, t) -> out` in parameterization `param`, on `schedule`; `hash` identifies it."""

    net: Callable
    schedule: Schedule
    param: str
    hash: str
    num_classes: int = 0
    takes_w: bool = False
    cond: str = "none"  # what it is conditioned on: none, class or text (fastdiff.conditioning)
    cost: dict | None = None  # a student's training cost (its checkpoint's `cost`), recorded with its rows
    codec: object = None  # a latent model's autoencoder (fastdiff.latent.Codec): samples are decoded before scoring
    sampler: str = ""  # a student's sampler (fastdiff.registry), "" for a teacher
    grid: str = ""  # a student's own grid (a progressive student's "student", a consistency student's cd{N})
    steps: int = 0  # a student's N: the steps of its own grid

    @property
    def autoencoder(self) -> str:
        """The id of the autoencoder its samples are decoded by ("" in pixel space), recorded with its rows."""
        return self.codec.hash if self.codec is not None else ""

    def clip(self, asked: bool) -> bool:
        """Whether its samplers clip x0^ to [-1, 1] when the sweep `asked` to (BenchConfig.clip): never in latent
        space, whose range is the autoencoder's."""
        return asked and self.codec is None


@dataclass(frozen=True)
class Family:
    """What one sweep samples: the teacher, its students {sampler: (network, ...)}, and the reference data to score
    against."""

    dataset: str
    data_shape: tuple[int, ...]
    teacher: Network
    students: dict[str, tuple[Network, ...]]
    reference: Reference
    stats: object = None  # precomputed reference statistics (fastdiff.uncertainty.RefStats) FID uses instead
    image_shape: tuple[int, ...] = ()  # one scored sample's shape: data_shape, or a latent family's decoded image's

    @property
    def scored_shape(self) -> tuple[int, ...]:
        return tuple(self.image_shape) or tuple(self.data_shape)

    def network(self, spec: "Spec") -> Network:
        """The network of a row: the teacher for a teacher sampler; for a student sampler its student on the row's
        grid (rule "own": with the row's step count; "upto": whose N is at least the row's)."""
        entry = registry.sampler(spec.sampler)
        if not entry.student:
            return self.teacher
        for net in self.students.get(spec.sampler, ()):
            if net.grid == spec.grid and (net.steps == spec.steps if entry.rows == "own" else spec.steps <= net.steps):
                return net
        raise FastdiffError(f"no {spec.sampler} student on grid {spec.grid} with {spec.steps} steps in this family")

    def student_names(self) -> dict[str, list[str]]:
        """{sampler: ["grid/N", ...]}: the students of the sweep, as its bench_config.json records them."""
        return {name: [f"{n.grid}/{n.steps}" for n in sorted(nets, key=lambda n: (n.grid, n.steps))]
                for name, nets in sorted(self.students.items())}


@dataclass(frozen=True)
class Spec:
    """One sampling run = one group of CSV rows (one per metric). `eta` is None for DDPM (see `variance`)."""

    sampler: str
    grid: str
    steps: int
    eta: float | None = None
    variance: str = ""
    guidance: float | None = None

    @property
    def label(self) -> str:
        return f"{self.sampler}/{self.grid}/{self.steps}" + ("" if self.guidance is None else f"/w={self.guidance:g}")


def run_sampler(spec: Spec, net: Callable, x: torch.Tensor, schedule: Schedule, param: str, clip: bool,
                generators, guidance: float | None = None) -> Sample:
    """(B, ...) initial noise -> Sample of `spec`'s sampler (its fastdiff.registry entry) on its grid (CFG weight
    `guidance` if given)."""
    ts = make_grid(spec.grid, spec.steps, schedule)
    return registry.sampler(spec.sampler).run(net, x, ts, schedule=schedule, param=param, clip=clip,
                                              generator=generators, guidance=guidance, eta=spec.eta,
                                              variance=spec.variance)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PartialRow:
    """The finished batches of one sampling run, a file each (`b{start}.pt`: samples, seconds, NFE), so that a
    row stopped or killed mid-way resumes at its first missing batch. Only rank 0 reads and writes it."""

    def __init__(self, folder: Path):
        self.folder = folder

    def load(self) -> dict[int, dict]:
        done = {}
        for path in sorted(self.folder.glob("b*.pt")) if self.folder.is_dir() else []:
            try:
                done[int(path.stem[1:])] = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - a batch file cut short by a kill is sampled again
                log.warning("partial batch %s is unreadable; sampling it again", path)
        return done

    def add(self, start: int, batch: dict) -> None:
        buf = io.BytesIO()
        torch.save(batch, buf)
        write_bytes(self.folder / f"b{start:09d}.pt", buf.getvalue())

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def sample_batch(spec: Spec, network: Network, shape, cfg, device, start: int, graphs: dict | None = None) -> dict:
    """One batch of the row: samples start .. start + batch_size - 1 from their per-index noise. With `graphs` (a
    dict kept for the row) and `cfg.cuda_graphs` allowing it on this device, the sampler loop runs as a CUDA graph
    captured at the row's first batch of this size (fastdiff.graphs; the capture is not timed); a loop that cannot
    be captured runs eagerly (logged once). The batch's `cuda_graph` says which ran."""
    idx = range(start, min(start + cfg.batch_size, cfg.n_samples))
    x, noise = initial_noise(idx, shape, cfg.seed, device, rng=cfg.noise)
    y = None if spec.guidance is None else eval_condition(network.cond, network.net, idx, network.num_classes, device)
    body = _body(spec, network, cfg)
    loop = None
    if graphs is not None and use_graphs(getattr(cfg, "cuda_graphs", "off"), device, spec.sampler):
        if len(idx) not in graphs:
            try:
                graphs[len(idx)] = GraphedLoop(body, x, noise, y)
            except FastdiffError as err:
                if cfg.cuda_graphs == "on":
                    raise
                log.warning("%s runs eagerly: %s", spec.label, err)
                graphs[len(idx)] = None
        loop = graphs[len(idx)]
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        if loop is not None:
            x0, nfe = loop(x, noise, y), loop.nfe
        else:
            sample = body(x, noise, y)
            x0, nfe = sample.x, sample.nfe
        out = network.codec.decode(x0) if network.codec is not None else x0  # timed: part of sampling
    _sync(device)
    return {"x": out.float().cpu(), "seconds": time.perf_counter() - t0, "nfe": nfe, "cuda_graph": loop is not None}


def _body(spec: Spec, network: Network, cfg) -> Callable:
    """`body(x_T, noise, y) -> Sample`: the row's sampler on `network` (under condition y and the row's guidance)."""
    def body(x, noise, y):
        net, guidance = (network.net, None) if y is None else conditioned(network, y, spec.guidance)
        return run_sampler(spec, net, x, network.schedule, network.param, network.clip(cfg.clip), noise, guidance)
    return body


def generate(spec: Spec, network: Network, shape: tuple[int, ...], cfg, device: torch.device,
             partial: PartialRow | None = None):
    """-> ((n_samples, ...) samples on CPU, nfe, per-batch seconds, whether every batch ran as a CUDA graph); (None,
    nfe, [], False) off rank 0. `shape` is what the sampler draws; a latent network's samples come back decoded (its
    image shape). `cfg` is the sweep's BenchConfig (n_samples, batch_size, seed, noise, clip, cuda_graphs).

    Sample k's initial and per-step noise is keyed by (cfg.seed, k) (fastdiff.noise, generator `cfg.noise`), so it
    does not depend on the batch size or the rank that draws it. With `partial`, finished
    batches are kept on disk as they come and a stop request (see fastdiff.runs) ends the row after the current
    batch (Preempted); the batches already there are not sampled again.
    """
    # Whole batches per rank (batch j of a round on rank j): sample k is drawn in the batch it has in one process,
    # so the gathered set is bit-identical to a single-process run even where a network's floats depend on the
    # batch size (CPU GEMMs do).
    starts = list(range(0, cfg.n_samples, cfg.batch_size))
    done = (partial.load() if partial is not None else {}) if dist.is_main() else {}
    have = set(dist.on_main(lambda: sorted(done)) or ())
    todo = [s for s in starts if s not in have]
    world = dist.world_size()
    graphs: dict = {}  # the row's captured loops, one per batch size (fastdiff.graphs), freed with the row
    for k in range(0, len(todo), world):
        group = todo[k:k + world]
        mine = group[dist.rank()] if dist.rank() < len(group) else None
        batch = None if mine is None else (mine, sample_batch(spec, network, shape, cfg, device, mine, graphs))
        for part in dist.gather_objects(batch):
            if part is not None and dist.is_main():
                done[part[0]] = part[1]
                if partial is not None:
                    partial.add(*part)
        if partial is not None and k + world < len(todo):
            runs.stop_if_requested(device, lambda: None, f"in row {spec.label} with {len(done)} of {len(starts)} "
                                                         f"batches kept in {partial.folder}")
    nfe = max((b["nfe"] for b in done.values()), default=0) if dist.is_main() else 0
    if not dist.is_main():
        return None, nfe, [], False
    x = torch.empty(cfg.n_samples, *next(iter(done.values()))["x"].shape[1:])
    for start, b in done.items():
        x[start:start + len(b["x"])] = b["x"]
    return x, nfe, [done[s]["seconds"] for s in starts], all(b.get("cuda_graph", False) for b in done.values())


def conditioned(network: Network, y: torch.Tensor, w: float):
    """-> (sampler model, sampler guidance) of `network` at condition y under guidance weight w: a guided
    (w-conditioned) student takes w as its input; any other network is guided through the sampler."""
    from fastdiff.guidance import conditional, guided

    if network.takes_w:
        return conditional(network.net, y, torch.full((len(y),), w, device=y.device)), None
    return guided(network.net, y, network.num_classes), w


def warm_up(network: Network, shape: tuple[int, ...], batch: int, device: torch.device) -> None:
    """One forward pass at t = 0.5 on zeros, so that one-time costs (allocation, autotuning) miss the timings."""
    with torch.no_grad():
        network.net(torch.zeros(batch, *shape, device=device), torch.full((batch,), 0.5, device=device))
    _sync(device)


def load_family(cfg, device: torch.device) -> Family:
    """The teacher (cfg.model, else the teacher of cfg.distill_dir), every student of cfg.distill_dir, the reference;
    `cfg` is the sweep's BenchConfig."""
    from fastdiff.checkpoint import load_model

    teacher_path = cfg.model
    students_dir = Path(cfg.distill_dir) / "students"
    if cfg.distill_dir:
        if not students_dir.is_dir():
            raise FastdiffError(f"--distill-dir {cfg.distill_dir!r} has no students/ folder; pass a run dir of "
                                "python -m fastdiff.distill")
        if not teacher_path:
            config_path = Path(cfg.distill_dir) / "config.json"
            try:
                teacher_path = json.loads(config_path.read_text())["teacher"]
            except (OSError, ValueError, KeyError):
                raise FastdiffError(f"{config_path} is missing or names no teacher; pass --model") from None
    teacher = load_model(teacher_path, device, dataset=cfg.dataset, data_root=cfg.data_root)
    if teacher.kind != "teacher":
        raise FastdiffError(f"{teacher.path} is a {teacher.kind} checkpoint; --model needs a teacher (students join "
                            "the sweep through --distill-dir)")
    students = load_students(students_dir, cfg.samplers, teacher, device) if cfg.distill_dir else {}
    if not cfg.distill_dir and any(registry.sampler(name).student for name in cfg.samplers):
        log.info("no --distill-dir: the sweep has no distilled students")
    dataset = cfg.dataset or teacher.dataset
    reference = load_reference(dataset, reference_split(dataset, cfg.ref_split), cfg.n_ref,
                               cfg.data_root or teacher.config.get("data_root", ""), seed=data_seed(teacher.config or {}))
    network = as_network(teacher)
    if cfg.guidance and not network.num_classes:
        raise FastdiffError(f"--guidance needs a conditional teacher (trained with --cond class or text); "
                            f"{teacher.path} is unconditional")
    return Family(dataset, tuple(teacher.data_shape), network, students, reference, image_shape=teacher.image_shape)


def load_students(folder: Path, samplers, teacher, device) -> dict[str, tuple[Network, ...]]:
    """{sampler: networks} of the students in `folder` (a distillation run's students/) that one of `samplers`
    samples: the files whose role (fastdiff.checkpoint.role_of) says `swept` (every method's final students; not
    snapshots or first stages), each with the sampler it names. FastdiffError for a student of another schedule than
    its teacher's."""
    from fastdiff.checkpoint import load_model

    wanted = [name for name in samplers if registry.sampler(name).student]
    found: dict[str, list[Network]] = {}
    for path in sorted(folder.glob("*.pt")) if wanted else ():
        st = load_model(path, device)
        if st.kind != "student" or not st.role or not st.role["swept"] or st.role["sampler"] not in wanted:
            continue
        if st.schedule != teacher.schedule:
            raise FastdiffError(f"student {path} uses schedule {st.schedule}, its teacher {teacher.schedule}")
        found.setdefault(st.role["sampler"], []).append(as_network(st))
    for name in wanted:
        if name not in found:
            log.info("no %s student in %s", name, folder)
    return {name: tuple(nets) for name, nets in found.items()}


def accuracy_metric(spec: Spec, network: Network, dataset: str) -> str | None:
    """Guided rows of a labelled image data set also get the accuracy of the project's classifier on the digit (class)
    each sample asks for: `class_accuracy`, or `prompt_accuracy` when it was asked for in words; else None."""
    from fastdiff.data import static_info

    if spec.guidance is None or network.num_classes == 0 or len(static_info(dataset)[0]) != 3:
        return None
    return "prompt_accuracy" if network.cond == "text" else "class_accuracy"


def as_network(model) -> Network:
    """A loaded teacher or student (fastdiff.checkpoint.LoadedModel) as a sweep's Network (a student with the
    sampler, grid and N of its role: fastdiff.checkpoint.role_of)."""
    from fastdiff.data import static_info

    cond = model.config.get("cond", "none") or "none"
    role = getattr(model, "role", None) or {}
    return Network(model.net, model.schedule, model.param, model.hash,
                   static_info(model.dataset)[1] if cond != "none" else 0, bool(model.config.get("scalar_cond")),
                   cond, model.cost, getattr(model, "codec", None), role.get("sampler", ""), role.get("grid", ""),
                   int(role.get("steps") or 0))
