"""Image files <-> float arrays in [0, 1]."""

from __future__ import annotations

import os

import numpy as np


def save_pngs(images: np.ndarray, out_dir: str, prefix: str = "image") -> list[str]:
    """Writes [B, H, W, 3] floats in [0, 1] as `out_dir/{prefix}_{i:03d}.png`; returns the paths."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, image in enumerate(np.asarray(images)):
        path = os.path.join(out_dir, f"{prefix}_{i:03d}.png")
        Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths
