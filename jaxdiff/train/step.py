"""The pure training step: `train_step(state, batch, rng) -> (state, metrics)`.

Three objectives over one state shape:
- "unet": the diffusion objective of the seed: encode images with the frozen VAE, draw t and noise,
  noise the latents, predict the noise (epsilon) or v; optional min-SNR-gamma weighting; captions
  dropped to the empty prompt with some probability so that classifier-free guidance works.
- "vae": reconstruction (L1 + L2, optionally L1 on image gradients) plus a small KL term towards N(0, 1).
- "clip": CLIP's contrastive loss between the text encoder's pooled caption and a small image tower
  (`models/contrastive.py`), to pretrain the text encoder as SD's was pretrained. The negatives are the
  other rows of the batch (of each micro-batch, with `grad_accum_steps` > 1).

Params are one pipeline pytree ({"text_encoders", "unet", "vae"}, plus "contrastive" in mode "clip");
`TrainState.params` holds the trained parts and `TrainState.frozen` the rest, so the optimizer never
sees frozen weights.

Objectives return per-example values; the step takes their mean weighted by `batch["weights"]` (all
ones when absent). Padding rows get weight 0, which is how a global batch that does not divide over the
devices trains exactly like the unpadded batch. With `train.grad_accum_steps = k` the batch is cut into
k micro-batches (micro-batch j holds rows j, j + k, j + 2k, ..., so each device keeps its own rows) whose
gradients are summed in a `lax.scan`: one optimizer update, a k-th of the activation memory.

Randomness is per example: row i of the (padded) global batch draws its timestep, noise and caption
dropout from `fold_in(fold_in(rng, step), i)`. So neither the pad, nor the device count, nor the
micro-batching changes what a row sees, and all of them give the same update up to float summation order.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxdiff import components, sample
from jaxdiff.models.contrastive import ContrastiveHeads, contrastive_loss
from jaxdiff.sampling import schedules

# Which pipeline components each mode trains (the text encoders join by config).
TRAINED = {"unet": ("unet",), "vae": ("vae",), "clip": ("text_encoders", "contrastive")}


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict  # the trained components
    frozen: dict  # the other components
    opt_state: Any
    ema: dict  # exponential moving average of `params`

    def pipeline_params(self, use_ema: bool = True) -> dict:
        """The full pipeline params pytree, trained parts from the EMA (or the raw weights)."""
        return {**self.frozen, **(self.ema if use_ema else self.params)}


def trained_components(config) -> tuple[str, ...]:
    names = TRAINED.get(config.mode)
    if names is None:
        raise ValueError(f"unknown training mode {config.mode!r}; choose one of {', '.join(TRAINED)}")
    if config.mode == "unet" and config.train.train_text_encoder:
        names = names + ("text_encoders",)
    return names


OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("cosine", "constant")


class TrainingDiverged(ValueError):
    """The loss or the parameters of a run became non-finite (NaN or inf); nothing of that state was saved."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_config(config) -> None:
    """Raises a ValueError naming the first field of `config` a training run cannot use: a learning
    rate that is not a finite positive number, an unknown optimizer or schedule, a step count below 1,
    a decay outside [0, 1]... Called before anything is built, so a typo costs no start-up time; every
    mode shares it."""
    t = config.train

    def number(name, value, low=None, high=None, low_open=False, high_open=False, integer=False):
        what = "an integer" if integer else "a number"
        if not _is_number(value) or (integer and not isinstance(value, int)):
            raise ValueError(f"{name} must be {what}, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
        if high is not None and (value >= high if high_open else value > high):
            raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")

    def choice(name, value, choices):
        if value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")

    trained_components(config)  # names an unknown mode
    number("train.learning_rate", t.learning_rate, 0, low_open=True)
    choice("train.optimizer", t.optimizer, OPTIMIZERS)
    choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    number("train.steps", t.steps, 1, integer=True)
    number("train.warmup_steps", t.warmup_steps, 0, integer=True)
    number("train.batch_size", t.batch_size, 1, integer=True)
    number("train.grad_accum_steps", t.get("grad_accum_steps", 1), 1, integer=True)
    number("train.ema_decay", t.ema_decay, 0, 1)
    number("train.grad_clip", t.grad_clip, 0, low_open=True)
    number("train.weight_decay", t.weight_decay, 0)
    number("train.adam_b1", t.adam_b1, 0, 1, high_open=True)
    number("train.adam_b2", t.adam_b2, 0, 1, high_open=True)
    number("train.caption_dropout", t.get("caption_dropout", 0.0), 0, 1)
    number("train.min_snr_gamma", t.get("min_snr_gamma", 0.0), 0)
    choice("train.timestep_sampling", t.get("timestep_sampling", "uniform"), TIMESTEP_SAMPLINGS)
    number("train.timestep_logit_mean", t.get("timestep_logit_mean", 0.0))
    number("train.timestep_logit_std", t.get("timestep_logit_std", 1.0), 0, low_open=True)
    number("train.kl_weight", t.get("kl_weight", 0.0), 0)
    number("train.edge_weight", t.get("edge_weight", 0.0), 0)
    for s in t.get("redraw_strengths", ()):
        number("train.redraw_strengths", s, 0, 1)
    number("checkpoint.every", config.checkpoint.every, 1, integer=True)
    number("checkpoint.keep", config.checkpoint.keep, 1, integer=True)
    number("log_every", config.log_every, 1, integer=True)
    number("sample_every", config.sample_every, 0, integer=True)


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW (or SGD) with linear warm-up then cosine (or constant) decay, after global-norm clipping."""
    t = config.train
    if t.warmup_steps < 0:
        raise ValueError(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    if t.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown train.optimizer {t.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    # warmup_steps = 0: the full rate from the first step.
    if t.lr_schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, t.warmup_steps,
                                                max(t.steps, t.warmup_steps + 1), end_value=t.learning_rate * 0.1)
    elif t.lr_schedule == "constant":
        lr = optax.join_schedules([optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps),
                                   optax.constant_schedule(t.learning_rate)], [t.warmup_steps])
    else:
        raise ValueError(f"unknown train.lr_schedule {t.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    adam = optax.sgd(lr) if t.optimizer == "sgd" else optax.adamw(
        lr, b1=t.adam_b1, b2=t.adam_b2, weight_decay=t.weight_decay)
    optimizer = optax.chain(optax.clip_by_global_norm(t.grad_clip), adam)
    if t.get("frozen"):  # (.get: runs saved before the field existed restore too)
        # Updates of frozen subtrees are zeroed (weight decay included); they keep no moments.
        optimizer = optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()},
                                          lambda params: frozen_labels(params, tuple(t.frozen)))
    return optimizer


def frozen_labels(params: dict, prefixes: tuple[str, ...]) -> dict:
    """"frozen" for each leaf whose path ("vae/encoder/conv_in/kernel") starts with a prefix, else
    "trained"; a prefix that matches nothing is an error naming it (a typo would train everything)."""
    used = set()

    def label(path, _):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        hits = {p for p in prefixes if name == p or name.startswith(p.rstrip("/") + "/")}
        used.update(hits)
        return "frozen" if hits else "trained"

    labels = jax.tree_util.tree_map_with_path(label, params)
    if set(prefixes) - used:
        raise ValueError(f"train.frozen {sorted(set(prefixes) - used)} matches no trained parameter; "
                         f"paths look like 'vae/encoder' (top level: {sorted(params)})")
    return labels


def create_state(params: dict, config, optimizer) -> TrainState:
    names = trained_components(config)
    trained = {k: params[k] for k in names}
    return TrainState(step=jnp.zeros((), jnp.int32), params=trained,
                      frozen={k: v for k, v in params.items() if k not in names},
                      opt_state=optimizer.init(trained), ema=jax.tree.map(jnp.copy, trained))


def example_keys(rng, n: int) -> jax.Array:
    """One PRNG key per batch row: row i's randomness depends on nothing but `rng` and i."""
    return jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(n))


