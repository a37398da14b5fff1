"""Data sets, all returned as in-memory tensors scaled to [-1, 1].

- ``toy2d`` (or ``toy2d:8gaussians`` / ``toy2d:moons`` / ``toy2d:swissroll``): generated 2-D points, (N, 2).
- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, no download), (N, 1, 8, 8), labels 0..9;
  train/test split fixed by `seed` (80/20). The offline default.
- ``cifar10``: torchvision's CIFAR-10 loader from a local `root` (never downloads), (N, 3, 32, 32).
- ``folder``: every image under `root` (png/jpg/jpeg/bmp/webp), center-cropped and resized to `image_size`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdiff.errors import FastdiffError

DATASETS = ("toy2d", "digits", "cifar10", "folder")
TOY2D_KINDS = ("8gaussians", "moons", "swissroll")
TOY2D_SIZES = {"train": 20000, "test": 5000}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class DataBundle:
    """x: (N, C, H, W) images or (N, 2) points in [-1, 1]-ish scale; y: (N,) labels or None."""

    name: str
    x: torch.Tensor
    y: torch.Tensor | None
    num_classes: int

    @property
    def is_image(self) -> bool:
        return self.x.ndim == 4

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(self.x.shape[1:])


def static_info(name: str, image_size: int = 32) -> tuple[tuple[int, ...], int]:
    """(shape of one example, number of classes) of data set `name`, without loading it."""
    base, _, variant = name.partition(":")
    if base == "toy2d":
        return (2,), {"8gaussians": 8, "moons": 2}.get(variant or "8gaussians", 0)
    if base == "digits":
        return (1, 8, 8), 10
    if base == "cifar10":
        return (3, 32, 32), 10
    if base == "folder":
        return (3, image_size, image_size), 0
    raise FastdiffError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)} "
                        f"(toy2d:{'|'.join(TOY2D_KINDS)})")


def reference_split(name: str, split: str = "auto") -> str:
    """The split a sweep scores against: `split` unless "auto", which is the held-out test split (nothing trained —
    teacher, students, the digits feature classifier — has seen it), except for CIFAR-10, which keeps the papers'
    convention (Inception features, 50k samples against the training set), and an image folder, which has no
    held-out split."""
    if split != "auto":
        return split
    return "train" if name.partition(":")[0] in ("cifar10", "folder") else "test"


def data_seed(cfg) -> int:
    """The seed of the train/test split of a TrainConfig (or its dict, as a checkpoint stores it): split_seed, or
    (-1, and checkpoints before fastdiff 0.4) seed."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    split = get("split_seed", -1)
    return int(get("seed", 0)) if split is None or int(split) < 0 else int(split)


def get_data(name: str, split: str = "train", root: str = "", seed: int = 0, image_size: int = 32) -> DataBundle:
    """Load data set `name` ('toy2d[:kind]', 'digits', 'cifar10', 'folder') and `split` ('train'/'test')."""
    if split not in ("train", "test"):
        raise FastdiffError(f"unknown split {split!r}; use 'train' or 'test'")
    base, _, variant = name.partition(":")
    if base == "toy2d":
        return _toy2d(variant or "8gaussians", split, seed, name)
    if variant:
        raise FastdiffError(f"data set {base!r} has no variants (got {name!r})")
    if base == "digits":
        return _digits(split, seed)
    if base == "cifar10":
        return _cifar10(split, root)
    if base == "folder":
        return _folder(root, image_size)
    raise FastdiffError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)} "
                        f"(toy2d:{'|'.join(TOY2D_KINDS)})")


def _toy2d(kind: str, split: str, seed: int, name: str) -> DataBundle:
    if kind not in TOY2D_KINDS:
        raise FastdiffError(f"unknown toy2d kind {kind!r}; choose one of {', '.join(TOY2D_KINDS)}")
    # Distinct, fixed streams for train and test so the test points are never training points.
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    n = TOY2D_SIZES[split]
    if kind == "8gaussians":
        centers = np.array([(math.cos(a), math.sin(a)) for a in np.arange(8) * math.pi / 4])
        labels = rng.integers(0, 8, n)
        x = centers[labels] * 1.5 + 0.1 * rng.standard_normal((n, 2))
        return DataBundle(name, torch.from_numpy(x).float(), torch.from_numpy(labels).long(), 8)
    if kind == "moons":
        labels = rng.integers(0, 2, n)
        a = rng.uniform(0, math.pi, n)
        x = np.where(labels[:, None] == 0, np.stack([np.cos(a), np.sin(a)], 1),
                     np.stack([1 - np.cos(a), 0.5 - np.sin(a)], 1))
        x = (x - [0.5, 0.25]) * 1.2 + 0.05 * rng.standard_normal((n, 2))
        return DataBundle(name, torch.from_numpy(x).float(), torch.from_numpy(labels).long(), 2)
    a = 1.5 * math.pi * (1 + 2 * rng.uniform(0, 1, n))
    x = np.stack([a * np.cos(a), a * np.sin(a)], 1) / 10 + 0.05 * rng.standard_normal((n, 2))
    return DataBundle(name, torch.from_numpy(x).float(), None, 0)


def _digits(split: str, seed: int) -> DataBundle:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images).float().unsqueeze(1) / 16.0 * 2.0 - 1.0  # pixel values 0..16
    y = torch.from_numpy(data.target).long()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(x))
    idx = perm[:n_train] if split == "train" else perm[n_train:]
    return DataBundle("digits", x[idx], y[idx], 10)


def _cifar10(split: str, root: str) -> DataBundle:
    import torchvision

    howto = ("download CIFAR-10 on a machine with internet (python -c \"import torchvision; "
             "torchvision.datasets.CIFAR10('DIR', download=True)\") and pass --data-root DIR "
             "(the folder that holds cifar-10-batches-py)")
    if not root:
        raise FastdiffError(f"cifar10 needs a local copy: {howto}")
    try:
        ds = torchvision.datasets.CIFAR10(root, train=split == "train", download=False)
    except RuntimeError as err:
        raise FastdiffError(f"CIFAR-10 not found or corrupt under {root!r} ({err}); {howto}") from None
    x = from_uint8(torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2))
    return DataBundle("cifar10", x, torch.as_tensor(ds.targets).long(), 10)


def _folder(root: str, image_size: int) -> DataBundle:
    from PIL import Image

    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if root else []
    if not files:
        raise FastdiffError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under --data-root {root!r}")
    out = []
    for p in files:
        try:
            img = Image.open(p).convert("RGB")
        except OSError as err:  # PIL's UnidentifiedImageError for a corrupt or mislabelled file is an OSError
            raise FastdiffError(f"cannot read image {str(p)!r} ({err}); remove it from --data-root") from None
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((image_size, image_size), Image.BICUBIC)
        out.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))  # a copy: PIL's buffer is read-only
    x = from_uint8(torch.stack(out))
    return DataBundle("folder", x, None, 0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] -> uint8 in [0, 255] (rounded in float32, as a PNG of them would be)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1]: the data scale of every model here."""
    return x.float() / 127.5 - 1.0
