"""Distances between generated and reference feature sets, each with its delete-one (jackknife) values, so that a
row's interval and its paired difference to another row include the sampling variance of both sample sets.

- KID (Bińkowski et al. 2018, "Demystifying MMD GANs", eq. 3 and sec. 4): the unbiased estimator of the squared MMD
  with the cubic polynomial kernel k(x, y) = (x·y/d + 1)³ (torch-fidelity's and the paper's), on the *whole* samples
  — no subsets, so a 360-image reference serves as it is:
  MMD²_u = Σ_{i≠i'} k(x_i, x_i')/(n(n−1)) + Σ_{j≠j'} k(y_j, y_j')/(m(m−1)) − 2 Σ_{i,j} k(x_i, y_j)/(nm).
  Unbiased in both sample sizes (it can be < 0 when the two distributions are close).
- Precision and recall (Kynkäänniemi et al. 2019, sec. 3; torch-fidelity's `prc`, k = 3): the fraction of generated
  samples inside the reference manifold (the union of balls around each reference sample, radius its distance to its
  k-th nearest reference neighbour), and the fraction of reference samples inside the generated manifold.

Variance. KID: the two-sample jackknife (Arvesen 1969): delete one generated sample i → θ_(−i), one reference sample
j → θ_(−j); Var θ̂ ≈ (n−1)/n Σ_i (θ_(−i) − θ̄_gen)² + (m−1)/m Σ_j (θ_(−j) − θ̄_ref)², from closed forms (row sums of the
kernel matrices), not n + m re-evaluations — the reference's own sampling variance included. Precision and recall:
conditional on the reference set (see ManifoldReference). A *paired* difference of two rows scored against the same
reference, whose generated samples share their noise per index (fastdiff's sweeps), deletes the same i and j (or takes
the same subsets) in both rows: `Jack.__sub__`. The intervals are normal (estimate ± z·sd); their coverage is measured
by simulation (fastdiff.coverage, tests/test_distances.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

KNN = 3  # precision/recall neighbourhood (torch-fidelity's prc_neighborhood)
HALF_SAMPLES = 64  # half-samples of the generated set behind recall's variance


@dataclass(frozen=True)
class Jack:
    """A statistic with replicate values from which its variance is estimated: `est` θ̂; `gen` (over the generated
    samples) and `ref` (over the reference samples) hold delete-one values θ_(−i), θ_(−j), or subsample values; each
    side's variance is `scale` · Σ (v − v̄)², the scale being (k − 1)/k for delete-one values (the jackknife). An
    empty side contributes nothing (a statistic conditional on that sample set)."""

    est: float
    gen: np.ndarray
    ref: np.ndarray
    gen_scale: float | None = None
    ref_scale: float | None = None

    def __post_init__(self):
        for side in ("gen", "ref"):
            if getattr(self, f"{side}_scale") is None:  # delete-one values: the jackknife's (k - 1)/k
                k = len(getattr(self, side))
                object.__setattr__(self, f"{side}_scale", (k - 1) / k if k > 1 else 0.0)

    def __sub__(self, other: "Jack") -> "Jack":
        """The paired difference: the same generated index and the same reference sample deleted (or the same
        subsets taken) in both."""
        if (len(self.gen), len(self.ref), self.gen_scale, self.ref_scale) != (
                len(other.gen), len(other.ref), other.gen_scale, other.ref_scale):
            raise ValueError("a paired difference needs the same sample sizes and replicate scheme")
        return Jack(self.est - other.est, self.gen - other.gen, self.ref - other.ref, self.gen_scale, self.ref_scale)

    @staticmethod
    def _part(values: np.ndarray, scale: float) -> float:
        return float(scale * np.sum((values - values.mean()) ** 2)) if len(values) > 1 else 0.0

    @property
    def var_gen(self) -> float:
        """The part of the variance from the generated samples (shrinks as 1/n)."""
        return self._part(self.gen, self.gen_scale)

    @property
    def var_ref(self) -> float:
        """The part of the variance from the reference samples (shrinks as 1/m; 0 for a fixed reference)."""
        return self._part(self.ref, self.ref_scale)

    @property
    def sd(self) -> float:
        return float(np.sqrt(self.var_gen + self.var_ref))

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """The normal interval est ± z·sd."""
        z = NormalDist().inv_cdf((1 + level) / 2)
        return self.est - z * self.sd, self.est + z * self.sd


def _as64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


class KIDReference:
    """A reference feature set (m, d) for KID: its kernel matrix's off-diagonal row sums, computed once."""

    def __init__(self, features):
        self.y = _as64(features)
        m, self.d = self.y.shape
        if m < 3:
            raise ValueError("KID needs at least 3 reference samples")
        kyy = self.kernel(self.y, self.y)
        self.b = kyy.sum(1) - np.diag(kyy)  # (m,) Σ_{j'≠j} k(y_j, y_j')

    def kernel(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b.T / self.d + 1.0) ** 3

    def kid(self, features) -> Jack:
        """Unbiased KID of (n, d) generated features against this reference, with its delete-one values."""
        x = _as64(features)
        n, m = len(x), len(self.y)
        if n < 3:
            raise ValueError("KID needs at least 3 generated samples")
        kxx = self.kernel(x, x)
        kxy = self.kernel(x, self.y)
        a = kxx.sum(1) - np.diag(kxx)  # (n,) Σ_{i'≠i} k(x_i, x_i')
        c, e = kxy.sum(1), kxy.sum(0)  # (n,) and (m,) cross sums
        A, B, C = a.sum(), self.b.sum(), c.sum()
        est = A / (n * (n - 1)) + B / (m * (m - 1)) - 2 * C / (n * m)
        gen = (A - 2 * a) / ((n - 1) * (n - 2)) + B / (m * (m - 1)) - 2 * (C - c) / ((n - 1) * m)
        ref = A / (n * (n - 1)) + (B - 2 * self.b) / ((m - 1) * (m - 2)) - 2 * (C - e) / (n * (m - 1))
        return Jack(float(est), gen, ref)


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(p, q) Euclidean distances."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(sq, 0, None))