def _per_example(sampler, keys, *args):
    """`sampler(key, *args)` for each row's key, stacked: [B, ...]."""
    return jax.vmap(lambda k: sampler(k, *args))(keys)


TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def sample_timesteps(keys, t_cfg, num_train_timesteps: int) -> jax.Array:
    """One integer timestep in [0, num_train_timesteps) per row's key, drawn as `t_cfg` says.

    "logit_normal" is SD3's (Esser et al. 2024) t/T = sigmoid(N(mean, std)). Every timestep keeps some
    probability, so the optimum at each t is unchanged; only how much of the training it gets changes.
    """
    if t_cfg.timestep_sampling == "uniform":
        return _per_example(jax.random.randint, keys, (), 0, num_train_timesteps)
    if t_cfg.timestep_sampling == "logit_normal":
        z = t_cfg.timestep_logit_mean + t_cfg.timestep_logit_std * _per_example(jax.random.normal, keys, ())
        t = jnp.floor(jax.nn.sigmoid(z) * num_train_timesteps).astype(jnp.int32)
        return jnp.clip(t, 0, num_train_timesteps - 1)
    raise ValueError(f"unknown train.timestep_sampling {t_cfg.timestep_sampling!r}; "
                     f"choose one of {TIMESTEP_SAMPLINGS}")


