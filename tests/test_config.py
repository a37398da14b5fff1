"""Frozen-dataclass configs: the derived CLI (typed parsing, errors) and the JSON round-trip."""
from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from fastdiff import config as cfgs
from fastdiff.errors import FastdiffError
from fastdiff.runs import config_from_argv
from fastdiff.train import PRESETS, TrainConfig


@dataclasses.dataclass(frozen=True)
class Cfg:
    n: int = 1
    lr: float = 0.5
    name: str = "a"
    flag: bool = False
    sizes: tuple[int, ...] = (1, 2)
    ratios: tuple[float, ...] = ()
    max_value: int = 7


def _parse(argv):
    parser = cfgs.make_parser("prog", "test")
    cfgs.add_dataclass_args(parser, Cfg)
    return cfgs.overrides_from_args(Cfg, parser.parse_args(argv))


def test_cli_parses_each_field_type():
    got = _parse(["--n", "3", "--lr", "1e-3", "--name", "b c", "--flag", "yes", "--sizes", "4, 5,6",
                  "--ratios", "0.5,2", "--max-value", "-2"])
    assert got == {"n": 3, "lr": 1e-3, "name": "b c", "flag": True, "sizes": (4, 5, 6), "ratios": (0.5, 2.0),
                   "max_value": -2}
    assert type(got["lr"]) is float and type(got["n"]) is int
    assert _parse([]) == {}
    assert _parse(["--sizes", ""]) == {"sizes": ()}
    assert dataclasses.replace(Cfg(), **_parse(["--n", "9"])) == Cfg(n=9)


@pytest.mark.parametrize("text, value", [("1", True), ("true", True), ("On", True), ("YES", True),
                                         ("0", False), ("false", False), ("off", False), ("no", False)])
def test_cli_bools(text, value):
    assert _parse(["--flag", text]) == {"flag": value}


@pytest.mark.parametrize("argv, match", [(["--n", "1.5"], "--n: cannot read '1.5' as int"),
                                         (["--lr", "abc"], "--lr: cannot read 'abc' as float"),
                                         (["--flag", "maybe"], "--flag: cannot read 'maybe' as bool"),
                                         (["--sizes", "1,x"], "--sizes: cannot read 'x' as int"),
                                         (["--nope", "1"], "unrecognized arguments: --nope 1"),
                                         (["--n"], "expected one argument")])
def test_cli_errors_are_one_line_user_errors(argv, match):
    with pytest.raises(FastdiffError, match=match) as err:
        _parse(argv)
    assert "\n" not in str(err.value)


def test_to_dict_from_dict_round_trip():
    cfg = Cfg(n=4, lr=0.25, name="x", flag=True, sizes=(3,), ratios=(0.1, 0.2))
    d = cfgs.to_dict(cfg)
    assert d["sizes"] == [3] and d["ratios"] == [0.1, 0.2]
    assert cfgs.from_dict(Cfg, json.loads(json.dumps(d))) == cfg
    assert cfgs.from_dict(Cfg, {"n": 2}) == Cfg(n=2)  # missing fields take their defaults
    for preset in PRESETS.values():
        assert cfgs.from_dict(TrainConfig, json.loads(cfgs.dumps(preset))) == preset


def test_from_dict_refuses_unknown_fields():
    with pytest.raises(FastdiffError, match=r"unknown fields \['bogus', 'zz'\]"):
        cfgs.from_dict(Cfg, {"n": 1, "bogus": 2, "zz": 3})


def test_dumps_is_stable_json_and_diff_names_changes():
    text = cfgs.dumps(Cfg())
    assert text.endswith("\n") and list(json.loads(text)) == sorted(json.loads(text))
    assert cfgs.diff(cfgs.to_dict(Cfg()), cfgs.to_dict(Cfg(n=2, sizes=(1,)))) == ["n: 1 -> 2", "sizes: [1, 2] -> [1]"]
    assert cfgs.diff({"a": 1}, {"b": 1}) == ["a: 1 -> None", "b: None -> 1"]


def test_train_cli_applies_overrides_to_the_preset():
    cfg, _ = config_from_argv(["--preset", "toy2d", "--updates", "7", "--channel-mult", "1,2,4", "--flip", "true",
                               "--attn-resolutions", ""], TrainConfig, PRESETS, "p", "d")
    assert cfg == dataclasses.replace(PRESETS["toy2d"], updates=7, channel_mult=(1, 2, 4), flip=True,
                                      attn_resolutions=())
    assert config_from_argv([], TrainConfig, PRESETS, "p", "d")[0] == PRESETS["digits"]
    with pytest.raises(FastdiffError, match="unknown preset .big.; choose one of toy2d, digits, digits-cond, digits-text, digits-text-unnamed7, digits-text-dark, digits-latent, digits-diffusers, cifar10"):
        config_from_argv(["--preset", "big"], TrainConfig, PRESETS, "p", "d")


def test_choices_are_declared_once_checked_in_one_place_and_every_field_has_help():
    """Config fields typed with the modules' Literal aliases: the CLI, check_choices and the modules agree; each
    field's trailing comment is its --help text."""
    from fastdiff.bench import SAMPLERS, BenchConfig
    from fastdiff.distill import DistillConfig
    from fastdiff.grids import SPACINGS
    from fastdiff.losses import WEIGHTINGS
    from fastdiff.schedules import SCHEDULES

    assert cfgs._choices(typing.get_type_hints(TrainConfig)["schedule"]) == SCHEDULES == ("linear", "cosine")
    assert cfgs._choices(typing.get_type_hints(TrainConfig)["weighting"]) == WEIGHTINGS
    assert cfgs._choices(typing.get_type_hints(BenchConfig, include_extras=True)["samplers"]) == SAMPLERS
    assert cfgs._choices(typing.get_type_hints(BenchConfig)["spacings"]) == SPACINGS
    sections = [typing.get_type_hints(DistillConfig)[name] for name in ("pd", "cd")]  # the methods' options
    for cls in (TrainConfig, DistillConfig, BenchConfig, *sections):
        helps = cfgs.field_help(cls)
        values = {f.name for f in dataclasses.fields(cls) if not cfgs.is_section(typing.get_type_hints(cls)[f.name])}
        assert values <= set(helps), cls
    assert [path for path, _, _ in cfgs.leaves(DistillConfig) if "." in path][:2] == ["pd.start_steps", "pd.rounds"]
    with pytest.raises(FastdiffError, match="--cd.metric 'lpips' is not one of pseudo-huber, l2"):
        cfgs.check_choices(cfgs.replace(DistillConfig(), {"cd.metric": "lpips"}))
    with pytest.raises(FastdiffError, match="--schedule 'sqrt' is not one of linear, cosine"):
        cfgs.check_choices(dataclasses.replace(TrainConfig(), schedule="sqrt"))
    with pytest.raises(FastdiffError, match="--samplers 'euler' is not one of ddpm"):
        cfgs.check_choices(dataclasses.replace(BenchConfig(), samplers=("ddim", "euler")))
    with pytest.raises(FastdiffError, match="--param 'z' is not one of eps, x0, v"):
        config_from_argv(["--param", "z"], TrainConfig, PRESETS, "p", "d")