def _radii(dist: np.ndarray, k: int) -> np.ndarray:
    """(q,) each point's distance to its k-th nearest other point, from the (q, q) distances."""
    d = dist.copy()
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def _covered(d_pts: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(p,) whether each point lies in at least one ball of the manifold (d_pts (p, q): point-to-centre distances)."""
    return (d_pts <= radii[None, :]).any(1)


def half_samples(n: int, count: int = HALF_SAMPLES) -> np.ndarray:
    """(count, n // 2) index subsets without replacement, fixed by n alone: every row of a sweep takes the same
    ones (the pairing)."""
    rng = np.random.default_rng(n)
    return np.sort(np.stack([rng.choice(n, n // 2, replace=False) for _ in range(count)]), axis=1)


class ManifoldReference:
    """A reference feature set (m, d) for precision and recall: its k-NN balls, computed once. Both are conditional on
    this reference set (it is held fixed; its own sampling variance is not in their intervals).

    - precision: the mean over generated samples of "inside the reference manifold": its delete-one values over the
      generated samples give the exact variance of that mean, and a paired difference the exact variance of the
      per-index differences.
    - recall: the fraction of reference samples inside the generated manifold, whose balls depend on all generated
      samples jointly (a k-NN statistic: delete-one values over-state its variance ~2.5-fold here, and a
      with-replacement bootstrap collapses the radii). Its variance comes from half-samples without replacement of the
      generated indices (the manifold rebuilt from each), Var ≈ b/(n − b) · mean (θ_s − θ̄)² with b = n/2 — the
      delete-d jackknife with d = n/2 (Shao & Wu 1989), the same subsets for every row."""

    def __init__(self, features, k: int = KNN):
        self.y = _as64(features)
        self.k = k
        if len(self.y) <= k + 1:
            raise ValueError(f"precision/recall need more than {k + 1} reference samples")
        self.radii = _radii(_pairwise(self.y, self.y), k)

    def precision_recall(self, features) -> tuple[Jack, Jack]:
        """(precision, recall) of (n, d) generated features, each with its replicate values over the generated
        samples (see the class docstring)."""
        x = _as64(features)
        n = len(x)
        if n // 2 <= self.k + 1:
            raise ValueError(f"precision/recall need more than {2 * (self.k + 2)} generated samples")
        dxy = _pairwise(x, self.y)
        inside = _covered(dxy, self.radii)
        none = np.empty(0)
        precision = Jack(float(inside.mean()), (inside.sum() - inside) / (n - 1), none)
        dxx = _pairwise(x, x)
        subsets = half_samples(n)
        b = subsets.shape[1]
        halves = np.array([_covered(dxy[s].T, _radii(dxx[np.ix_(s, s)], self.k)).mean() for s in subsets])
        recall = Jack(float(_covered(dxy.T, _radii(dxx, self.k)).mean()), halves, none,
                      gen_scale=b / ((n - b) * len(subsets)))
        return precision, recall
