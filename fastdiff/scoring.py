"""How a sweep scores one row from its samples' features: every metric's value, its interval, and its paired difference
to the anchor row (fixed before the sweep), as the results CSV's interval columns.

- `kid` (the primary distance): unbiased KID against the held-out reference set, interval from the two-sample
  jackknife (generated and reference samples: fastdiff.distances); its paired difference to the anchor the same way.
- `kid_teacher`: unbiased KID against many samples of the teacher itself (the anchor's sampler with seeds of its own,
  `teacher_samples`): fidelity to the teacher, the distribution a distilled student should reproduce; the same
  intervals. Its rows name that reference in their `reference` column.
- `fid`: raw FID (torch-fidelity; biased upward by ~tr/n terms), with the basic paired bootstrap interval of its
  difference to the anchor (fastdiff.uncertainty) — conditional on the reference set. No interval of the FID itself
  and no ratio: both would divide or shift by the anchor's bias.
- `precision`, `recall` (k = 3): their own intervals and paired differences, conditional on the reference set.

No ratio to a random anchor anywhere: a ratio's interval would have to carry the anchor's variance and bias, and KID can
be ≤ 0 near the teacher.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastdiff.distances import Jack, KIDReference, ManifoldReference
from fastdiff.uncertainty import PairedBootstrap

JACKKNIFE = "two-sample jackknife (generated + reference samples), normal"
CONDITIONAL = "paired over sample indices, conditional on the reference set, normal"
# how each metric's interval columns were made (the CSV's ci_method)
METHODS = {"kid": JACKKNIFE, "kid_teacher": JACKKNIFE, "precision": CONDITIONAL + " (delete-one)",
           "recall": CONDITIONAL + " (half-samples of the generated set)"}


@dataclass
class _Anchor:
    label: str
    jacks: dict[str, Jack]


class Scorer:
    """The scores of one sweep's rows. `ref` (m, d): the held-out reference's features (None: published statistics
    only, FID alone); `fid_ref`: what FID differences are taken against (those features, or the RefStats); `teacher`
    (N, d) or None: the teacher reference's features; `metrics`: the sweep's; `resamples`: of the FID bootstrap (0:
    no FID differences)."""

    def __init__(self, ref: np.ndarray | None, fid_ref, teacher: np.ndarray | None, metrics, n: int, resamples: int,
                 seed: int, level: float = 0.95):
        self.level = level
        use = ref is not None
        self.kid = KIDReference(ref) if use and "kid" in metrics else None
        self.kid_teacher = KIDReference(teacher) if use and teacher is not None and "kid" in metrics else None
        self.prc = ManifoldReference(ref) if use and "prc" in metrics else None
        self.boot = PairedBootstrap(fid_ref, n, resamples, seed, level) if resamples and "fid" in metrics else None
        self.anchor: _Anchor | None = None

    def _jacks(self, features: np.ndarray) -> dict[str, Jack]:
        out = {}
        if self.kid is not None:
            out["kid"] = self.kid.kid(features)
        if self.kid_teacher is not None:
            out["kid_teacher"] = self.kid_teacher.kid(features)
        if self.prc is not None:
            out["precision"], out["recall"] = self.prc.precision_recall(features)
        return out

    def set_anchor(self, label: str, features: np.ndarray) -> None:
        self.anchor = _Anchor(label, self._jacks(features))
        if self.boot is not None:
            self.boot.set_anchor(label, features)

    def score(self, features: np.ndarray) -> tuple[dict[str, float], dict[str, dict]]:
        """-> ({metric: value} of the feature-based metrics, {metric: its interval columns})."""
        values, columns = {}, {}
        for metric, jack in self._jacks(features).items():
            values[metric] = jack.est
            lo, hi = jack.interval(self.level)
            cols = {"ci_low": lo, "ci_high": hi, "ci_method": f"{METHODS[metric]} {self.level:.0%}",
                    "ci_resamples": len(jack.gen) + len(jack.ref)}
            if self.anchor is not None:
                d_lo, d_hi = (jack - self.anchor.jacks[metric]).interval(self.level)
                cols.update(diff_low=d_lo, diff_high=d_hi, ci_reference=self.anchor.label)
            columns[metric] = cols
        if self.boot is not None and self.boot.anchor is not None:
            boot = self.boot.columns(features)
            columns["fid"] = {k: boot[k] for k in ("diff_low", "diff_high", "ci_reference", "ci_method",
                                                  "ci_resamples")}
        return values, columns
