"""The sampler registry: one entry per sampler, read by bench, sweep, graphs, sample, export and the report."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import torch

from fastdiff import config as cfgs
from fastdiff import registry
from fastdiff.bench import SAMPLERS, BenchConfig, build_specs
from fastdiff.checkpoint import role_of
from fastdiff.errors import FastdiffError


def test_every_sampler_of_the_sweep_is_one_registry_entry():
    assert SAMPLERS == registry.sampler_names()
    assert registry.student_samplers() == ("distilled", "consistency", "dmd2")
    assert registry.samplers_of("pd") == ("distilled",) and registry.samplers_of("cd") == ("consistency",)
    assert registry.samplers_of("dmd2") == ("dmd2",)
    for name in SAMPLERS:
        entry = registry.sampler(name)
        assert entry.name == name and entry.rows in typing.get_args(registry.RowRule)
        assert entry.description, name
        assert entry.diffusers is not None or entry.refusal or entry.model == "teacher", name
    with pytest.raises(FastdiffError, match="unknown sampler 'nope'; choose one of ddpm"):
        registry.sampler("nope")


def test_row_rules_give_the_rows_of_the_sweep():
    cfg = BenchConfig(model="m", samplers=SAMPLERS, spacings=("linspace",), steps=(1, 2, 4, 64), variance="large")
    specs = build_specs(cfg, 32, {"distilled": [("student", 4), ("student", 1)], "consistency": [("cd18", 18)],
                                  "dmd2": [("student2", 2)]})
    by = {}
    for s in specs:
        by.setdefault(s.sampler, []).append((s.grid, s.steps, s.eta, s.variance))
    assert by["ddpm"] == [("full", 32, None, "large")]
    assert by["ddpm-strided"] == [("linspace", n, None, "large") for n in (1, 2, 4)]  # strided grids stop at T
    assert by["ddim"] == [("linspace", n, 0.0, "") for n in (1, 2, 4)]
    assert by["ddim-eta1"] == [("linspace", n, 1.0, "") for n in (1, 2, 4)]
    assert by["dpm++2m"] == [("logsnr", n, 0.0, "") for n in (1, 2, 4, 64)]
    assert by["heun"] == [("karras", n, 0.0, "") for n in (1, 2, 32)]
    assert by["distilled"] == [("student", 1, 0.0, ""), ("student", 4, 0.0, "")]
    assert by["consistency"] == [("cd18", n, 0.0, "") for n in (1, 2, 4)]
    assert by["dmd2"] == [("student2", n, 0.0, "") for n in (1, 2)]  # up to its N
    assert [s.sampler for s in specs] == [n for n in SAMPLERS for _ in by[n]]  # in the order of cfg.samplers


def test_a_registered_sampler_is_a_choice_of_the_config_and_runs(monkeypatch):
    """A new sampler is one register_sampler call: the configs accept it, the sweep runs it, the report labels it."""
    from fastdiff.report.common import line_label
    from fastdiff.samplers import ddim
    from fastdiff.schedules import Schedule
    from fastdiff.sweep import Spec, run_sampler

    def run(net, x, ts, *, eta=None, variance="", **kw):
        return ddim(net, x, ts, eta=0.0, **kw)

    hint = typing.get_type_hints(BenchConfig, include_extras=True)["samplers"]
    with pytest.raises(FastdiffError, match="--samplers 'mine' is not one of"):
        cfgs._parse("samplers", hint, "ddim,mine")
    registry.register_sampler(registry.SamplerEntry("mine", run, "own", label="my students ({grid})", model="toy"))
    try:
        assert cfgs._parse("samplers", hint, "ddim,mine") == ("ddim", "mine")
        cfgs.check_choices(BenchConfig(model="m", samplers=("mine",)))
        assert "mine" in registry.student_samplers()
        assert line_label("mine", "student", "0.0", "") == "my students (student)"
        with pytest.raises(FastdiffError, match="registered already"):
            registry.register_sampler(registry.SamplerEntry("mine", run, "own"))
        schedule = Schedule("cosine", 1000)
        net = lambda x, t: torch.zeros_like(x)  # noqa: E731
        x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
        out = run_sampler(Spec("mine", "student", 2, 0.0), net, x, schedule, "v", False, None)
        want = ddim(net, x, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), schedule=schedule, param="v")
        assert out.nfe == 2 and torch.equal(out.x, want.x)
    finally:
        registry.unregister_sampler("mine")
    assert "mine" not in registry.sampler_names() and line_label("mine", "g", "", "") == "mine (g)"


def test_labels_and_flags_as_the_report_and_graphs_had_them():
    from fastdiff.graphs import use_graphs
    from fastdiff.report.readme import students, summary_samplers

    assert registry.line_label("ddim", "quadratic", "0.0", "") == "ddim (quadratic, η=0)"
    assert registry.line_label("ddpm", "full", "", "large") == "ddpm (full, large var.)"
    assert registry.line_label("dpm++2m", "logsnr", "0.0", "") == "dpm++2m (logsnr)"
    assert registry.line_label("consistency", "cd18", "0.0", "") == "consistency student (cd18, multistep)"
    assert summary_samplers() == ("distilled", "consistency", "dmd2", "ddpm", "ddpm-strided", "ddim", "dpm++2m",
                                  "dpm++3m", "unipc2-bh2", "unipc3-bh1", "heun")
    assert students() == {"distilled": "progressive (PD) student", "consistency": "consistency (CD) student",
                          "dmd2": "distribution-matching (DMD2) student"}
    assert {n for n in SAMPLERS if registry.sampler(n).graphable} == {"ddpm", "ddpm-strided", "ddim", "distilled"}
    assert not use_graphs("auto", torch.device("cpu"), "ddim")
    from fastdiff.distill.cli import FULL_ONLY_SAMPLERS

    assert FULL_ONLY_SAMPLERS == ("ddim-eta1", "dpm++3m", "unipc2-bh1", "unipc3-bh1", "unipc3-bh2")


def test_a_student_checkpoint_names_its_method_and_sampler_and_older_ones_are_read():
    new = {"kind": "student", "role": {"method": "pd", "sampler": "distilled", "grid": "student", "steps": 4,
                                       "swept": True}}
    assert role_of(new) == new["role"]
    assert role_of({"kind": "teacher"}) is None
    # files of fastdiff before the registry: the role follows from what they hold
    assert role_of({"kind": "student", "steps": 4, "round": 3}, Path("students/student_N4.pt")) == {
        "method": "pd", "sampler": "distilled", "grid": "student", "steps": 4, "swept": True}
    cd = {"kind": "student", "steps": 1, "cd": {"steps": 18}}
    assert role_of(cd, Path("students/cd.pt")) == {"method": "cd", "sampler": "consistency", "grid": "cd18",
                                                   "steps": 18, "swept": True}
    assert not role_of(cd, Path("students/cd_u000100.pt"))["swept"]  # a snapshot: not a row of the sweep
    base = role_of({"kind": "student", "steps": None, "round": -1}, Path("students/guided_base.pt"))
    assert base["sampler"] is None and not base["swept"]


def test_sample_follows_the_sampler_a_student_names(monkeypatch):
    """fastdiff.sample picks the sampler and grid of the student's role; a rows="upto" student takes --steps <= N."""
    from fastdiff.sample import SampleConfig, plan

    linear = torch.nn.Linear(2, 2)

    @dataclasses.dataclass
    class Fake:
        role: dict
        kind: str = "student"
        config: dict = dataclasses.field(default_factory=dict)
        dataset: str = "toy2d"
        param: str = "v"
        schedule: object = None
        hash: str = "h"
        cost: dict | None = None
        codec: object = None
        path: str = "x.pt"
        net: object = linear
        steps: int = 1

        @property
        def sampler(self):
            return self.role["sampler"]

    cd = Fake({"method": "cd", "sampler": "consistency", "grid": "cd18", "steps": 18, "swept": True})
    assert plan(SampleConfig(model="x"), cd)[0].label == "consistency/cd18/4"
    assert plan(SampleConfig(model="x", steps=7), cd)[0].label == "consistency/cd18/7"
    with pytest.raises(FastdiffError, match="trained on 18 steps"):
        plan(SampleConfig(model="x", steps=19), cd)
    pd = Fake({"method": "pd", "sampler": "distilled", "grid": "student", "steps": 4, "swept": True})
    assert plan(SampleConfig(model="x"), pd)[0].label == "distilled/student/4"
    with pytest.raises(FastdiffError, match="own 4-step grid"):
        plan(SampleConfig(model="x", steps=2), pd)
