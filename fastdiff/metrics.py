"""Sample-quality metrics: FID, KID and precision/recall through torch-fidelity, and sliced Wasserstein.

`compute_metrics` hands the generated samples and a `Reference` set to `torch_fidelity.calculate_metrics`
with one of the extractors of `fastdiff.features`. torch-fidelity caches the reference features and FID
statistics under `cache_dir()/fidelity`, named by data set, split, a checksum of the reference data and
the extractor id (which includes the checksum of its weights), so a changed reference or extractor never
reuses stale statistics.

FID (Heusel et al. 2017): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) on the features' Gaussian fits.
Sliced Wasserstein-2: sqrt(mean over unit directions u of W2^2(<a, u>, <b, u>)), the 1-D W2 computed exactly
between the empirical measures; the directions are drawn from a fixed seed so every row uses the same ones.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, get_args

import numpy as np
import torch
import torch_fidelity

from fastdiff.errors import FastdiffError
from fastdiff.features import Extractor, resolve_extractor, slug, to_extractor_input
from fastdiff.io import cache_dir

log = logging.getLogger(__name__)

Metric = Literal["fid", "kid", "prc", "swd"]  # the choices, once: configs use it
METRICS: tuple[str, ...] = get_args(Metric)
# torch-fidelity result key -> our metric name
FIDELITY_KEYS = {
    torch_fidelity.KEY_METRIC_FID: "fid",
    torch_fidelity.KEY_METRIC_KID_MEAN: "kid",
    torch_fidelity.KEY_METRIC_KID_STD: "kid_std",
    torch_fidelity.KEY_METRIC_PRECISION: "precision",
    torch_fidelity.KEY_METRIC_RECALL: "recall",
}
SWD_PROJECTIONS, SWD_SEED = 256, 0
KID_SUBSETS, KID_SUBSET_SIZE, PRC_BATCH = 100, 1000, 1000


class _Samples(torch.utils.data.Dataset):
    """The tensor-per-item Dataset torch-fidelity takes as input (TensorDataset yields tuples)."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


@dataclass(frozen=True)
class Reference:
    """The real samples every row is compared with: `x` (N, ...) in data scale, and a name for the cache."""

    x: torch.Tensor
    name: str

    @cached_property
    def inputs(self) -> torch.Tensor:
        """The reference as the extractors see it: uint8 images or float points."""
        return to_extractor_input(self.x).contiguous()

    @cached_property
    def digest(self) -> str:
        """sha256 prefix of `inputs`: the reference's identity in the statistics cache."""
        return hashlib.sha256(self.inputs.numpy().tobytes()).hexdigest()[:12]

    def cache_name(self, extractor: Extractor) -> str:
        return f"fastdiff-{slug(self.name)}-{self.digest}-{extractor.id}"


def load_reference(dataset: str, split: str = "train", n: int = 0, data_root: str = "", seed: int = 0) -> Reference:
    """The first `n` (all if 0) examples of `dataset`'s `split` (split seed `seed`) as a Reference."""
    from fastdiff.data import get_data

    x = get_data(dataset, split, data_root, seed=seed).x
    if n:
        x = x[:n]
    return Reference(x, f"{dataset}-{split}-n{len(x)}")


