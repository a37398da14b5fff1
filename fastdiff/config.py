"""Frozen-dataclass configs: JSON round-trip and an argparse CLI derived from the fields."""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any, Sequence

from fastdiff.errors import FastdiffError


class _Parser(argparse.ArgumentParser):
    """argparse that raises FastdiffError (one line, exit 2 via run_cli) instead of printing usage."""

    def error(self, message):
        raise FastdiffError(f"{message} (see --help)")


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse(name: str, tp, text: str):
    """Parse one CLI value `text` for a field of type `tp` (int, float, str, bool, tuple[X, ...])."""
    origin = typing.get_origin(tp)
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
        raise FastdiffError(f"--{name.replace('_', '-')}: cannot read {text!r} as {getattr(tp, '__name__', tp)}") from None


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: Sequence[str] = ()) -> None:
    """One `--field-name VALUE` option per dataclass field; tuples are comma-separated."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _field_types(cls)[f.name]
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, metavar=_metavar(tp),
                            help=f"(default from the preset; {f.name}={f.default!r} in the base config)")


def _metavar(tp) -> str:
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