def noised_and_target(latents, eps, alpha_cumprod, prediction_type: str):
    """(x_t, what the U-Net learns to predict from it) for clean `latents`, noise `eps` and the
    cumulative alpha of t (broadcastable to the latents)."""
    noisy = jnp.sqrt(alpha_cumprod) * latents + jnp.sqrt(1 - alpha_cumprod) * eps
    if prediction_type == "epsilon":
        return noisy, eps
    if prediction_type == "v_prediction":
        return noisy, jnp.sqrt(alpha_cumprod) * eps - jnp.sqrt(1 - alpha_cumprod) * latents
    raise ValueError(f"cannot train prediction_type {prediction_type!r}")


def diffusion_loss(models: components.Models, params: dict, batch: dict, keys, config, alphas_cumprod):
    """Per-example noise-prediction loss of the U-Net on VAE latents of `batch["images"]` (in [-1, 1]),
    or of `batch["posterior"]` (the VAE posterior's mean and std concatenated on channels, cached by
    `train.cache_latents`); `keys`: one PRNG key per row (`example_keys`)."""
    t_cfg = config.train
    k_lat, k_t, k_eps, k_drop = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, 4))(keys), 1, 0)
    if "posterior" in batch:
        mean, std = jnp.split(batch["posterior"], 2, axis=-1)
    else:
        mean, std = sample.posterior(models, params["vae"], batch["images"] / 2 + 0.5)
    mean, std = jax.lax.stop_gradient((mean, std))
    if t_cfg.sample_posterior:
        mean = mean + std * _per_example(jax.random.normal, k_lat, mean.shape[1:])
    latents = sample.scale_latents(models, mean)

    # Caption dropout: swap in the empty prompt so the same U-Net learns the unconditional model.
    drop = _per_example(jax.random.uniform, k_drop) < t_cfg.caption_dropout
    ids = tuple(jnp.where(drop[:, None], e, i) for i, e in zip(batch["ids"], batch["empty_ids"]))
    cond = sample.encode_prompt(models, params["text_encoders"], ids, batch.get("time_ids"))

    t = sample_timesteps(k_t, t_cfg, alphas_cumprod.shape[0])
    ac = alphas_cumprod[t][:, None, None, None]
    eps = _per_example(jax.random.normal, k_eps, latents.shape[1:])
    noisy, target = noised_and_target(latents, eps, ac, models.prediction_type)
    pred = sample.apply_unet(models, params["unet"], noisy, t.astype(jnp.float32), cond).astype(jnp.float32)
    loss = jnp.mean((pred - target) ** 2, axis=(1, 2, 3))
    if t_cfg.min_snr_gamma:
        # Min-SNR-gamma (Hang et al. 2023): cap the weight of easy, low-noise timesteps.
        snr = ac[:, 0, 0, 0] / (1 - ac[:, 0, 0, 0])
        clipped = jnp.minimum(snr, t_cfg.min_snr_gamma)
        # At zero terminal SNR the epsilon weight's limit is 1.
        weight = (jnp.where(snr > 0, clipped / jnp.maximum(snr, 1e-20), 1.0)
                  if models.prediction_type == "epsilon" else clipped / (snr + 1))
        loss = loss * weight
    return {"loss": loss}


