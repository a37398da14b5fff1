"""The distillation method protocol: what a method implements, and the registry `--method` reads.

A method is one module: a `Method` subclass registered with `register_method`, and the sampler of its students
registered in fastdiff.registry. `python -m fastdiff.distill --method a,b` runs the named methods in order on one
teacher (`DistillRun`: the teacher, its data, the students' network and config, the run dir, the evaluation's
scorer), each resumably through `fastdiff.runs.fit` (one network or several, each with its optimiser and steps per
update). A method saves its students under `ctx.run / "students"` with a `role` (fastdiff.checkpoint.role_of: method,
sampler, own grid, N, swept, its own evaluation) and a `cost`; the sweep, `fastdiff.sample` and `fastdiff.export`
find and sample them by that role alone.

The cost of one update is counted in forward-equivalents per network (`update_cost`): a network evaluation without
gradients is 1, a forward with its backward is 3 (a backward = 2 forwards), per example of the global batch.
"""
from __future__ import annotations

import importlib

from fastdiff.errors import FastdiffError

# (type names in quotes: "DistillConfig" is fastdiff.distill.config's, "DistillRun" fastdiff.distill.stages'; neither
# is imported here, so that the config can read the registry)

FORWARD, TRAINED = 1, 3  # forward-equivalents per example: an evaluation; a forward + backward (backward = 2)


class Method:
    """A distillation method. Subclasses set the class attributes and implement `run`; the rest has defaults.

    name: its `--method` name; title: what it is, with its paper (model cards, logs); samplers: the
    fastdiff.registry entries of its students; options: a frozen dataclass of its own settings, or None: the
    DistillConfig section `cfg.<name>` (`--<name>.<field>` on the command line; its fields' trailing comments are
    their --help; a class attribute `FLAT` may map fields to older flat option names); a run dir of other methods
    ignores it; uses: the other methods whose options it reads too (CD snapshots at PD's budgets); label / short:
    its name in the report's training-cost figure and tables ("progressive" / "PD"; default: the name and its upper
    case); training_log: the file in the run dir of its evaluation while training, if any (said when the run ends).
    What the report plots against cost comes from `training_points` (by default: its students' own evaluations).

    A method's section exists if the method was registered when fastdiff.distill.config was first imported (fastdiff's
    own and installed packages' entry points are); its module must therefore not import fastdiff.distill.config at
    module level (annotations under TYPE_CHECKING)."""

    name: str = ""
    title: str = ""
    samplers: tuple[str, ...] = ()
    options: type | None = None
    uses: tuple[str, ...] = ()
    label: str = ""
    short: str = ""
    training_log: str | None = None

    def validate(self, cfg: "DistillConfig") -> None:
        """FastdiffError (one line, naming the option) for a config this method cannot run."""

    def check_teacher(self, teacher, cfg: "DistillConfig") -> None:
        """FastdiffError for a teacher (a fastdiff.checkpoint.LoadedModel) this config of the method cannot
        distil; called once the teacher is loaded, before any update."""

    def plan(self, cfg: "DistillConfig") -> list[str]:
        """What it would run, for --dry-run: one line per stage."""
        return [f"{self.title or self.name}"]

    def run(self, ctx: "DistillRun") -> None:
        """Train (or resume) and save its students; a finished run does nothing."""
        raise NotImplementedError

    def budgets(self, cfg: "DistillConfig") -> list[int]:
        """The updates, cumulative from the teacher, at which it saves students: the points where methods are
        compared at equal cost."""
        return []

    def update_cost(self, cfg: "DistillConfig") -> dict[str, float]:
        """Forward-equivalents of one update per network ("teacher", "student", any other), for the global batch."""
        return {}

    def training_points(self, run) -> list[dict]:
        """Its students' own evaluations while training, one dict of TRAINING_FIELDS per (student, NFE): by default
        read from the role and cost of every student checkpoint of this method in `run`/students."""
        return students_evaluations(run, self)


TRAINING_FIELDS = ("method", "short", "nfe", "updates", "forward_equivalents", "wall_clock_s", "metric", "value")
TRAINING_NAME = "training.csv"  # beside the sweep's CSV: every method's training points (the report's cost figure)


def forward_equivalents(costs: dict[str, float], updates: int) -> float:
    """The total forward-equivalents of `updates` updates of one update's `costs`."""
    return float(sum(costs.values()) * updates)


_METHODS: dict[str, Method] = {}
BUILTIN = ("fastdiff.distill.pd", "fastdiff.distill.consistency", "fastdiff.distill.dmd2")  # fastdiff's own, registered when imported


def register_method(method: Method, replace: bool = False) -> Method:
    """Add `method` under its name (FastdiffError if taken, unless `replace`); -> method."""
    if not method.name or "," in method.name or "+" in method.name:
        raise FastdiffError(f"a method needs a name without ',' or '+', got {method.name!r}")
    _builtins()  # fastdiff's own first: they come first in --help and errors
    if method.name in _METHODS and not replace:
        raise FastdiffError(f"method {method.name!r} is registered already")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    _METHODS.pop(name, None)


