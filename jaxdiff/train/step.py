"""The pure training step: `train_step(state, batch, rng) -> (state, metrics)`.

Two objectives over one state shape:
- "unet": the diffusion objective of the seed: encode images with the frozen VAE, draw t and noise,
  noise the latents, predict the noise (epsilon) or v; optional min-SNR-gamma weighting; captions
  dropped to the empty prompt with some probability so that classifier-free guidance works.
- "vae": reconstruction (L1 + L2) plus a small KL term towards N(0, 1).

Params are one pipeline pytree ({"text_encoders", "unet", "vae"}); `TrainState.params` holds the
trained parts and `TrainState.frozen` the rest, so the optimizer never sees frozen weights.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxdiff import pipeline as P
from jaxdiff.sampling import schedules

# Which pipeline components each mode trains (the text encoders join by config).
TRAINED = {"unet": ("unet",), "vae": ("vae",)}


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


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine (or constant) decay, after global-norm clipping."""
    t = config.train
    if t.lr_schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1),
                                                max(t.steps, t.warmup_steps + 1), end_value=t.learning_rate * 0.1)
    elif t.lr_schedule == "constant":
        lr = optax.join_schedules([optax.linear_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1)),
                                   optax.constant_schedule(t.learning_rate)], [max(t.warmup_steps, 1)])
    else:
        raise ValueError(f"unknown train.lr_schedule {t.lr_schedule!r}; choose cosine or constant")
    adam = optax.sgd(lr) if t.optimizer == "sgd" else optax.adamw(
        lr, b1=t.adam_b1, b2=t.adam_b2, weight_decay=t.weight_decay)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adam)


def create_state(params: dict, config, optimizer) -> TrainState:
    names = trained_components(config)
    trained = {k: params[k] for k in names}
    return TrainState(step=jnp.zeros((), jnp.int32), params=trained,
                      frozen={k: v for k, v in params.items() if k not in names},
                      opt_state=optimizer.init(trained), ema=jax.tree.map(jnp.copy, trained))


def diffusion_loss(models: P.Models, params: dict, batch: dict, rng, config, alphas_cumprod):
    """Noise-prediction loss of the U-Net on VAE latents of `batch["images"]` (in [-1, 1])."""
    t_cfg = config.train
    k_lat, k_t, k_eps, k_drop = jax.random.split(rng, 4)
    latents = P.encode_images(models, params["vae"], batch["images"] / 2 + 0.5,
                              key=k_lat if t_cfg.sample_posterior else None)
    latents = jax.lax.stop_gradient(latents)
    b = latents.shape[0]

    # Caption dropout: swap in the empty prompt so the same U-Net learns the unconditional model.
    drop = jax.random.uniform(k_drop, (b,)) < t_cfg.caption_dropout
    ids = tuple(jnp.where(drop[:, None], e, i) for i, e in zip(batch["ids"], batch["empty_ids"]))
    cond = P.encode_prompt(models, params["text_encoders"], ids, batch.get("time_ids"))

    t = jax.random.randint(k_t, (b,), 0, alphas_cumprod.shape[0])
    ac = alphas_cumprod[t][:, None, None, None]
    eps = jax.random.normal(k_eps, latents.shape)
    noisy = jnp.sqrt(ac) * latents + jnp.sqrt(1 - ac) * eps
    if models.prediction_type == "epsilon":
        target = eps
    elif models.prediction_type == "v_prediction":
        target = jnp.sqrt(ac) * eps - jnp.sqrt(1 - ac) * latents
    else:
        raise ValueError(f"cannot train prediction_type {models.prediction_type!r}")
    pred = P.apply_unet(models, params["unet"], noisy, t.astype(jnp.float32), cond).astype(jnp.float32)
    per_example = jnp.mean((pred - target) ** 2, axis=(1, 2, 3))
    if t_cfg.min_snr_gamma:
        # Min-SNR-gamma (Hang et al. 2023): cap the weight of easy, low-noise timesteps.
        snr = ac[:, 0, 0, 0] / (1 - ac[:, 0, 0, 0])
        clipped = jnp.minimum(snr, t_cfg.min_snr_gamma)
        # At zero terminal SNR the epsilon weight's limit is 1.
        weight = (jnp.where(snr > 0, clipped / jnp.maximum(snr, 1e-20), 1.0)
                  if models.prediction_type == "epsilon" else clipped / (snr + 1))
        per_example = per_example * weight
    loss = jnp.mean(per_example)
    return loss, {"loss": loss}


def vae_loss(models: P.Models, params: dict, batch: dict, rng, config):
    """L1 + L2 reconstruction of images in [-1, 1] plus `kl_weight` x KL(q(z|x) || N(0, 1))."""
    images = batch["images"]
    mean, logvar = models.vae.apply({"params": params["vae"]}, images, method="encode")
    logvar = jnp.clip(logvar, -30.0, 20.0)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    recon = models.vae.apply({"params": params["vae"]}, z, method="decode").astype(jnp.float32)
    l1 = jnp.mean(jnp.abs(recon - images))
    l2 = jnp.mean((recon - images) ** 2)
    kl = 0.5 * jnp.mean(jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
    loss = l1 + l2 + config.train.kl_weight * kl
    return loss, {"loss": loss, "l1": l1, "l2": l2, "kl": kl}


def make_train_step(models: P.Models, config, optimizer) -> Callable:
    """`train_step(state, batch, rng) -> (state, metrics)`, pure; jit it (donating the state)."""
    if config.mode == "unet":
        ac = jnp.asarray(schedules.alphas_cumprod(config.model.scheduler.to_dict()))
        objective = lambda p, b, r: diffusion_loss(models, p, b, r, config, ac)
    elif config.mode == "vae":
        objective = lambda p, b, r: vae_loss(models, p, b, r, config)
    else:
        trained_components(config)  # raises, naming the mode

    def train_step(state: TrainState, batch: dict, rng):
        rng = jax.random.fold_in(rng, state.step)

        def loss_fn(trained):
            return objective({**state.frozen, **trained}, batch, rng)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = config.train.ema_decay
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema, params)
        metrics = {**metrics, "grad_norm": optax.global_norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

    return train_step
