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


def check_counts(n, batch_size) -> None:
    """A clear error for a count of images or a batch size that is not a positive int."""
    for name, value in (("n", n), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def evaluate(pipe, n: int = 200, seed: int = 0, batch_size: int = 16, **generate_kwargs):
    """(scores, captions, images): one image per caption, scored as `detector.score` does."""
    check_counts(n, batch_size)
    captions = held_out_captions(n, seed)
    images = np.concatenate([
        pipe.generate(captions[i:i + batch_size], seed=batch_seed(seed, i), **generate_kwargs)
        for i in range(0, n, batch_size)])
    return detector.score(images, captions), captions, images


def vae_roundtrip(pipe, n: int = 512, batch_size: int = 64) -> dict:
    """Scores, as `detector.score` gives them, of the pipeline's VAE reconstructions (posterior mean,
    decoded) of the first `n` images of the spec's validation split at the pipeline's size.

    The U-Net can only draw what the decoder can: this is the ceiling the VAE puts on adherence, per
    kind and per background and colour. No sampling and no text encoder are involved.
    """
    import jax

    from jaxdiff import sample

    check_counts(n, batch_size)
    height, width = pipe.default_size()
    if height != width:
        raise ValueError(f"the shapes data set is square; the pipeline's default size is {height}x{width}")
    samples = [shapes.sample(i, "validation", resolution=height) for i in range(n)]
    images = np.stack([image for image, _ in samples]).astype(np.float32) / 255.0
    round_trip = jax.jit(lambda params, x: sample.decode(pipe.models, params, sample.encode_images(pipe.models, params, x)))
    reconstructions = np.concatenate([np.asarray(round_trip(pipe.params["vae"], images[i:i + batch_size]))
                                      for i in range(0, n, batch_size)])
    return detector.score(reconstructions, [caption for _, caption in samples])


def relation_sensitivity(pipe, n: int = 64, seed: int = 0, batch_size: int = 16,
                         threshold: float = 0.02, **generate_kwargs) -> dict:
    """Whether a model reads the relation at all: each two-object caption among `n` held-out ones is
    drawn twice from the same noise, as written and with the opposite relation ("above" <-> "below",
    left <-> right). A model that places objects by the relation changes the image; one that reads the
    caption as a bag of objects draws the same one.

    Returns {"changed": fraction of pairs whose mean |pixel difference| exceeds `threshold` (images in
    [0, 1]), "mean_difference": its mean over pairs, "n": pairs}.
    """
    check_counts(n, batch_size)
    pairs = [(c, r) for c in held_out_captions(n, seed) if (r := shapes.reverse_relation(c))]
    captions, flipped = [c for c, _ in pairs], [r for _, r in pairs]
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


def relation_loss_gap(pipe, n: int = 256, seed: int = 0, timesteps=(999, 950, 900, 800, 700),
                      batch_size: int = 64) -> dict[int, tuple[float, float]]:
    """Whether a model's U-Net uses the relation, read from its training loss instead of from images:
    cheaper than `relation_sensitivity` and it needs no sampler, so it works on any checkpoint.

    The first `n` two-object images of the spec's validation split are noised to each of `timesteps`
    (the same noise for both captions) and denoised with each caption as written and with the opposite
    relation. Returns {t: (loss as written, loss with the opposite relation)}, the mean squared error
    of the U-Net's prediction (epsilon or v, as it was trained). Near t = T, where the layout is not
    yet in the noisy latents, a model that places objects by the relation has the lower loss with the
    true caption; for one that reads a bag of objects the two are equal.
    """
    import jax
    import jax.numpy as jnp

    from jaxdiff import sample, text
    from jaxdiff.sampling import schedules
    from jaxdiff.train import step

    check_counts(n, batch_size)
    models, params = pipe.models, pipe.params
    size = pipe.default_size()[0]
    images, captions, flipped = [], [], []
    index = 0
    while len(captions) < n:
        image, caption = shapes.sample(index, "validation", size)
        index += 1
        if reversed_caption := shapes.reverse_relation(caption):
            images.append(image)
            captions.append(caption)
            flipped.append(reversed_caption)
    alphas_cumprod = jnp.asarray(schedules.alphas_cumprod(pipe.configs.scheduler))
    for t in timesteps:
        if not 0 <= t < alphas_cumprod.shape[0]:
            raise ValueError(f"timestep {t} is outside [0, {alphas_cumprod.shape[0]})")

    @jax.jit
    def encode(images, ids, flipped_ids):
        """Clean latents and both captions' conditioning: once per batch, whatever the timesteps."""
        time_ids = (sample.micro_conditioning_ids(size, size, images.shape[0])
                    if models.family.micro_conditioning else None)
        return (sample.encode_images(models, params["vae"], images),
                tuple(sample.encode_prompt(models, params["text_encoders"], i, time_ids) for i in (ids, flipped_ids)))

    @jax.jit
    def losses(latents, conds, eps, t):
        noisy, target = step.noised_and_target(latents, eps, alphas_cumprod[t], models.prediction_type)
        ts = jnp.full((latents.shape[0],), t, jnp.float32)
        return tuple(jnp.sum(jnp.mean((sample.apply_unet(models, params["unet"], noisy, ts, cond) - target) ** 2,
                                      axis=(1, 2, 3)))
                     for cond in conds)

    tokenize = lambda cs: tuple(jnp.asarray(text.tokenize(tok, cs)) for tok in pipe.tokenizers)
    sums = {t: np.zeros(2) for t in timesteps}
    key = jax.random.key(seed)
    for i in range(0, n, batch_size):
        batch = jnp.asarray(np.stack(images[i:i + batch_size]) / 255.0, jnp.float32)  # [0, 1]
        latents, conds = encode(batch, tokenize(captions[i:i + batch_size]), tokenize(flipped[i:i + batch_size]))
        eps = jax.random.normal(jax.random.fold_in(key, i), latents.shape)
        for t in timesteps:
            sums[t] += np.asarray(losses(latents, conds, eps, t))
    return {t: (float(s[0] / n), float(s[1] / n)) for t, s in sums.items()}


def format_scores(scores: dict) -> str:
    """One line per kind: overall first, then single objects, then each relation; then the count of
    failed images per reason (see `detector.FAILURES`); then correct / images per background (rows) and
    named colour (columns)."""
    order = ["overall", "single"] + [r for r in shapes.RELATIONS if r in scores]
    lines = [f"{kind:>16}: {scores[kind]:.3f}" for kind in order if kind in scores]
    lines.append(f"{'n':>16}: {scores['n']}")
    failures = scores.get("failures", {})
    if failures:
        lines.append("failed images, by reason: " + ", ".join(f"{r} {k}" for r, k in failures.items()))
    table = scores.get("by_background", {})
    if table:
        lines.append("correct / images, by background and named colour:")
        lines.append(" " * 8 + "".join(f"{c:>9}" for c in shapes.COLOURS))
        for background, row in table.items():
            cells = (f"{row[c][0]}/{row[c][1]}" if c in row else "-" for c in shapes.COLOURS)
            lines.append(f"{background:>8}" + "".join(f"{cell:>9}" for cell in cells))
    return "\n".join(lines)