_loading: list[bool] = []


def _builtins() -> None:
    if _loading:
        return  # importing them now: their own register_method calls
    _loading.append(True)
    try:
        for module in BUILTIN:
            importlib.import_module(module)
    finally:
        _loading.clear()
    from fastdiff.registry import load_plugins

    load_plugins()  # installed packages' methods (entry-point group fastdiff.methods)


def method_names() -> tuple[str, ...]:
    """The registered methods' names: fastdiff's own in BUILTIN order, then the others in registration order."""
    _builtins()
    rank = {module: i for i, module in enumerate(BUILTIN)}
    return tuple(sorted(_METHODS, key=lambda n: rank.get(type(_METHODS[n]).__module__, len(BUILTIN))))


def get_method(name: str) -> Method:
    """The registered method `name`; FastdiffError naming the registered ones otherwise."""
    _builtins()
    try:
        return _METHODS[name]
    except KeyError:
        raise FastdiffError(f"--method: unknown {name!r}; choose from {', '.join(method_names())} "
                            "(several: pd,cd)") from None


def parse_methods(text: str) -> tuple[Method, ...]:
    """--method as methods: registered names joined by ',' (or '+', as in pd+cd), each once."""
    names = [m.strip() for m in text.replace("+", ",").split(",") if m.strip()]
    if not names:
        raise FastdiffError("--method needs at least one method, e.g. pd, cd or pd,cd")
    if len(set(names)) < len(names):
        raise FastdiffError(f"--method {text!r} names a method twice")
    return tuple(get_method(n) for n in names)


def students_evaluations(run, method: Method) -> list[dict]:
    """TRAINING_FIELDS rows of `method`'s student checkpoints in `run`/students that carry their own evaluation
    (role.evaluation: one dict or one per NFE) and cost, sorted by (updates, NFE)."""
    from pathlib import Path

    from fastdiff.checkpoint import load_checkpoint, role_of

    rows = []
    for path in sorted((Path(run) / "students").glob("*.pt")):
        ckpt = load_checkpoint(path)
        role, cost = role_of(ckpt, path), ckpt.get("cost") or {}
        if role["method"] != method.name or role["sampler"] is None or not role.get("evaluation") \
                or "updates" not in cost:  # (a guided run's first stage is no student of the sweep)
            continue
        evaluations = role["evaluation"] if isinstance(role["evaluation"], list) else [role["evaluation"]]
        rows += [{"method": method.label or method.name, "short": method.short or method.name.upper(),
                  "nfe": int(e["nfe"]), "updates": int(cost["updates"]),
                  "forward_equivalents": cost.get("forward_equivalents", ""), "wall_clock_s": cost.get("wall_clock_s", ""),
                  "metric": e["metric"], "value": e["student_value"]} for e in evaluations]
    unique = {(r["updates"], r["nfe"]): r for r in rows}  # a final student may also be saved as a snapshot
    return [unique[k] for k in sorted(unique)]


def write_training_points(run, methods, out) -> Path | None:
    """`out`/training.csv: the training points of `methods` (in order) from `run`; None (nothing written) when none
    has any."""
    import csv
    import io
    from pathlib import Path

    from fastdiff.io import write_text

    rows = [row for method in methods for row in method.training_points(run)]
    if not rows:
        return None
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=TRAINING_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(Path(out) / TRAINING_NAME, text.getvalue())
    return Path(out) / TRAINING_NAME


# --- what a method's run shares -----------------------------------------------------------------------------------


def resume_state(ctx: "DistillRun", stage: str) -> dict | None:
    """The state.pt (or its previous checkpoint) of `stage` to resume, or None: a fresh stage. A method marks its
    stage in fit's `extra_state` ({"stage": ...}); state.pt holds the stage in progress of the run's methods."""
    from fastdiff.checkpoint import load_resumable

    state = load_resumable(ctx.state_path, map_location=ctx.device)
    return state if state is not None and state.get("stage") == stage else None


def student_cost(ctx: "DistillRun", method: Method, updates: int, wall: float) -> dict:
    """The `cost` a student checkpoint records after `updates` updates of `method` (and `wall` s of training): the
    updates, forward-equivalents in all and per network (Method.update_cost), the teacher evaluations and student
    forward + backward passes, the wall-clock, device and threads. The teacher's own training is not included."""
    import torch

    per = method.update_cost(ctx.cfg)
    return {"updates": updates, "forward_equivalents": forward_equivalents(per, updates),
            "forward_equivalents_by_network": {k: v * updates for k, v in per.items()},
            "teacher_evals": int(per.get("teacher", 0) * updates / FORWARD),
            "student_passes": int(per.get("student", 0) * updates / TRAINED), "wall_clock_s": round(wall, 1),
            "device": str(ctx.device), "threads": torch.get_num_threads()}


