"""The long-format results CSV of a sweep: its columns, its row key, provenance helpers. No torch here: the
report reads the same contract.

One row per (sampling run, metric); every value is a string as written, so a re-run compares keys exactly.
"""
from __future__ import annotations

import csv
import io
import subprocess
from pathlib import Path

from fastdiff.errors import FastdiffError
from fastdiff.io import write_text

CSV_NAME = "fid_vs_steps.csv"
CONSTRAINTS_NAME = "constraints.txt"  # the installed package versions of the latest sweep (installed_versions)
MARGIN_NAME = "margin.json"  # a family's margin delta (python -m fastdiff.margin), beside its CSV
COVERAGE_NAME = "coverage.md"  # python -m fastdiff.coverage's table, at the top of a results folder
# A latent family's autoencoder and its reconstruction floor (fastdiff.autoencoder writes it; distill copies it beside
# the family's CSV; the report reads it there)
AUTOENCODER_INFO = "autoencoder.json"
COLUMNS = ["dataset", "model_hash", "teacher_hash", "sampler", "grid", "grid_hash", "eta", "variance", "clip",
           "guidance", "noise", "steps", "nfe", "n_samples", "seed", "metric", "extractor", "extractor_accuracy",
           "reference", "value", "batch_size", "wall_clock_s_per_batch", "wall_clock_s_total", "device",
           "threads", "torch_version", "torch_fidelity_version", "fastdiff_version", "fastdiff_commit",
           "samples_file", "timestamp", "train_updates", "train_teacher_evals", "train_student_passes",
           "train_wall_clock_s", "train_device", "ci_low", "ci_high", "diff_low", "diff_high", "ratio_low",
           "ratio_high", "ci_reference", "ci_method", "ci_resamples", "autoencoder", "cuda_graph"]
# What a student row's model cost to make, cumulative from its teacher (the student checkpoint's `cost`; empty for
# the teacher's rows): optimiser updates, teacher network evaluations and student forward+backward passes (per
# example), wall-clock and device. Added in fastdiff 0.3: a CSV without them is read with them empty.
COST_COLUMNS = COLUMNS[-16:-11]
# The sampling uncertainty of an FID row (fastdiff.uncertainty, a paired bootstrap over sample indices): the basic
# 95 % interval of the FID, of its difference to the sweep's anchor row `ci_reference` and of its ratio to it, the
# method and the number of resamples. Added in fastdiff 0.4: empty in older CSVs and in other metrics' rows.
CI_COLUMNS = COLUMNS[-11:-2]
# The autoencoder a latent model's samples were decoded by before scoring (its id, fastdiff.latent.Codec.hash; empty
# for pixel-space models). Added in fastdiff 0.5: empty in older CSVs.
LATENT_COLUMNS = COLUMNS[-2:-1]
# Whether the row's wall-clock was measured with its sampler loop replayed as a CUDA graph (fastdiff.graphs). Added
# in fastdiff 0.6: empty in older CSVs.
RUNTIME_COLUMNS = COLUMNS[-1:]
OPTIONAL = COST_COLUMNS + CI_COLUMNS + LATENT_COLUMNS + RUNTIME_COLUMNS
# What defines a row (a re-run skips rows whose key is present): every option that changes the samples or their
# score; `grid_hash` (sha256 of the float64 time grid) makes a changed grid definition a new row. Everything else
# is measured or provenance.
KEY = ("dataset", "model_hash", "sampler", "grid", "grid_hash", "eta", "variance", "clip", "guidance", "noise",
       "steps", "n_samples", "seed", "metric", "extractor", "reference", "autoencoder")


def git_commit() -> str:
    """`git rev-parse HEAD` of the fastdiff source tree, "+dirty" appended when its tracked code (the package,
    kernels/) differs from that commit; "unknown" outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", str(here),
                                  str(here.parent / "kernels")], cwd=here, capture_output=True, text=True,
                                 check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if changed else "")) if head else "unknown"


def installed_versions() -> str:
    """A pip constraints file of every Python package installed in this environment (`name==version`, sorted; fastdiff
    itself left out): with `pip install -c constraints.txt -e ".[dev]"` it reproduces the environment that wrote the
    results beside it. The rows carry torch's and torch-fidelity's versions; this carries the rest."""
    from importlib.metadata import distributions

    pins = {}
    for d in distributions():
        name = (d.metadata["Name"] or "").strip()
        if name and name.lower() != "fastdiff":
            pins[name.lower().replace("_", "-")] = f"{name}=={d.version}"
    return ("# The Python packages of the latest sweep written into this folder (python -m fastdiff.bench / distill);\n"
            "# reproduce them with: pip install -c constraints.txt -e \".[dev,diffusers,text]\"\n"
            + "".join(pins[k] + "\n" for k in sorted(pins)))


def to_csv_value(v) -> str:
    """How a value is written to (and keyed in) the CSV: None -> "", floats with repr precision."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    return repr(v) if isinstance(v, float) else str(v)


class ResultsCSV:
    """The long-format CSV of one data set's sweeps, rewritten atomically after every sampling run."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []
        if path.exists():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                earlier = [len(COLUMNS) - len(group) for group in (
                    RUNTIME_COLUMNS, LATENT_COLUMNS + RUNTIME_COLUMNS, CI_COLUMNS + LATENT_COLUMNS + RUNTIME_COLUMNS,
                    OPTIONAL)]
                names = reader.fieldnames or []
                if names != COLUMNS[:len(names)] or len(names) not in (len(COLUMNS), *earlier):
                    raise FastdiffError(f"{path} has other columns than this fastdiff version writes (an earlier "
                                        "version's rows cannot be matched to this one's); move it away or choose "
                                        "another --out-dir")
                self.rows = [{**dict.fromkeys(OPTIONAL, ""), **row} for row in reader]
        self.keys = {tuple(r[k] for k in KEY) for r in self.rows}

    def has(self, row: dict) -> bool:
        return tuple(row[k] for k in KEY) in self.keys

    def add(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows + rows)
        write_text(self.path, buf.getvalue())  # a full disk leaves the file as it was, and self as well
        self.rows += rows
        self.keys |= {tuple(r[k] for k in KEY) for r in rows}


def teacher_hashes(path: Path) -> set[str]:
    """The teachers whose sweeps the results CSV at `path` holds (empty if there is none)."""
    if not path.exists():
        return set()
    with open(path, newline="") as f:
        return {row.get("teacher_hash", "") for row in csv.DictReader(f)} - {""}
