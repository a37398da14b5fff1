"""Frozen-dataclass configs: JSON round-trip and an argparse CLI derived from the fields.

A config class documents each field with a trailing comment on its line (`lr: float = 2e-4  # Adam learning
rate`), which becomes the field's --help text; a field typed `Literal[...]` (or a tuple of them) has its choices
checked here, in one place, on the command line and for configs built in code (`check_choices`). A field typed
`Annotated[str, OneOf(names)]` takes its choices from `names()` when checked: a registry that grows (a sampler a new
method registers) without a change here.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from fastdiff.errors import FastdiffError


@dataclass(frozen=True)
class OneOf:
    """`Annotated[str, OneOf(names)]`: a field whose allowed values are `names()` at the time it is checked."""

    names: Callable[[], tuple[str, ...]]


class _Parser(argparse.ArgumentParser):
    """argparse that raises FastdiffError (one line, exit 2 via run_cli) instead of printing usage."""

    def error(self, message):
        raise FastdiffError(f"{message} (see --help)")


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _one_of(tp) -> OneOf | None:
    if typing.get_origin(tp) is typing.Annotated:
        return next((m for m in tp.__metadata__ if isinstance(m, OneOf)), None)
    return None


def _choices(tp) -> tuple | None:
    """The allowed values of a Literal type, a OneOf-annotated str (or of a tuple of them), else None."""
    if typing.get_origin(tp) is tuple:
        return _choices(typing.get_args(tp)[0])
    one_of = _one_of(tp)
    if one_of is not None:
        return tuple(one_of.names())
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


def _bad_choice(name: str, value, allowed) -> FastdiffError:
    return FastdiffError(f"--{name.replace('_', '-')} {value!r} is not one of {', '.join(map(str, allowed))}")


def _parse(name: str, tp, text: str):
    """Parse one CLI value `text` for a field of type `tp` (int, float, str, bool, Literal, tuple[X, ...])."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal or _one_of(tp) is not None:
        if text not in _choices(tp):
            raise _bad_choice(name, text, _choices(tp))
        return text
    try:
        if origin is tuple:
            inner = typing.get_args(tp)[0]
            return tuple(_parse(name, inner, s) for s in text.split(",") if s.strip())
        if tp is bool:
            low = text.lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return low in ("1", "true", "yes", "on")
        return tp(text)
    except ValueError:
        what = getattr(tp, "__name__", tp)
        accepted = " (use true or false)" if tp is bool else ""
        raise FastdiffError(f"--{name.replace('_', '-')}: cannot read {text!r} as {what}{accepted}") from None


def check_range(cfg, name: str, ok: bool, need: str) -> None:
    """FastdiffError naming the option, what it needs and the value it got, unless `ok`."""
    if not ok:
        raise FastdiffError(f"--{name.replace('_', '-')} must be {need}, got {getattr(cfg, name)!r}")


def check_choices(cfg) -> None:
    """FastdiffError for a Literal-typed field of `cfg` holding a value outside its choices."""
    types = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        allowed = _choices(types[f.name])
        value = getattr(cfg, f.name)
        for v in (value if isinstance(value, tuple) else (value,)) if allowed else ():
            if v not in allowed:
                raise _bad_choice(f.name, v, allowed)


@functools.lru_cache(maxsize=None)
def field_help(cls) -> dict[str, str]:
    """{field: the trailing comment on its line in the class body} (empty where the source is not available)."""
    helps = {}
    for klass in reversed(cls.__mro__):  # inherited fields first, the class's own comments win
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        helps.update(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+?)\s*$", source, flags=re.M))
    return helps


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: Sequence[str] = ()) -> None:
    """One `--field-name VALUE` option per dataclass field, with the field's comment as help; tuples are
    comma-separated."""
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _field_types(cls)[f.name]
        flag = {"nargs": "?", "const": "true"} if tp is bool else {}  # a bare --flag means true
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, metavar=_metavar(tp), **flag,
                            help=f"{helps.get(f.name, f.name)} (default: the preset's; {f.default!r} in the base "
                                 "config)".replace("%", "%%"))


def _metavar(tp) -> str:
    allowed = _choices(tp)
    if allowed:
        return ("{" + ",".join(allowed) + "}") + (",..." if typing.get_origin(tp) is tuple else "")
    if typing.get_origin(tp) is tuple:
        return "A,B,..."
    return getattr(tp, "__name__", "VALUE").upper()


def overrides_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
    """The fields the user set on the command line, parsed to their types."""
    types = _field_types(cls)
    out = {}
    for f in dataclasses.fields(cls):
        text = getattr(args, f.name, None)
        if text is not None:
            out[f.name] = _parse(f.name, types[f.name], text)
    return out


def to_dict(cfg) -> dict[str, Any]:
    """JSON-ready dict of a config (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
    """A config dict written by an earlier fastdiff with today's field names (`cls.RENAMED`: old -> new)."""
    renamed = getattr(cls, "RENAMED", {})
    return {renamed.get(k, k): v for k, v in data.items()}


def from_dict(cls, data: dict[str, Any]):
    """Inverse of to_dict; fields renamed since (cls.RENAMED) are mapped, other unknown keys are an error (a config
    from another version)."""
    data = upgrade(cls, data)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise FastdiffError(f"config has unknown fields {sorted(unknown)}; was it written by another fastdiff version?")
    types = _field_types(cls)
    return cls(**{k: tuple(v) if typing.get_origin(types[k]) is tuple else v for k, v in data.items()})


def dumps(cfg) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n"


def diff(a: dict, b: dict) -> list[str]:
    """Human-readable differences between two config dicts."""
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
