"""How often the intervals a sweep prints cover what they estimate, measured by simulation:
`python -m fastdiff.coverage [--reps N] [--out FILE.md]`.

Gaussian features (d = 8) stand in for a network's: a reference set drawn from N(0, I), and two "rows" made from the
SAME standard normal draws per sample index (the anchor x = z + a, the row x = s·z + b), as a sweep's rows share their
noise per index. Two scenarios: the anchor drawn from the reference distribution itself (its true KID is 0 and its FID
is nothing but small-sample bias: the case where ratios to the anchor broke), and both rows away from it.

What each interval estimates, and so what its coverage is measured against:
- KID of a row and KID difference (fastdiff.distances: two-sample jackknife over the generated and the reference
  samples): the population MMD² (difference) — the estimator is unbiased — over fresh generated AND reference sets.
  The truth is the mean of the estimates over an independent batch of replicates.
- FID difference (fastdiff.uncertainty: basic paired bootstrap over the generated indices), precision and recall
  differences (paired delete-one / half-samples over the generated indices): the expected difference at this n with
  the reference set held fixed (none of them resamples it). The truth is the mean over an independent batch of
  generated sets against that one reference set.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fastdiff.distances import KIDReference, ManifoldReference
from fastdiff.uncertainty import RefStats, bootstrap_fids, fid, paired_difference, resample_counts

D = 8
SCENARIOS = {  # name: (anchor shift a, row scale s, row shift b)
    "anchor = reference distribution": (0.0, 1.1, 0.1),
    "both rows away from it": (0.3, 1.3, 0.0),
}
UNCONDITIONAL = ("KID of the row", "KID difference row − anchor")
CONDITIONAL = ("FID difference row − anchor", "precision difference", "recall difference")


@dataclass(frozen=True)
class Coverage:
    scenario: str
    interval: str
    conditional: str
    nominal: float
    measured: float
    reps: int


def _rows(rng, n: int, a: float, s: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    z = rng.standard_normal((n, D))
    return z + a, s * z + b


def _kid(rng, n: int, m: int, a: float, s: float, b: float) -> dict:
    """One replicate with a fresh reference set -> {interval name: Jack}."""
    kid = KIDReference(rng.standard_normal((m, D)))
    anchor, row = _rows(rng, n, a, s, b)
    k_row = kid.kid(row)
    return dict(zip(UNCONDITIONAL, (k_row, k_row - kid.kid(anchor))))


def _given_reference(rng, ref: np.ndarray, n: int, a: float, s: float, b: float, counts, level: float) -> dict:
    """One replicate against the fixed reference set `ref` -> {interval name: (estimate, interval)}."""
    anchor, row = _rows(rng, n, a, s, b)
    stats, prc = RefStats.of(ref), ManifoldReference(ref)
    f_row, f_anchor = fid(row, stats), fid(anchor, stats)
    fid_iv = paired_difference(f_row, bootstrap_fids(row, counts, stats), f_anchor,
                               bootstrap_fids(anchor, counts, stats), level)
    (p_a, r_a), (p_r, r_r) = prc.precision_recall(anchor), prc.precision_recall(row)
    p, r = p_r - p_a, r_r - r_a
    return dict(zip(CONDITIONAL, ((f_row - f_anchor, fid_iv), (p.est, p.interval(level)),
                                  (r.est, r.interval(level)))))


def simulate(reps: int = 400, n: int = 200, m: int = 150, resamples: int = 500, seed: int = 0,
             level: float = 0.95) -> list[Coverage]:
    """The measured coverage of every printed interval in every scenario (`reps` replicates each, and as many more
    for the truth)."""
    rng = np.random.default_rng(seed)
    counts = resample_counts(n, resamples, seed)
    out = []
    for name, (a, s, b) in SCENARIOS.items():
        truth = {k: np.mean(v) for k, v in _collect([{k: j.est for k, j in _kid(rng, n, m, a, s, b).items()}
                                                     for _ in range(reps)]).items()}
        hits = _collect([{k: _inside(j.interval(level), truth[k]) for k, j in _kid(rng, n, m, a, s, b).items()}
                         for _ in range(reps)])
        out += [Coverage(name, k, "no (reference resampled too)", level, float(np.mean(hits[k])), reps)
                for k in UNCONDITIONAL]
        ref = rng.standard_normal((m, D))
        runs = [_given_reference(rng, ref, n, a, s, b, counts, level) for _ in range(2 * reps)]
        truth = {k: np.mean([r[k][0] for r in runs[:reps]]) for k in CONDITIONAL}
        out += [Coverage(name, k, "yes (one reference set)", level,
                         float(np.mean([_inside(r[k][1], truth[k]) for r in runs[reps:]])), reps)
                for k in CONDITIONAL]
    return out


def _collect(dicts: list[dict]) -> dict:
    return {k: [d[k] for d in dicts] for k in dicts[0]}


def _inside(interval: tuple[float, float], value: float) -> bool:
    return interval[0] <= value <= interval[1]


def markdown(rows: Sequence[Coverage], n: int, m: int, provenance: str = "") -> str:
    lines = [f"Coverage of fastdiff's intervals by simulation (Gaussian features, d = {D}, n = {n} generated per row, "
             f"m = {m} reference; `python -m fastdiff.coverage`)", ""]
    lines += [provenance, ""] if provenance else []
    lines += ["| scenario | interval | conditional on the reference set | nominal | measured | replicates |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r.scenario} | {r.interval} | {r.conditional} | {r.nominal:.0%} | {r.measured:.1%} | {r.reps} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.coverage", description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=1000, help="replicates per scenario (and as many for the truth)")
    parser.add_argument("--n", type=int, default=200, help="generated samples per row")
    parser.add_argument("--m", type=int, default=150, help="reference samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    if args.reps < 10 or args.n < 10 or args.m < 10:
        parser.error("--reps, --n and --m must be >= 10")
    import datetime
    import platform

    from fastdiff.results import git_commit

    started = datetime.datetime.now(datetime.timezone.utc)
    rows = simulate(args.reps, args.n, args.m, seed=args.seed)
    provenance = (f"Seed {args.seed}; commit {git_commit()}; numpy {np.__version__}, Python {platform.python_version()}; "
                  f"{started:%Y-%m-%d}, {(datetime.datetime.now(datetime.timezone.utc) - started).total_seconds():.0f} s "
                  f"on {platform.machine()}.")
    table = markdown(rows, args.n, args.m, provenance)
    print(table, end="")
    if args.out:
        from pathlib import Path

        from fastdiff.io import write_text

        write_text(Path(args.out), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
