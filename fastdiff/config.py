"""Frozen-dataclass configs: JSON round-trip and an argparse CLI derived from the fields.

A config class documents each field with a trailing comment on its line (`lr: float = 2e-4  # Adam learning
rate`), which becomes the field's --help text; a field typed `Literal[...]` (or a tuple of them) has its choices
checked here, in one place, on the command line and for configs built in code (`check_choices`). A field typed
`Annotated[str, OneOf(names)]` takes its choices from `names()` when checked: a registry that grows (a sampler a new
method registers) without a change here.

A field whose type is itself a (frozen) dataclass is a section: `cfg.cd.updates`, on the command line `--cd.updates`,
in config.json `{"cd": {"updates": ...}}`. A section class may map its fields to the flat names they had before it
existed (`FLAT = {"updates": "cd_updates"}`): those stay accepted as options (`--cd-updates`). Code addresses a field
anywhere by its dotted path (`get`, `replace`, `flatten`).
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


def is_section(tp) -> bool:
    """Whether a field of type `tp` is a nested config (a dataclass) rather than a value."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def leaves(cls, prefix: str = ""):
    """(dotted path, type, dataclass field) of every value field of `cls`, sections expanded, in field order."""
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        if is_section(types[f.name]):
            yield from leaves(types[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, types[f.name], f


def get(cfg, path: str):
    """The value at dotted `path` (`"cd.updates"`) of a config."""
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def replace(cfg, changes: dict[str, Any]):
    """A copy of frozen config `cfg` with the values at the dotted paths of `changes` replaced (sections copied)."""
    def value(name, new):  # a section's changes are a dict of its own paths
        old = getattr(cfg, name)
        return replace(old, new) if dataclasses.is_dataclass(old) and isinstance(new, dict) else new

    return dataclasses.replace(cfg, **{name: value(name, new) for name, new in _nest(changes).items()})


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """A config dict with its sections' keys as dotted paths (`{"cd": {"updates": 0}}` -> `{"cd.updates": 0}`)."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def flat_names(cls) -> dict[str, str]:
    """{the flat name a section's field had before: its dotted path} over the sections of `cls` (their `FLAT`)."""
    out = {}
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        if is_section(types[f.name]):
            sub = types[f.name]
            out.update({old: f"{f.name}.{new}" for new, old in getattr(sub, "FLAT", {}).items()})
            out.update({old: f"{f.name}.{new}" for old, new in flat_names(sub).items()})
    return out


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
    """FastdiffError naming the option (`name` a field or a dotted path), what it needs and the value it got, unless
    `ok`."""
    if not ok:
        raise FastdiffError(f"--{name.replace('_', '-')} must be {need}, got {get(cfg, name)!r}")


def check_choices(cfg) -> None:
    """FastdiffError for a Literal-typed field of `cfg` (or of its sections) holding a value outside its choices."""
    for path, tp, _ in leaves(type(cfg)):
        allowed = _choices(tp)
        value = get(cfg, path)
        for v in (value if isinstance(value, tuple) else (value,)) if allowed else ():
            if v not in allowed:
                raise _bad_choice(path, v, allowed)


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


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: Sequence[str] = (), prefix: str = "") -> None:
    """One `--field-name VALUE` option per dataclass field, with the field's comment as help; tuples are
    comma-separated; a section's fields are `--section.field-name` (and their `FLAT` names of before)."""
    helps = field_help(cls)
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = types[f.name]
        if is_section(tp):
            add_dataclass_args(parser, tp, prefix=f"{prefix}{f.name}.")
            continue
        flags = [f"--{prefix}{f.name.replace('_', '-')}"]
        if f.name in getattr(cls, "FLAT", {}):
            flags.append(f"--{cls.FLAT[f.name].replace('_', '-')}")
        flag = {"nargs": "?", "const": "true"} if tp is bool else {}  # a bare --flag means true
        parser.add_argument(*flags, dest=prefix + f.name, default=None, metavar=_metavar(tp), **flag,
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
    """The fields the user set on the command line, parsed to their types: {dotted path: value}."""
    out = {}
    for path, tp, _ in leaves(cls):
        text = getattr(args, path, None)
        if text is not None:
            out[path] = _parse(path, tp, text)
    return out


def to_dict(cfg) -> dict[str, Any]:
    """JSON-ready dict of a config (tuples become lists, sections dicts)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else list(v) if isinstance(v, tuple) else v
    return out


def renamed_fields(cls) -> dict[str, str]:
    """{a field name of an earlier fastdiff: its dotted path now}: `cls.RENAMED` and the sections' flat names."""
    return {**flat_names(cls), **getattr(cls, "RENAMED", {})}


def upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
    """A config dict written by an earlier fastdiff with today's field names (`renamed_fields`; the flat name of a
    section's field moves into the section)."""
    renamed, types = renamed_fields(cls), _field_types(cls)
    out: dict[str, Any] = {}
    for k, v in data.items():
        new = renamed.get(k, k)
        head, dot, rest = new.partition(".")
        if dot:
            out.setdefault(head, {})[rest] = v
        elif isinstance(v, dict) and head in types and is_section(types[head]):
            out.setdefault(head, {}).update(v)
        else:
            out[new] = v
    return out


def from_dict(cls, data: dict[str, Any]):
    """Inverse of to_dict; fields renamed since (`renamed_fields`) are mapped, other unknown keys are an error (a
    config from another version)."""
    data = upgrade(cls, data)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise FastdiffError(f"config has unknown fields {sorted(unknown)}; was it written by another fastdiff version?")
    types = _field_types(cls)

    def value(k, v):
        if is_section(types[k]):
            return from_dict(types[k], _nest(v))
        return tuple(v) if typing.get_origin(types[k]) is tuple else v

    return cls(**{k: value(k, v) for k, v in data.items()})


def _nest(data: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys of a section's dict back into sub-dicts (the inverse of `flatten`)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        head, dot, rest = k.partition(".")
        if dot:
            out.setdefault(head, {})[rest] = v
        else:
            out[k] = v
    return out


def dumps(cfg) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n"


def diff(a: dict, b: dict) -> list[str]:
    """Human-readable differences between two config dicts (sections by dotted path)."""
    a, b = flatten(a), flatten(b)
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
