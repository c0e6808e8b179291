"""Image files <-> float arrays in [0, 1]."""

from __future__ import annotations

import os
import re

import numpy as np


def prepare_out_dir(out_dir: str) -> str:
    """Creates `out_dir` (and its parents) or raises a one-line error saying why it cannot be: run
    before a long generation, so that a bad path fails first, not after the work."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except FileExistsError:
        raise FileExistsError(f"cannot write images into {out_dir}: it exists and is not a folder") from None
    except OSError as e:
        raise OSError(f"cannot create the output folder {out_dir}: {e.strerror}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write images into {out_dir}: permission denied")
    return out_dir


def _next_index(out_dir: str, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"_(\d+)\.png$")
    taken = [int(m.group(1)) for m in map(pattern.match, os.listdir(out_dir)) if m]
    return max(taken, default=-1) + 1


def non_finite(images: np.ndarray) -> list[int]:
    """Indices of the images [B, H, W, 3] that hold NaN or infinite pixels."""
    return [i for i, image in enumerate(images) if not np.isfinite(image).all()]


def save_pngs(images: np.ndarray, out_dir: str, prefix: str = "image", overwrite: bool = False) -> list[str]:
    """Writes [B, H, W, 3] floats in [0, 1] as `out_dir/{prefix}_{i:03d}.png`; returns the paths.

    Existing files are kept: numbering goes on after the highest `{prefix}_N.png` already there
    (`overwrite=True` starts at 0 and replaces them). Non-finite pixels are refused, naming the
    images, before anything is written: a NaN image would otherwise be saved as a black one.
    """
    from PIL import Image

    images = np.asarray(images)
    bad = non_finite(images)
    if bad:
        raise ValueError(f"image(s) {', '.join(map(str, bad))} of {len(images)} hold NaN or infinite "
                         "pixels; nothing was written")
    prepare_out_dir(out_dir)
    start = 0 if overwrite else _next_index(out_dir, prefix)
    paths = []
    for i, image in enumerate(images, start=start):
        path = os.path.join(out_dir, f"{prefix}_{i:03d}.png")
        Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths
