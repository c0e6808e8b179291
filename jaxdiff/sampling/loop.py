"""The one sampling loop: `denoiser` turns a discrete eps / v model into x0 in sigma space once, and
`run` scans any sampler of `samplers` over a schedule's sigmas with it."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxdiff.sampling import samplers

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def denoiser(model_fn: Callable, prediction_type: str) -> Callable:
    """model_fn(x_scaled, t) -> eps / v / x0 prediction  ==>  denoise_fn(x, sigma, t) -> x0.

    The model sees the VP sample x / sqrt(sigma^2 + 1) and the discrete (possibly fractional)
    timestep t, exactly what diffusers' `scale_model_input` hands the U-Net. Its output is cast to
    float32 so the sampler arithmetic stays float32 even for a bf16 model.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; "
                         f"expected one of {', '.join(PREDICTION_TYPES)}")

    def denoise_fn(x, sigma, t):
        sigma = jnp.asarray(sigma, jnp.float32)
        c_in = jax.lax.rsqrt(sigma ** 2 + 1)
        out = model_fn(x * c_in, t).astype(jnp.float32)
        if prediction_type == "epsilon":
            return x - sigma * out
        if prediction_type == "v_prediction":
            # x0 = alpha x_vp - sigma_vp v, with alpha = c_in and sigma_vp = sigma c_in.
            return x / (sigma ** 2 + 1) - (sigma * c_in) * out
        return out

    return denoise_fn


def run(denoise_fn: Callable, noise, sched, sampler: str, key=None) -> jax.Array:
    """Unit-variance noise [B, h, w, c] -> latents (diffusers' final `sample`), float32.

    One `lax.scan` over the steps of `sched` (a schedules.Schedule made for the same `sampler`).
    Stochastic samplers draw step i's noise as normal(fold_in(key, i), x.shape). jit-able with
    `sched` and `key` traced; `sampler` (and `denoise_fn`) static.
    """
    s = samplers.get(sampler)
    if s.stochastic and key is None:
        raise ValueError(f"sampler {sampler!r} is stochastic: pass a PRNG key")
    x = jnp.asarray(noise, jnp.float32)
    draw = (lambda i: jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)) \
        if s.stochastic else (lambda i: None)
    return _loop(denoise_fn, x, sched, s, draw, None)


def run_with_noise(denoise_fn: Callable, noise, sched, sampler: str, step_noise) -> jax.Array:
    """`run`, but step i uses step_noise[i] ([num_steps, *noise.shape]) as its fresh noise:
    replays another implementation's random draws (e.g. diffusers' torch Generator)."""
    s = samplers.get(sampler)
    x = jnp.asarray(noise, jnp.float32)
    return _loop(denoise_fn, x, sched, s, None, jnp.asarray(step_noise, jnp.float32))


def _loop(denoise_fn, x, sched, s: samplers.Sampler, draw, step_noise):
    sched = jax.tree.map(jnp.asarray, sched)  # a NumPy schedule (not jit-traced) is indexed by a tracer
    x = x * sched.init_noise_sigma

    def body(carry, xs):
        x, state = carry
        i, z = xs
        x, state = s.step(denoise_fn, x, i, sched, state, draw(i) if draw is not None else z)
        return (x, state), None

    n = sched.timesteps.shape[0]
    (x, _), _ = jax.lax.scan(body, (x, s.init(x)), (jnp.arange(n), step_noise))
    # Back to the VP sample diffusers returns (identity when the last sigma is 0).
    return x * jax.lax.rsqrt(1 + sched.sigmas[-1] ** 2)
