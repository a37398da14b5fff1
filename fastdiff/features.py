"""Feature extractors for the metrics, registered with torch-fidelity.

- ``identity`` (``fastdiff-identity``): the sample itself, flattened: (N, D) float64. The extractor for
  2-D toy data (and for Gaussian test data), where FID on the points is the exact Fréchet distance
  between the fitted Gaussians.
- ``classifier`` (``fastdiff-classifier``): the penultimate layer (64-d) of a small CNN trained by the
  project on the data set's own train split, for images Inception does not fit (8x8 digits). Its weights
  are cached in `cache_dir()` next to a ``.sha256`` file; a missing or mismatching checksum means retrain.
- ``inception``: torch-fidelity's own Inception-v3 (``inception-v3-compat``, pool3 2048-d), the standard
  for RGB images. Its weights come from ``--inception-weights PATH`` or torch.hub's cache (downloaded by
  torch-fidelity when online); offline without them is a FastdiffError. Its id carries the sha256 of the
  weights file, like the classifier's, so statistics and rows of one weights file never serve another.

Images reach every extractor as uint8 (N, C, H, W) in [0, 255], as samples saved to PNG would; points as
float. Our extractors return float64 so that torch-fidelity's statistics carry no float32 rounding.
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
import torch_fidelity
from torch import nn
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from fastdiff.data import from_uint8, get_data, to_uint8
from fastdiff.errors import FastdiffError
from fastdiff.io import atomic_path, cache_dir, sha256_file, write_text

log = logging.getLogger(__name__)

ExtractorName = Literal["auto", "identity", "classifier", "inception"]  # the choices, once: configs use it
EXTRACTORS: tuple[str, ...] = get_args(ExtractorName)
IDENTITY, CLASSIFIER, INCEPTION = "fastdiff-identity", "fastdiff-classifier", "inception-v3-compat"
INCEPTION_URL = torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3
CLASSIFIER_EPOCHS, CLASSIFIER_BATCH, CLASSIFIER_LR, CLASSIFIER_WIDTH = 20, 128, 5e-3, 32


def slug(text: str) -> str:
    """A file-name-safe version of `text` (torch-fidelity cache names must not hold path separators)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def to_extractor_input(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] -> uint8 in [0, 255]; (N, D) points pass through as float32."""
    return to_uint8(x) if x.ndim == 4 else x.float()


def _as_float_image(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]; float input passes through."""
    return from_uint8(x) if x.dtype == torch.uint8 else x.float()


class SmallCNN(nn.Module):
    """(B, C, H, W) in [-1, 1] -> ((B, 2*width) penultimate features, (B, num_classes) logits)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = CLASSIFIER_WIDTH):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        feats = self.body(x)
        return feats, self.head(feats)


class IdentityFeatures(torch_fidelity.FeatureExtractorBase):
    """torch-fidelity extractor: (B, ...) samples -> (B, D) float64, the flattened sample (uint8 -> [-1, 1])."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list():
        return ("identity",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "identity"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 2)

    def forward(self, x):
        return (_as_float_image(x).flatten(1).double(),)


def load_classifier(path) -> SmallCNN:
    """The project's classifier from a file written by `classifier_weights` (weights_only), in eval mode."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net = SmallCNN(**ckpt["arch"])
    net.load_state_dict(ckpt["state_dict"])
    return net.eval()


class ClassifierFeatures(torch_fidelity.FeatureExtractorBase):
    """torch-fidelity extractor: (B, C, H, W) uint8 -> ("features" (B, 64), "logits" (B, classes)) float64.

    The weights come from `feature_extractor_weights_path`, a file written by `classifier_weights`.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = load_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        feats, logits = self.net(_as_float_image(x))
        out = {"features": feats.double(), "logits": logits.double()}
        return tuple(out[name] for name in self.features_list)


for _name, _cls in ((IDENTITY, IdentityFeatures), (CLASSIFIER, ClassifierFeatures)):
    if _name not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(_name, _cls)


@dataclass(frozen=True)
class Extractor:
    """A resolved feature extractor: `kind` (identity/classifier/inception), its torch-fidelity registry
    name, its weights file (or None), `id` (recorded with every result; names the weights' checksum) and,
    for the classifier, its accuracy on the data set's test split."""

    kind: str
    fidelity_name: str
    weights_path: str | None
    id: str
    accuracy: float | None = None


def resolve_extractor(name: str, dataset: str, data_shape: tuple[int, ...], *, inception_weights: str = "",
                      data_root: str = "") -> Extractor:
    """Pick and prepare the extractor `name` ('auto' -> identity for points, classifier for 1-channel
    images, inception for RGB) for samples of `data_shape`; trains/loads the classifier, checks Inception."""
    if name not in EXTRACTORS:
        raise FastdiffError(f"unknown extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")
    is_image = len(data_shape) == 3
    if name == "auto":
        name = "identity" if not is_image else ("inception" if data_shape[0] == 3 else "classifier")
    if name == "identity":
        return Extractor("identity", IDENTITY, None, "identity")
    if not is_image:
        raise FastdiffError(f"extractor {name!r} needs images; use --extractor identity for {dataset!r} samples "
                            f"of shape {data_shape}")
    if name == "inception":
        if data_shape[0] != 3:
            raise FastdiffError(f"Inception-v3 needs RGB images, {dataset!r} has {data_shape[0]} channel(s); "
                                "use --extractor classifier")
        path = inception_weights_path(inception_weights)
        # The id names the weights' checksum: cached reference statistics and result rows of one weights file
        # are never reused for another.
        return Extractor("inception", INCEPTION, path, f"{INCEPTION}-{sha256_file(path)[:12]}")
    path, accuracy = classifier_weights(dataset, data_root)
    return Extractor("classifier", CLASSIFIER, str(path),
                     f"classifier-{slug(dataset)}-{sha256_file(path)[:12]}", accuracy)


