"""Sample pictures from numpy arrays (no torch): image grids and 2-D scatter plots."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) uint8 -> (H', W', C) uint8 grid with `nrow` images per row."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = \
            img.transpose(1, 2, 0)
    return grid


def draw_samples(ax, samples: np.ndarray, title: str = "") -> None:
    """Draw (N, C, H, W) uint8 images as a grid, or (N, 2) points as a scatter, on a matplotlib axis."""
    if samples.ndim == 4:
        grid = image_grid(samples)
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray" if grid.shape[-1] == 1 else None,
                  vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5)
        ax.set_aspect("equal")
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
    ax.set_title(title, fontsize=9)


def save_samples(samples: np.ndarray, path, title: str = "") -> None:
    """Write one PNG of `samples` (see draw_samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastdiff.io import atomic_path

    fig, ax = plt.subplots(figsize=(5, 5))
    draw_samples(ax, samples, title)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