def compute_metrics(samples: torch.Tensor, reference: Reference, extractor: Extractor, metrics=("fid",), *,
                    device="cpu", batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """(N, ...) generated samples in data scale vs `reference` -> {"fid": .., "kid": .., "kid_std": ..,
    "precision": .., "recall": .., "swd": ..} for the requested `metrics` (names in METRICS)."""
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise FastdiffError(f"unknown metric(s) {sorted(unknown)}; choose from {', '.join(METRICS)}")
    out: dict[str, float] = {}
    wanted = {m: m in metrics for m in ("fid", "kid", "prc")}
    if any(wanted.values()):
        n = min(len(samples), len(reference.x))
        result = torch_fidelity.calculate_metrics(
            input1=_Samples(to_extractor_input(samples)), input2=_Samples(reference.inputs),
            input2_cache_name=reference.cache_name(extractor), cache_root=str(cache_dir() / "fidelity"),
            feature_extractor=extractor.fidelity_name, feature_extractor_weights_path=extractor.weights_path,
            cuda=torch.device(device).type == "cuda", batch_size=batch_size, verbose=False, save_cpu_ram=True,
            rng_seed=seed, kid_subsets=KID_SUBSETS, kid_subset_size=min(KID_SUBSET_SIZE, n), prc_batch_size=PRC_BATCH,
            **wanted)
        out.update({FIDELITY_KEYS[k]: float(v) for k, v in result.items() if k in FIDELITY_KEYS})
    if "swd" in metrics:
        out["swd"] = sliced_wasserstein(samples.flatten(1).double().numpy(), reference.x.flatten(1).double().numpy())
    return out


def _quantiles_w2(a: np.ndarray, b: np.ndarray) -> float:
    """Exact W2^2 between the 1-D empirical measures of sorted a (n,) and sorted b (m,)."""
    n, m = len(a), len(b)
    # Both quantile functions are constant between the merged breakpoints k/n and k/m.
    u = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    du = np.diff(u, prepend=0.0)
    mid = u - du / 2
    ia = np.minimum((mid * n).astype(np.int64), n - 1)
    ib = np.minimum((mid * m).astype(np.int64), m - 1)
    return float(np.sum(du * (a[ia] - b[ib]) ** 2))


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, n_projections: int = SWD_PROJECTIONS,
                       seed: int = SWD_SEED) -> float:
    """(n, D), (m, D) -> sliced Wasserstein-2 distance over `n_projections` fixed random unit directions."""
    dirs = np.random.default_rng(seed).standard_normal((n_projections, a.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    pa, pb = np.sort(a @ dirs.T, axis=0), np.sort(b @ dirs.T, axis=0)
    return float(np.sqrt(np.mean([_quantiles_w2(pa[:, k], pb[:, k]) for k in range(n_projections)])))


def round_scorer(dataset: str, data_shape: tuple[int, ...], *, data_root: str = "", seed: int = 0, device="cpu",
                 inception_weights: str = ""):
    """-> (metric name, score(samples) -> FID): FID of (N, *data_shape) samples against `dataset`'s reference split
    (fastdiff.data.reference_split: the held-out test split, CIFAR-10's train split; split seed `seed`, from
    `data_root`) with the data set's default extractor, computed on `device`; the extractor and the reference are
    resolved once. The per-round score of distillation."""
    from fastdiff.data import reference_split

    extractor = resolve_extractor("auto", dataset, tuple(data_shape), inception_weights=inception_weights,
                                  data_root=data_root)
    reference = load_reference(dataset, reference_split(dataset), data_root=data_root, seed=seed)

    def score(samples: torch.Tensor) -> float:
        return compute_metrics(samples.cpu(), reference, extractor, ("fid",), device=device, seed=seed)["fid"]

    return f"fid-{extractor.kind}", score


def quick_score(samples: torch.Tensor, dataset: str, *, data_root: str = "", seed: int = 0, device="cpu",
                inception_weights: str = "") -> tuple[str, float]:
    """(N, ...) samples -> (metric name, value): `round_scorer` for one set of samples."""
    name, score = round_scorer(dataset, tuple(samples.shape[1:]), data_root=data_root, seed=seed, device=device,
                               inception_weights=inception_weights)
    return name, score(samples)


def class_accuracy(samples: torch.Tensor, y: torch.Tensor, dataset: str) -> float:
    """How often the project's classifier assigns each sample the class it was asked for."""
    from fastdiff.data import from_uint8
    from fastdiff.features import classifier_weights, load_classifier

    net = load_classifier(classifier_weights(dataset)[0])
    with torch.no_grad():
        x = from_uint8(to_extractor_input(samples.cpu()))  # quantized to uint8 like every scored sample
        pred = net(x)[1].argmax(1)
    return float((pred == y.cpu()).float().mean())
