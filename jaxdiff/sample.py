"""The pure functions of text-to-image, for research code to `jax.jit`, `jax.grad` or `jax.vmap`.

Each takes the static `components.Models` bundle first and params as arguments (never closed-over
constants), so a new prompt, seed or guidance scale is new data, not a new program:

    fn = jax.jit(functools.partial(sample.generate, models), static_argnames=("sampler", "guidance"))
    images = fn(params, inputs, sampler="euler", guidance=True)

`pipeline.Pipeline` prepares `GenerateInputs` on the host (tokens, noise, schedule) and calls this.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import text
from jaxdiff.components import Models
from jaxdiff.sampling import loop, schedules


class Conditioning(NamedTuple):
    """What the U-Net is conditioned on for one batch."""
    context: jax.Array  # [B, T, D] token embeddings for cross-attention
    pooled: jax.Array | None = None  # [B, P] SDXL pooled text embedding
    time_ids: jax.Array | None = None  # [B, 6] SDXL original size, crop corner, target size


class GenerateInputs(NamedTuple):
    """Everything `generate` traces: new values of the same shapes reuse the compiled function."""
    ids: tuple[jax.Array, ...]  # per text encoder, [B, 77] int32
    uncond_ids: tuple[jax.Array, ...]
    uncond_keep: jax.Array  # 1.0, or 0.0 to zero the negative embeddings (SDXL, no negative prompt)
    noise: jax.Array  # [B, h, w, C] unit variance
    schedule: schedules.Schedule
    guidance_scale: jax.Array
    guidance_rescale: jax.Array  # 0 = plain classifier-free guidance
    time_ids: jax.Array | None
    key: jax.Array  # for stochastic samplers


def encode_prompt(models: Models, text_params, ids, time_ids=None) -> Conditioning:
    """Token ids (one array per text encoder) -> the U-Net's conditioning."""
    context, pooled = text.encode(models.text_encoders, text_params, ids, models.family.conditioning)
    return Conditioning(context, pooled, time_ids)


def apply_unet(models: Models, unet_params, x, t, cond: Conditioning) -> jax.Array:
    """The U-Net's prediction for latents x [B, h, w, C] at timesteps t [B] under `cond`."""
    added = None if cond.pooled is None else {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    return models.unet.apply({"params": unet_params}, x, t, cond.context, added)


def micro_conditioning_ids(height: int, width: int, batch: int) -> np.ndarray:
    """SDXL's add_time_ids [B, 6]: original size, crop top-left (0, 0), target size, as diffusers'
    pipeline builds them with its defaults."""
    return np.tile(np.float32([height, width, 0, 0, height, width]), (batch, 1))


def _concat(a: Conditioning, b: Conditioning) -> Conditioning:
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


def guided_model(models: Models, unet_params, cond: Conditioning, uncond: Conditioning | None,
                 guidance_scale, guidance_rescale=0.0):
    """model_fn(x_in, t) -> eps or v, with classifier-free guidance when `uncond` is given.

    Guidance mixes the model outputs, as diffusers does; the uncond and cond halves go through the
    U-Net as one batch of 2B. `guidance_rescale` (Lin et al. 2024, sec. 3.4; diffusers'
    `rescale_noise_cfg`) blends the guided output with itself scaled back to the conditional output's
    standard deviation per image: large guidance scales inflate it, which on zero-terminal-SNR
    v-prediction models washes images out.
    """
    both = cond if uncond is None else _concat(uncond, cond)

    def model_fn(x_in, t):
        if uncond is not None:
            x_in = jnp.concatenate([x_in, x_in])
        ts = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_in.shape[0],))
        out = apply_unet(models, unet_params, x_in, ts, both)
        if uncond is None:
            return out
        out_uncond, out_cond = jnp.split(out.astype(jnp.float32), 2)
        guided = out_uncond + guidance_scale * (out_cond - out_uncond)
        axes = tuple(range(1, guided.ndim))
        rescaled = guided * (jnp.std(out_cond, axis=axes, keepdims=True)
                             / jnp.std(guided, axis=axes, keepdims=True))
        # where(), not the blend alone: at 0 a flat guided output (std 0) must not turn into NaN.
        return jnp.where(guidance_rescale > 0,
                         guidance_rescale * rescaled + (1 - guidance_rescale) * guided, guided)

    return model_fn


def denoise(models: Models, unet_params, noise, cond: Conditioning, uncond: Conditioning | None,
            guidance_scale, schedule: schedules.Schedule, sampler: str, key,
            guidance_rescale=0.0) -> jax.Array:
    """Unit noise [B, h, w, C] -> clean latents, by one `lax.scan` over the schedule. (With an
    `schedules.img2img_tail` schedule, `noise` is latents noised to the tail's first sigma.)"""
    model_fn = guided_model(models, unet_params, cond, uncond, guidance_scale, guidance_rescale)
    denoise_fn = loop.denoiser(model_fn, models.prediction_type)
    return loop.run(denoise_fn, noise, schedule, sampler, key)


def decode(models: Models, vae_params, latents) -> jax.Array:
    """Latents -> images [B, H, W, 3] in [0, 1]."""
    latents = unscale_latents(models, latents.astype(jnp.float32))
    images = models.vae.apply({"params": vae_params}, latents, method="decode")
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def posterior(models: Models, vae_params, images) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, 3] in [0, 1] -> (mean, std) of the VAE's posterior, unscaled latents."""
    mean, logvar = models.vae.apply({"params": vae_params}, images * 2 - 1, method="encode")
    return mean, jnp.exp(0.5 * jnp.clip(logvar, -30, 20))


def scale_latents(models: Models, latents) -> jax.Array:
    """VAE latents -> the scaled latents the U-Net works in (`decode` undoes this)."""
    if models.latents_mean is not None:
        return (latents - jnp.asarray(models.latents_mean)) * models.scaling_factor / jnp.asarray(
            models.latents_std)
    return (latents - (models.shift_factor or 0.0)) * models.scaling_factor


def unscale_latents(models: Models, latents) -> jax.Array:
    """The U-Net's scaled latents -> VAE latents (`scale_latents` undone)."""
    if models.latents_mean is not None:
        return latents * jnp.asarray(models.latents_std) / models.scaling_factor + jnp.asarray(
            models.latents_mean)
    return latents / models.scaling_factor + (models.shift_factor or 0.0)


def encode_images(models: Models, vae_params, images, noise=None) -> jax.Array:
    """Images [B, H, W, 3] in [0, 1] -> scaled latents: the posterior mean, or with `noise` (standard
    normal, the latents' shape) the posterior sample mean + std * noise."""
    mean, std = posterior(models, vae_params, images)
    return scale_latents(models, mean if noise is None else mean + std * noise)


def generate(models: Models, params, inputs: GenerateInputs, sampler: str, guidance: bool):
    """Token ids and noise -> images [B, H, W, 3] in [0, 1]: encode, denoise, decode."""
    cond = encode_prompt(models, params["text_encoders"], inputs.ids, inputs.time_ids)
    uncond = None
    if guidance:
        uncond = encode_prompt(models, params["text_encoders"], inputs.uncond_ids, inputs.time_ids)
        keep = inputs.uncond_keep
        uncond = uncond._replace(context=uncond.context * keep,
                                 pooled=None if uncond.pooled is None else uncond.pooled * keep)
    latents = denoise(models, params["unet"], inputs.noise, cond, uncond, inputs.guidance_scale,
                      inputs.schedule, sampler, inputs.key, inputs.guidance_rescale)
    return decode(models, params["vae"], latents)