def inception_weights_path(user_path: str) -> str:
    """The local Inception-v3 weights file: `user_path`, else torch.hub's cached copy, else download it
    (what torch-fidelity does when online). Offline without the file: FastdiffError."""
    if user_path:
        p = Path(user_path)
        if not p.is_file():
            raise FastdiffError(f"--inception-weights {user_path!r} does not exist; pass the file "
                                f"{Path(INCEPTION_URL).name} (from {INCEPTION_URL})")
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for corrupt files
            raise FastdiffError(f"--inception-weights {user_path!r} is not a readable state_dict "
                                f"({type(err).__name__}); download {INCEPTION_URL} again") from None
        if not isinstance(state, dict) or "fc.weight" not in state:
            raise FastdiffError(f"--inception-weights {user_path!r} is not torch-fidelity's Inception-v3 "
                                f"state_dict; use {INCEPTION_URL}")
        return str(p)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(INCEPTION_URL).name
    if not cached.is_file():
        log.info("downloading Inception-v3 weights to %s", cached)
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            download(INCEPTION_URL, cached)
        except Exception as err:  # urllib/socket/http errors: any failure here means "no weights"
            raise FastdiffError(f"Inception-v3 weights are not available offline ({type(err).__name__}); fetch "
                                f"{INCEPTION_URL} elsewhere and pass --inception-weights PATH") from None
    return str(cached)


def download(url: str, path: Path) -> None:
    """Fetch `url` into `path` (torch.hub's downloader writes a temporary file, then moves it)."""
    torch.hub.download_url_to_file(url, str(path), progress=False)


_ANNOUNCED: set[Path] = set()


def classifier_weights(dataset: str, data_root: str = "") -> tuple[Path, float]:
    """(weights file, test accuracy) of the project's classifier for `dataset`, trained if the cache holds
    no copy with a matching sha256 (data split seed 0, the classifier is independent of any teacher)."""
    path = cache_dir() / f"classifier-{slug(dataset)}.pt"
    checksum = path.with_name(path.name + ".sha256")
    if path.is_file() and checksum.is_file() and checksum.read_text().strip() == sha256_file(path):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if path not in _ANNOUNCED:  # once per process, not once per scored row
            _ANNOUNCED.add(path)
            log.info("feature classifier for %s: %s (test accuracy %.4f)", dataset, path, ckpt["test_accuracy"])
        return path, float(ckpt["test_accuracy"])
    if path.is_file():
        log.warning("feature classifier %s fails its sha256 check: retraining", path)
    ckpt = train_classifier(dataset, data_root)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    write_text(checksum, sha256_file(path) + "\n")
    return path, float(ckpt["test_accuracy"])


@contextmanager
def _one_thread():
    """Run torch ops on one CPU thread: these convolutions are too small to gain from more, and on a busy
    machine spinning OpenMP threads slow them down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_classifier(dataset: str, data_root: str = "", seed: int = 0) -> dict:
    """Train SmallCNN on `dataset`'s train split (uint8-quantized, as samples are scored); CPU, seconds for digits.

    Returns the checkpoint dict: state_dict, arch, test_accuracy, dataset.
    """
    train, test = get_data(dataset, "train", data_root, seed=0), get_data(dataset, "test", data_root, seed=0)
    if not train.is_image or train.num_classes < 2:
        raise FastdiffError(f"the feature classifier needs a labelled image data set; {dataset!r} is not one "
                            "(use --extractor identity or inception)")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    arch = {"in_channels": train.shape[0], "num_classes": train.num_classes}
    net = SmallCNN(**arch)
    opt = torch.optim.Adam(net.parameters(), lr=CLASSIFIER_LR)
    x = _as_float_image(to_extractor_input(train.x))
    steps = CLASSIFIER_EPOCHS * ((len(x) + CLASSIFIER_BATCH - 1) // CLASSIFIER_BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, CLASSIFIER_LR, total_steps=steps)
    net.train()
    with _one_thread():
        for _ in range(CLASSIFIER_EPOCHS):
            for idx in torch.randperm(len(x), generator=gen).split(CLASSIFIER_BATCH):
                loss = nn.functional.cross_entropy(net(x[idx])[1], train.y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    net.eval()
    with torch.no_grad():
        pred = net(_as_float_image(to_extractor_input(test.x)))[1].argmax(1)
    accuracy = float((pred == test.y).float().mean())
    log.info("trained the %s feature classifier: test accuracy %.4f", dataset, accuracy)
    return {"state_dict": net.state_dict(), "arch": arch, "test_accuracy": accuracy, "dataset": dataset}


def extract_features(x: torch.Tensor, extractor: Extractor, device="cpu", batch_size: int = 256) -> torch.Tensor:
    """(N, ...) samples in data scale -> (N, D) float64 features from `extractor`'s FID layer, on CPU."""
    cls = FEATURE_EXTRACTORS_REGISTRY[extractor.fidelity_name]
    layer = cls.get_default_feature_layer_for_metric("fid")
    net = cls(extractor.fidelity_name, [layer], feature_extractor_weights_path=extractor.weights_path).to(device)
    inp = to_extractor_input(x)
    with torch.no_grad():
        return torch.cat([net(b.to(device))[0].double().cpu() for b in inp.split(batch_size)])