def vae_loss(models: components.Models, params: dict, batch: dict, keys, config, redraw=None):
    """Per example: L1 + L2 reconstruction of images in [-1, 1], `edge_weight` x L1 of their spatial
    differences, and `kl_weight` x KL(q(z|x) || N(0, 1)). With `redraw` (`make_redraw`) the decoder
    reconstructs each image from the U-Net's redrawing of its latents instead of the latents.

    The edge term is there because L1/L2 alone are content to blur a sharp edge when the edge is a small
    part of the image: a small flat square comes back with rounded corners, i.e. as a circle.
    """
    images = batch["images"]
    mean, logvar = models.vae.apply({"params": params["vae"]}, images, method="encode")
    logvar = jnp.clip(logvar, -30.0, 20.0)
    z = mean + jnp.exp(0.5 * logvar) * _per_example(jax.random.normal, keys, mean.shape[1:])
    if redraw is not None:
        z = redraw(params, z, batch, jax.vmap(jax.random.fold_in, (0, None))(keys, 1))
    recon = models.vae.apply({"params": params["vae"]}, z, method="decode").astype(jnp.float32)
    per_pixel = lambda x: jnp.mean(x, axis=(1, 2, 3))
    l1 = per_pixel(jnp.abs(recon - images))
    l2 = per_pixel((recon - images) ** 2)
    edge = sum(per_pixel(jnp.abs(jnp.diff(recon, axis=a) - jnp.diff(images, axis=a))) for a in (1, 2))
    kl = 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    # `kl_weight` is relative to the reconstruction loss *summed* over an image's values, as in the LDM
    # paper and SD's VAE (1e-6); the terms above are means, so the KL is divided by that count. (Taken
    # against the means, 1e-6 caps the latents near 1.5 nats each and the decoder blurs colours together.)
    loss = l1 + l2 + config.train.edge_weight * edge + config.train.kl_weight * kl / images[0].size
    return {"loss": loss, "l1": l1, "l2": l2, "edge": edge, "kl": kl}


def make_redraw(models: components.Models, config) -> Callable | None:
    """`redraw(params, latents, batch, keys) -> latents`, or None when `train.redraw_strengths` is empty.

    Why: the U-Net's latents are not the encoder's. Redrawn from noise, and even from a real image's
    latents at img2img strength 0.2 (t = 200), the bundled U-Net gives squares back with softened,
    slightly turned edges that fill 0.86-0.9 of their box, where a circle fills 0.785; the decoder,
    trained on the encoder's latents only, draws them as it gets them. Trained on the U-Net's own
    redrawings of real images (img2img: noised to the tail of the sampling schedule, sampled back by
    the frozen U-Net), it learns to draw what the latents were meant to be, the sharp original. Each
    micro-batch takes one strength of `train.redraw_strengths` (0: the latents unchanged), drawn with
    its first row's key; the sampler, steps and guidance are the exported folder's
    (`export.defaults`), so the decoder learns the latents that sampling with them produces. Strengths
    up to about 0.5 keep what the objects are (the layout is decided at higher noise).
    """
    strengths = tuple(float(s) for s in config.train.get("redraw_strengths", ()))  # (older runs lack it)
    if not strengths:
        return None
    if config.mode != "vae":
        raise ValueError(f"train.redraw_strengths is for mode 'vae', not {config.mode!r}")
    defaults = config.export.defaults
    full = schedules.make_schedule(defaults["sampler"], config.model.scheduler.to_dict(), defaults["steps"])
    tails = [None if s == 0 else schedules.img2img_tail(full, s) for s in strengths]

    def redraw(params, latents, batch, keys):
        x = sample.scale_latents(models, latents)
        noise = _per_example(jax.random.normal, keys, x.shape[1:])
        cond = sample.encode_prompt(models, params["text_encoders"], batch["ids"], batch.get("time_ids"))
        uncond = sample.encode_prompt(models, params["text_encoders"], batch["empty_ids"], batch.get("time_ids"))

        def branch(tail):
            if tail is None:
                return lambda x: x
            return lambda x: sample.denoise(models, params["unet"], x + tail.sigmas[0] * noise, cond, uncond,
                                       defaults["guidance_scale"], tail, defaults["sampler"], keys[0])

        which = jax.random.randint(keys[0], (), 0, len(tails))
        redrawn = jax.lax.switch(which, [branch(t) for t in tails], x)
        return sample.unscale_latents(models, jax.lax.stop_gradient(redrawn))  # (no gradient through sampling)

    return redraw