def evaluate_student(ctx: "DistillRun", net, sampler: str, grid: str, steps: int,
                     guidance: float | None = None) -> dict:
    """A student's own evaluation (rank 0): `steps` steps of its sampler on its grid and the teacher's DDIM at the same
    step count, on the same per-index noise, scored with the run's round metric -> {metric, student_value,
    teacher_ddim_value, samples, nfe}. `guidance` w: a conditional student distilled from the CFG teacher at that w
    (it has no w input): both sample the evaluation conditions (class k % C, or the held-out prompt asking for it),
    the teacher under CFG at w, and the classifier's accuracy on the asked-for digit is added (image data)."""
    import torch

    from fastdiff import registry
    from fastdiff.grids import make_grid
    from fastdiff.samplers import initial_noise, sample

    cfg, shape, n = ctx.cfg, tuple(ctx.teacher0.data_shape), ctx.cfg.eval_samples
    student, teacher_net = net, ctx.teacher0.net
    if guidance is not None:
        from fastdiff.conditioning import eval_condition
        from fastdiff.guidance import conditional, guided

        y = eval_condition(ctx.tcfg.cond, ctx.teacher0.net, range(n), ctx.num_classes, ctx.device)
        student, teacher_net = conditional(net, y), guided(ctx.teacher0.net, y, ctx.num_classes)
    x, gens = initial_noise(range(n), shape, cfg.seed, ctx.device, rng=cfg.noise)
    with torch.no_grad():
        out = registry.sampler(sampler).run(student, x, make_grid(grid, steps, ctx.schedule), schedule=ctx.schedule,
                                            param=cfg.param, clip=ctx.clip, generator=gens, guidance=None)
    teacher = sample(teacher_net, n, shape, make_grid("student", out.nfe, ctx.schedule), schedule=ctx.schedule,
                     param=ctx.teacher0.param, seed=cfg.seed, device=ctx.device, clip=ctx.clip, rng=cfg.noise,
                     guidance=guidance)
    name, score = ctx.scorer
    x_student, x_teacher = ctx.decode(out.x), ctx.decode(teacher)
    accuracy = {}
    if guidance is not None:
        accuracy = accuracy_columns(ctx, x_student, x_teacher)
    return {"metric": name, "student_value": f"{score(x_student):.6g}",
            "teacher_ddim_value": f"{score(x_teacher):.6g}", "samples": n, "nfe": out.nfe, **accuracy}


def accuracy_columns(ctx: "DistillRun", x_student, x_teacher) -> dict:
    """The classifier's accuracy on the digit samples 0..n-1 asked for (labelled image data sets only)."""
    from fastdiff.conditioning import requested_classes
    from fastdiff.metrics import class_accuracy

    if len(ctx.teacher0.data_shape) != 3:
        return {}
    y = requested_classes(range(len(x_student)), ctx.num_classes, "cpu")
    return {"student_accuracy": f"{class_accuracy(x_student, y, ctx.tcfg.dataset):.4f}",
            "teacher_accuracy": f"{class_accuracy(x_teacher, y, ctx.tcfg.dataset):.4f}"}


def save_student(ctx: "DistillRun", name, net, *, method: "Method | str", sampler: str | None, grid: str,
                 steps: int | None, cost: dict | None, evaluation: dict | list | None = None, swept: bool = True,
                 extra: dict | None = None) -> None:
    """students/<name>.pt (or the path `name`; rank 0): a student checkpoint fastdiff.load_student, the sweep,
    fastdiff.sample and fastdiff.export read, naming its role (method, sampler, own grid, N, swept, its evaluation)
    and its cost; `extra` adds keys of the method's own (a progressive student's round). A stage that is not a
    student of the sweep (guided distillation's first stage) has sampler None and steps None."""
    from pathlib import Path

    from fastdiff import distributed as dist
    from fastdiff.checkpoint import save_checkpoint

    if not dist.is_main():
        return
    method = method if isinstance(method, str) else method.name
    path = name if isinstance(name, Path) else ctx.run / "students" / f"{name}.pt"
    save_checkpoint(path, {
        "kind": "student", "method": method, "config": ctx.student_cfg, "network": ctx.student_network,
        "param": ctx.cfg.param, "steps": steps, "schedule": ctx.schedule.to_dict(),
        "data_shape": list(ctx.teacher0.data_shape), "model": net.state_dict(), "updates": (cost or {}).get("updates"),
        "teacher": str(ctx.teacher0.path), "guided": ctx.cfg.guided, "cost": cost,
        "role": {"method": method, "sampler": sampler, "grid": grid, "steps": steps or 0, "swept": swept,
                 "evaluation": evaluation}, **ctx.latent_payload, **(extra or {})})
