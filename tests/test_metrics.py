"""Metrics: FID through torch-fidelity against an independent Fréchet distance, the project's classifier and its
checksum cache, reference-statistics caching, sliced Wasserstein against closed forms, the Inception error path."""
from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch

from fastdiff import features as F
from fastdiff.data import get_data
from fastdiff.errors import FastdiffError
from fastdiff.metrics import Reference, compute_metrics, quick_score, sliced_wasserstein


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One FASTDIFF_CACHE for the whole session (the digits classifier trains once), never ~/.cache."""
    path = tmp_path_factory.getbasetemp() / "fastdiff-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTDIFF_CACHE", str(path))
        yield path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and immune to a busy machine's spinning OpenMP threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """Independent FID: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) with scipy's matrix square root."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_identity_fid_equals_scipy_frechet_and_self_is_zero(shared_cache):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(600, 6, generator=gen) @ torch.randn(6, 6, generator=gen) * 0.3 + 0.2
    b = torch.randn(800, 6, generator=gen) * 0.5
    ex = F.resolve_extractor("auto", "gauss", (6,))
    assert ex.kind == "identity"
    fid = compute_metrics(a, Reference(b, "b"), ex, ("fid",))["fid"]
    want = frechet(F.extract_features(a, ex).numpy(), F.extract_features(b, ex).numpy())
    assert fid == pytest.approx(want, rel=1e-6)
    assert abs(compute_metrics(a, Reference(a, "a"), ex, ("fid",))["fid"]) < 1e-8


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # dead ReLU units: the 64-d features span fewer dims
def test_classifier_features_fid_equals_scipy_and_weights_are_cached(shared_cache, monkeypatch):
    ex = F.resolve_extractor("auto", "digits", (1, 8, 8))
    assert ex.kind == "classifier" and ex.accuracy > 0.9
    assert (shared_cache / "classifier-digits.pt.sha256").is_file()
    test, train = get_data("digits", "test").x, get_data("digits", "train").x[:600]
    values = compute_metrics(test, Reference(train, "digits-train-600"), ex, ("fid", "prc"))
    f_test, f_train = F.extract_features(test, ex).numpy(), F.extract_features(train, ex).numpy()
    assert f_test.shape == (len(test), 2 * F.CLASSIFIER_WIDTH)
    assert values["fid"] == pytest.approx(frechet(f_test, f_train), rel=1e-6)
    assert set(values) == {"fid", "precision", "recall"}  # KID: see the CLI test (numpy BLAS, slow on a busy CPU)
    assert abs(compute_metrics(test, Reference(test, "digits-test"), ex, ("fid",))["fid"]) < 1e-6
    # The reference statistics are cached per (data set, split, data checksum, extractor weights).
    cached = list((shared_cache / "fidelity").glob(f"fastdiff-digits-train-600-*-{ex.id}-*stat-fid*"))
    assert len(cached) == 1
    # A matching checksum reuses the weights; a broken file is retrained.
    monkeypatch.setattr(F, "train_classifier", lambda *a, **k: pytest.fail("retrained despite a valid checksum"))
    assert F.resolve_extractor("classifier", "digits", (1, 8, 8)) == ex


def test_bad_classifier_checksum_means_retrain(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path))
    monkeypatch.setattr(F, "CLASSIFIER_EPOCHS", 1)
    first, _ = F.classifier_weights("digits")
    first.write_bytes(first.read_bytes() + b"x")
    calls = []
    real = F.train_classifier
    monkeypatch.setattr(F, "train_classifier", lambda *a, **k: calls.append(1) or real(*a, **k))
    path, accuracy = F.classifier_weights("digits")
    assert calls == [1] and 0 <= accuracy <= 1
    assert (tmp_path / "classifier-digits.pt.sha256").read_text().strip() == F.sha256_file(path)


def test_sliced_wasserstein_closed_forms():
    a = np.random.default_rng(0).standard_normal((300, 3))
    shift = np.array([0.5, -1.0, 2.0])
    # Shifting every point by c moves each 1-D projection by <c, u>: SW2^2 = mean_u <c, u>^2 exactly.
    dirs = np.random.default_rng(0).standard_normal((64, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    assert sliced_wasserstein(a, a + shift, 64) == pytest.approx(np.sqrt(np.mean((dirs @ shift) ** 2)), rel=1e-12)
    # Unequal sizes: a set repeated twice is the same empirical measure.
    assert sliced_wasserstein(a, np.concatenate([a, a])) == pytest.approx(0.0, abs=1e-12)
    assert sliced_wasserstein(a, a[:1]) > 0.5


def test_quick_score_toy2d(shared_cache):
    x = get_data("toy2d", "test").x[:500]
    name, value = quick_score(x, "toy2d")
    assert name == "fid-identity" and 0 <= value < 0.05


def test_inception_without_weights_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def offline(url, path):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(F, "download", offline)
    with pytest.raises(FastdiffError, match="not available offline.*--inception-weights"):
        F.resolve_extractor("auto", "cifar10", (3, 32, 32))
    with pytest.raises(FastdiffError, match="does not exist"):
        F.resolve_extractor("inception", "cifar10", (3, 32, 32), inception_weights=str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    torch.save({"something": torch.zeros(1)}, junk)
    with pytest.raises(FastdiffError, match="not torch-fidelity's Inception"):
        F.resolve_extractor("inception", "cifar10", (3, 32, 32), inception_weights=str(junk))
    with pytest.raises(FastdiffError, match="needs RGB"):
        F.resolve_extractor("inception", "digits", (1, 8, 8))
