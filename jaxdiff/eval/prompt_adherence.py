"""Prompt adherence on the shapes grammar: random captions -> images -> the detector's verdict."""

from __future__ import annotations

import numpy as np

from jaxdiff.data import shapes
from jaxdiff.eval import detector


def held_out_captions(n: int, seed: int) -> list[str]:
    """`n` captions drawn from the spec's grammar with their own seed (not the data set's)."""
    rng = np.random.default_rng([seed, 7919])
    return [shapes.random_caption(rng) for _ in range(n)]


def evaluate(pipe, n: int = 200, seed: int = 0, batch_size: int = 16, **generate_kwargs):
    """(scores, captions, images): one image per caption, scored as `detector.score` does."""
    captions = held_out_captions(n, seed)
    images = np.concatenate([
        pipe.generate(captions[i:i + batch_size], seed=seed * 1_000_003 + i, **generate_kwargs)
        for i in range(0, n, batch_size)])
    return detector.score(images, captions), captions, images


def format_scores(scores: dict) -> str:
    """One line per kind: overall first, then single objects, then each relation; then the count of
    failed images per reason (see `detector.FAILURES`)."""
    order = ["overall", "single"] + [r for r in shapes.RELATIONS if r in scores]
    lines = [f"{kind:>16}: {scores[kind]:.3f}" for kind in order if kind in scores]
    lines.append(f"{'n':>16}: {scores['n']}")
    failures = scores.get("failures", {})
    if failures:
        lines.append("failed images, by reason: " + ", ".join(f"{r} {k}" for r, k in failures.items()))
    return "\n".join(lines)