def clip_loss(models: components.Models, heads: ContrastiveHeads, params: dict, batch: dict):
    """Per example: CLIP's symmetric contrastive loss of `batch["images"]` against their captions
    (the first text encoder's EOS state), the batch's other rows as negatives; `batch["weights"]` 0
    marks padding rows, which are nobody's negative."""
    pooled = models.text_encoders[0].apply({"params": params["text_encoders"][0]}, batch["ids"][0]).pooler_output
    images, texts, scale = heads.apply({"params": params["contrastive"]}, batch["images"], pooled)
    loss = contrastive_loss(images, texts, scale, batch["weights"] > 0)
    return {"loss": loss, "logit_scale": jnp.broadcast_to(scale, loss.shape)}


def make_objective(models: components.Models, config) -> Callable:
    """`objective(params, batch, keys) -> {"loss": [B], ...}`: the per-example loss of `config.mode`
    (`batch["weights"]` is 0 on padding rows)."""
    redraw = make_redraw(models, config)  # (raises for a mode other than "vae")
    if config.mode == "unet":
        ac = jnp.asarray(schedules.alphas_cumprod(config.model.scheduler.to_dict()))
        return lambda p, b, k: diffusion_loss(models, p, b, k, config, ac)
    if config.mode == "vae":
        return lambda p, b, k: vae_loss(models, p, b, k, config, redraw)
    if config.mode == "clip":
        heads = ContrastiveHeads.from_config(config.model.contrastive)
        return lambda p, b, k: clip_loss(models, heads, p, b)
    trained_components(config)  # raises, naming the mode


def make_train_step(models: components.Models, config, optimizer) -> Callable:
    """`train_step(state, batch, rng) -> (state, metrics)`, pure; jit it (donating the state)."""
    objective = make_objective(models, config)
    accum = config.train.grad_accum_steps

    def train_step(state: TrainState, batch: dict, rng):
        batch = dict(batch)
        n = jax.tree.leaves(batch)[0].shape[0]
        weights = batch.pop("weights", None)
        if weights is None:
            weights = jnp.ones(n, jnp.float32)
        total = jnp.sum(weights)
        keys = example_keys(jax.random.fold_in(rng, state.step), n)

        def sums_and_grads(micro):
            """Gradient of this micro-batch's share of the batch loss, and its weighted metric sums."""
            micro_batch, w, micro_keys = micro

            def loss_fn(trained):
                values = objective({**state.frozen, **trained}, {**micro_batch, "weights": w}, micro_keys)
                return jnp.sum(values["loss"] * w) / total, values
            (_, values), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            return {k: jnp.sum(v * w) for k, v in values.items()}, grads

        if accum == 1:
            sums, grads = sums_and_grads((batch, weights, keys))
        else:
            if n % accum:
                raise ValueError(f"a batch of {n} rows does not split into {accum} micro-batches")
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, accum, *x.shape[1:]), 0, 1),
                                 (batch, weights, keys))
            first = jax.tree.map(lambda x: x[0], micro)
            zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(sums_and_grads, first))
            add = lambda carry, m: (jax.tree.map(jnp.add, carry, sums_and_grads(m)), None)
            (sums, grads), _ = jax.lax.scan(add, zero, micro)
        metrics = {k: v / total for k, v in sums.items()}
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = config.train.ema_decay
        # e + (1 - d)(p - e), not d e + (1 - d) p: a weight that does not move keeps its EMA bit-exact.
        ema = jax.tree.map(lambda e, p: e + (1 - decay) * (p - e), state.ema, params)
        metrics = {**metrics, "grad_norm": optax.global_norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

    return train_step


def state_is_finite(state: TrainState, loss=None) -> jax.Array:
    """One boolean scalar: every floating-point value of `state` (params, EMA, optimizer moments) and
    `loss` (when given) is finite. Jit it; fetching the result is one small host transfer."""
    leaves = [x for x in jax.tree.leaves((state.params, state.ema, state.opt_state, loss))
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
