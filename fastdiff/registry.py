"""The sampler registry: one entry per sampler name, the only place a sampler's identity lives.

An entry says how to run the sampler (`run`), which rows a sweep makes of it (`rows`: the teacher's full grid once,
strided grids on every spacing, a fixed continuous grid at every step count, Heun's step counts, or a student's own
grid), its curve's label in the report, whether it is deterministic (it targets the probability-flow ODE: same x_T,
same sample) and whether its loop runs as a CUDA graph (fastdiff.graphs), which models it samples (`model`: the
teacher, or the students of one distillation method), and the stock diffusers scheduler that reproduces it, if any
(what `python -m fastdiff.export` may write). bench, sweep, graphs, sample, export, distill and the report read it;
a new sampler (a new distiller's own) is one `register_sampler` call in its module.

Row rules (`rows`):
- ``full``: one row on the teacher's full grid k/T (steps = T);
- ``strided``: one row per (spacing, step count <= T) on the integer sub-grids (fastdiff.grids.strided_grid);
- ``every``: one row per step count on the entry's fixed `grid`;
- ``heun``: one row per (n + 1) // 2 over the step counts n on the fixed `grid` (NFE = 2 steps - 1 tracks n);
- ``own``: one row per student, on its own grid with its own step count (a progressive student's i/N);
- ``upto``: one row per step count <= the student's N, on the student's own grid (multistep consistency sampling, a
  DMD2 generator's re-noising sampler).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

from fastdiff.errors import FastdiffError

if TYPE_CHECKING:
    from fastdiff import samplers as S

RowRule = Literal["full", "strided", "every", "heun", "own", "upto"]


@dataclass(frozen=True)
class SamplerEntry:
    """One sampler. `run(net, x, ts, *, schedule, param, clip, generator, guidance, eta, variance) -> Sample`;
    `label`: the report's curve label, a format string with {grid}, {eta} and {variance} ("" for the default
    `name (grid[, η=eta][, variance var.])`); `model`: "teacher" or the name of the distillation method whose students
    it samples (`student_label` names them in the README); `summary`: its place in the README's summary table (None:
    the report only); `full_only`: only in `python -m fastdiff.distill --full`; `diffusers`: the stock diffusers
    scheduler that reproduces it (None: none does, and `refusal` says why a student of it does not export)."""

    name: str
    run: Callable[..., "S.Sample"]
    rows: RowRule
    grid: str = ""  # the fixed grid ("" : the sweep's spacings, or a student's own grid)
    eta: float | None = 0.0  # the Spec's eta (None for DDPM, whose noise is its variance)
    label: str = ""
    deterministic: bool = True
    graphable: bool = False
    model: str = "teacher"
    student_label: str = ""
    short: str = ""  # a student's short name in tables ("PD student")
    show_eta: bool = False  # its default label names eta (DDIM's)
    method_title: str = ""  # a student's method as a model card names it, with its paper
    summary: int | None = None
    full_only: bool = False
    diffusers: str | None = None
    diffusers_max_steps: int = 0  # a student of more steps does not export (its `refusal` says why); 0: any N
    refusal: str = ""
    description: str = ""

    def exports(self, steps: int) -> bool:
        """Whether a stock diffusers scheduler reproduces this sampler for a student of `steps` steps."""
        return self.diffusers is not None and (not self.diffusers_max_steps or steps <= self.diffusers_max_steps)

    @property
    def student(self) -> bool:
        """Whether it samples a distilled student (one of a method's networks) rather than the teacher."""
        return self.model != "teacher"

    def line_label(self, grid: str, eta, variance: str) -> str:
        """The legend entry of one curve of this sampler."""
        if self.label:
            return self.label.format(grid=grid, eta=eta, variance=variance)
        return default_label(self.name, grid, eta, variance, self.show_eta)


def default_label(sampler: str, grid: str, eta, variance: str, show_eta: bool | None = None) -> str:
    """`sampler (grid[, η=eta][, variance var.])`: the label of a teacher sampler's curve; η where `show_eta` and
    the row has one (`show_eta` None: a sampler named ddim*)."""
    show_eta = sampler.startswith("ddim") if show_eta is None else show_eta
    extra = [grid] + ([f"η={float(eta):g}"] if show_eta and eta else []) + ([f"{variance} var."] if variance else [])
    return f"{sampler} ({', '.join(extra)})"


_SAMPLERS: dict[str, SamplerEntry] = {}


def register_sampler(entry: SamplerEntry, replace: bool = False) -> SamplerEntry:
    """Add `entry` under its name (FastdiffError if the name is taken, unless `replace`)."""
    if entry.name in _SAMPLERS and not replace:
        raise FastdiffError(f"sampler {entry.name!r} is registered already")
    if entry.rows not in RowRule.__args__:
        raise FastdiffError(f"sampler {entry.name!r}: unknown row rule {entry.rows!r}")
    _SAMPLERS[entry.name] = entry
    return entry


def unregister_sampler(name: str) -> None:
    _SAMPLERS.pop(name, None)


PLUGIN_GROUP = "fastdiff.methods"  # entry points naming modules that register a method and its samplers
_plugins_loaded: list[str] = []
_installed: list[str] = []  # fastdiff's own samplers and those of the plugins load_plugins imported


def load_plugins() -> list[str]:
    """Import every module an installed package names in the `fastdiff.methods` entry-point group (pyproject:
    `[project.entry-points."fastdiff.methods"] mine = "mypkg.mymethod"`), once; -> the modules imported. A module
    that fails to import is a FastdiffError naming it."""
    if _plugins_loaded:
        return _plugins_loaded[1:]
    _plugins_loaded.append("")  # loading: a plugin's own registry calls do not load again
    from importlib.metadata import entry_points

    before = set(_SAMPLERS)

    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            importlib.import_module(ep.value.partition(":")[0])
        except Exception as err:  # noqa: BLE001 - any failure of a third-party module
            raise FastdiffError(f"the fastdiff method plugin {ep.name!r} ({ep.value}) failed to import: "
                                f"{type(err).__name__}: {err}") from None
        _plugins_loaded.append(ep.value)
    _installed.extend(n for n in _SAMPLERS if n not in before)
    return _plugins_loaded[1:]


def sampler(name: str) -> SamplerEntry:
    """The entry of `name`; FastdiffError naming the registered ones otherwise."""
    load_plugins()
    try:
        return _SAMPLERS[name]
    except KeyError:
        raise FastdiffError(f"unknown sampler {name!r}; choose one of {', '.join(_SAMPLERS)}") from None


def find(name: str) -> SamplerEntry | None:
    load_plugins()
    return _SAMPLERS.get(name)


def sampler_names() -> tuple[str, ...]:
    """Every registered sampler, in registration order (the sweep's default order)."""
    load_plugins()
    return tuple(_SAMPLERS)


def installed_sampler_names() -> tuple[str, ...]:
    """fastdiff's own samplers and those of installed plugins (entry points), not ones registered later in the
    process (a BenchConfig's default sweep: it must not depend on what a caller registered before importing it)."""
    load_plugins()
    return tuple(n for n in _SAMPLERS if n in _installed)


def student_samplers() -> tuple[str, ...]:
    """The samplers of distilled students."""
    load_plugins()
    return tuple(n for n, e in _SAMPLERS.items() if e.student)


def samplers_of(method: str) -> tuple[str, ...]:
    """The samplers of the students of distillation method `method`."""
    load_plugins()
    return tuple(n for n, e in _SAMPLERS.items() if e.model == method)


def line_label(sampler_name: str, grid: str, eta, variance: str) -> str:
    """The legend entry of one curve (a sampler no longer registered gets the default label)."""
    entry = find(sampler_name)
    return entry.line_label(grid, eta, variance) if entry else default_label(sampler_name, grid, eta, variance)


# --- the built-in samplers ----------------------------------------------------------------------------------------
# Declared as data, so that the report reads them without torch; each `run` imports fastdiff.samplers (or its method's
# module) when called.


def _lazy(target: str, takes: tuple[str, ...] = (), **fixed) -> Callable[..., "S.Sample"]:
    """`run` calling "module:function" (imported at the first call) with the registry's signature; the row's eta and
    variance reach it only where it `takes` them; `fixed` binds other arguments."""
    module, _, attr = target.partition(":")

    def run(net, x, ts, *, eta=None, variance="", **kw):
        row = {"eta": 0.0 if eta is None else eta, "variance": variance or "large"}
        return getattr(importlib.import_module(module), attr)(net, x, ts, **fixed, **{k: row[k] for k in takes}, **kw)

    return run


_S = "fastdiff.samplers"
for _entry in (
    SamplerEntry("ddpm", _lazy(f"{_S}:ddpm", ("variance",)), "full", grid="full", eta=None,
                 deterministic=False, graphable=True, summary=2, diffusers="DDPMScheduler",
                 description="DDPM ancestral sampling on the full grid (Ho et al. 2020)"),
    SamplerEntry("ddpm-strided", _lazy(f"{_S}:ddpm", ("variance",)), "strided", eta=None, deterministic=False,
                 graphable=True, summary=3, diffusers="DDPMScheduler",
                 description="DDPM on a strided sub-grid (Nichol & Dhariwal 2021)"),
    SamplerEntry("ddim", _lazy(f"{_S}:ddim", ("eta",)), "strided", eta=0.0, graphable=True, summary=4,
                 show_eta=True, diffusers="DDIMScheduler", description="DDIM, eta = 0 (Song et al. 2021)"),
    SamplerEntry("ddim-eta1", _lazy(f"{_S}:ddim", ("eta",)), "strided", eta=1.0, deterministic=False,
                 show_eta=True, full_only=True, diffusers="DDIMScheduler", description="DDIM, eta = 1"),
    SamplerEntry("dpm++2m", _lazy(f"{_S}:dpm_solver_pp_2m"), "every", grid="logsnr", summary=5,
                 diffusers="DPMSolverMultistepScheduler", description="DPM-Solver++(2M) (Lu et al. 2022)"),
    SamplerEntry("dpm++3m", _lazy(f"{_S}:dpm_solver_pp_3m"), "every", grid="logsnr", summary=6, full_only=True,
                 diffusers="DPMSolverMultistepScheduler", description="DPM-Solver++(3M)"),
    *(SamplerEntry(f"unipc{order}-{variant}", _lazy(f"{_S}:unipc", order=order, variant=variant), "every",
                   grid="logsnr", summary=summary, full_only=full, diffusers="UniPCMultistepScheduler",
                   description=f"UniPC of order {order}, B(h) {variant} (Zhao et al. 2023)")
      for order, variant, summary, full in ((2, "bh1", None, True), (3, "bh1", 8, True), (2, "bh2", 7, False),
                                            (3, "bh2", None, True))),
    SamplerEntry("heun", _lazy(f"{_S}:heun"), "heun", grid="karras", summary=9,
                 description="Heun, Karras et al. 2022 Alg. 1, on the Karras grid (k-diffusion's sample_heun; no "
                             "stock diffusers scheduler checked against it)"),
    # the students of fastdiff's own methods; their samplers live in the methods' modules
    SamplerEntry("distilled", _lazy("fastdiff.distill.progressive:sample_student"), "own",
                 label="distilled students (own N-step grid)", graphable=True, model="pd",
                 student_label="progressive (PD) student", short="PD student", summary=0, diffusers="DDIMScheduler",
                 method_title="progressive distillation (Salimans & Ho 2022)",
                 refusal="a stock DDIMScheduler (trailing spacing) reproduces the grid i/N only when N divides T",
                 description="a progressively distilled N-step student: DDIM eta = 0 on its own grid i/N"),
    SamplerEntry("consistency", _lazy("fastdiff.distill.consistency:sample_student"), "upto",
                 label="consistency student ({grid}, multistep)", deterministic=False, model="cd",
                 student_label="consistency (CD) student", short="CD student", summary=1,
                 method_title="consistency distillation (Song et al. 2023)",
                 refusal="its sampling starts at the top of its training discretization (sigma/alpha = 80, t < 1), "
                         "not at t = 1, and re-noises x0^ with fresh noise between steps; no stock diffusers "
                         "scheduler runs that (DDIMScheduler starts at t = 1; LCMScheduler's boundary condition and "
                         "timesteps differ)",
                 description="a consistency-distilled student: multistep consistency sampling on its grid cd{N}"),
    SamplerEntry("dmd2", _lazy("fastdiff.distill.dmd2:sample_student"), "upto",
                 label="DMD2 student ({grid}, re-noised)", deterministic=False, model="dmd2",
                 student_label="distribution-matching (DMD2) student", short="DMD2 student", summary=1,
                 diffusers="DDIMScheduler", diffusers_max_steps=1,
                 method_title="distribution-matching distillation, DMD2 (Yin et al. 2024)",
                 refusal="an N-step DMD2 generator re-noises its x0^ with fresh noise between steps; DDIMPipeline "
                         "turns any scheduler into DDIM, and LCMScheduler's boundary scalings are not exactly 0 and 1 "
                         "(its 1-step student exports: one DDIM step from t = 1 is its sampler)",
                 description="a distribution-matching (DMD2) generator: x0^, re-noised to each later time of its "
                             "grid student{N}"),
):
    register_sampler(_entry)
_installed.extend(_SAMPLERS)
