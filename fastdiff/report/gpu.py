"""The GPU section of the report: the tables of gpu/kernels.json (written by benchmarks/gpu_report.py)."""
from __future__ import annotations

import json
from pathlib import Path

from fastdiff.report.common import md_table


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = ", ".join(map(str, v)) if isinstance(v, list) else v
    return out


def gpu_section(path: Path) -> list[str]:
    """Tables of gpu/kernels.json (written by benchmarks/gpu_report.py): its scalars (nested keys dotted), then one
    table per list of records."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return [f"`{path.name}` is unreadable ({type(err).__name__}).", ""]
    md = [f"### {path.name} — device: {data.get('device', 'not recorded')}", ""]
    scalars = {k: v for k, v in _flatten({k: v for k, v in data.items()
                                          if not isinstance(v, list) or not v or not isinstance(v[0], dict)}).items()
               if not isinstance(v, dict)}
    if scalars:
        md += [md_table(("item", "value"), list(scalars.items())), ""]
    for key, value in data.items():
        records = None
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            records = [_flatten(r) for r in value]
        if records:
            cols = list(dict.fromkeys(c for r in records for c in r))
            md += [f"**{key}**", "", md_table(cols, [[r.get(c, "") for c in cols] for r in records]), ""]
    return md
