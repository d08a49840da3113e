"""Attention figures: each generated word with its 8x8 attention over the image."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def plot_attention(image, words: list[str], alphas: np.ndarray, out_png: str | Path, title: str = "") -> Path:
    """``image``: HxWx3 uint8; ``alphas``: (len(words), 64). Writes a PNG grid, one panel per word."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = np.asarray(image)
    grid = int(math.isqrt(alphas.shape[-1]))
    cols = min(4, max(1, len(words)))
    rows = max(1, math.ceil(len(words) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.6 * rows + 0.4), squeeze=False)
    height, width = image.shape[:2]
    for ax in axes.flat:
        ax.axis("off")
    for ax, word, alpha in zip(axes.flat, words, alphas):
        ax.imshow(image)
        ax.imshow(alpha.reshape(grid, grid), cmap="inferno", alpha=0.55, extent=(0, width, height, 0),
                  interpolation="bilinear")
        ax.set_title(word, fontsize=11)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    from captioning.io import atomic_path

    out_png = Path(out_png)
    try:
        with atomic_path(out_png) as tmp:  # never through a symlink or onto a FIFO: a new file, renamed
            fig.savefig(tmp, dpi=80, format="png")
    finally:
        plt.close(fig)
    return out_png


def read_rgb(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
