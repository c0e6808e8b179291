"""Prompt adherence on the shapes grammar: random captions -> images -> the detector's verdict."""

from __future__ import annotations

import numpy as np

from jaxdiff.data import shapes
from jaxdiff.eval import detector


def held_out_captions(n: int, seed: int) -> list[str]:
    """`n` captions drawn from the spec's grammar with their own seed (not the data set's)."""
    rng = np.random.default_rng([seed, 7919])
    return [shapes.random_caption(rng) for _ in range(n)]


def batch_seed(seed: int, start: int) -> int:
    """The noise seed of the batch that starts at caption `start` of an evaluation seeded `seed`."""
    return seed * 1_000_003 + start


def evaluate(pipe, n: int = 200, seed: int = 0, batch_size: int = 16, **generate_kwargs):
    """(scores, captions, images): one image per caption, scored as `detector.score` does."""
    captions = held_out_captions(n, seed)
    images = np.concatenate([
        pipe.generate(captions[i:i + batch_size], seed=batch_seed(seed, i), **generate_kwargs)
        for i in range(0, n, batch_size)])
    return detector.score(images, captions), captions, images


def relation_sensitivity(pipe, n: int = 64, seed: int = 0, batch_size: int = 16,
                         threshold: float = 0.02, **generate_kwargs) -> dict:
    """Whether a model reads the relation at all: each two-object caption among `n` held-out ones is
    drawn twice from the same noise, as written and with the opposite relation ("above" <-> "below",
    left <-> right). A model that places objects by the relation changes the image; one that reads the
    caption as a bag of objects draws the same one.

    Returns {"changed": fraction of pairs whose mean |pixel difference| exceeds `threshold` (images in
    [0, 1]), "mean_difference": its mean over pairs, "n": pairs}.
    """
    captions, flipped = [], []
    for c in held_out_captions(n, seed):
        labels, relation = shapes.parse_caption(c)
        if relation is not None:
            captions.append(c)
            flipped.append(shapes.format_caption(labels, shapes.OPPOSITE_RELATION[relation]))
    if not captions:
        raise ValueError(f"no two-object caption among {n}; raise n")
    differences = []
    for i in range(0, len(captions), batch_size):
        a = pipe.generate(captions[i:i + batch_size], seed=batch_seed(seed, i), **generate_kwargs)
        b = pipe.generate(flipped[i:i + batch_size], seed=batch_seed(seed, i), **generate_kwargs)
        differences.extend(np.abs(np.asarray(a) - np.asarray(b)).mean(axis=(1, 2, 3)))
    differences = np.asarray(differences)
    return {"changed": float((differences > threshold).mean()),
            "mean_difference": float(differences.mean()), "n": len(differences)}


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
