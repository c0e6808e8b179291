"""Samplers: one short pure step function each, over sigmas (k-diffusion's `sampling.py` view).

    step(denoise_fn, x, i, sched, state, noise) -> (x_next, state)

x is the sample in sigma space (x = x_vp * sqrt(1 + sigma^2)); `denoise_fn(x, sigma, t) -> x0`
(see loop.denoiser); i is the traced step index into `sched` (a schedules.Schedule); `state` is
the scan carry (multistep history; () for one-step samplers); `noise` is this step's fresh unit
normal, ignored by deterministic samplers (None is fine for them).

Each step reproduces the arithmetic of its diffusers counterpart (schedules.COUNTERPARTS) in sigma
space, in float32.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class Sampler(NamedTuple):
    step: Callable[..., tuple[jax.Array, Any]]  # (denoise_fn, x, i, sched, state, noise) -> (x, state)
    init: Callable[[jax.Array], Any]            # x -> initial state (the scan carry besides x)
    stochastic: bool                            # whether step consumes `noise`


def to_d(x, sigma, denoised):
    """Karras ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma (the model's eps in sigma space)."""
    return (x - denoised) / sigma


def _clip(x0, sched):
    return jnp.clip(x0, -sched.x0_clip, sched.x0_clip)


def _denoised(denoise_fn, x, i, sched):
    return _clip(denoise_fn(x, sched.sigmas[i], sched.timesteps[i]), sched)


def get_ancestral_step(sigma_from, sigma_to):
    """Split a step into a deterministic move to sigma_down plus fresh noise of std sigma_up (eta = 1)."""
    sigma_up = jnp.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2)
    # max(., 0): rounding must not turn sigma_down ~ 0 into a NaN.
    sigma_down = jnp.sqrt(jnp.maximum(sigma_to ** 2 - sigma_up ** 2, 0.0))
    return sigma_down, sigma_up


def _no_state(x):
    return ()


def euler_step(denoise_fn, x, i, sched, state, noise):
    """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 2 with s_churn = 0)."""
    sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
    d = to_d(x, sigma, _denoised(denoise_fn, x, i, sched))
    return x + d * (sigma_next - sigma), state


def euler_ancestral_step(denoise_fn, x, i, sched, state, noise):
    """Euler ancestral (k-diffusion sample_euler_ancestral, eta = 1)."""
    sigma = sched.sigmas[i]
    sigma_down, sigma_up = get_ancestral_step(sigma, sched.sigmas[i + 1])
    d = to_d(x, sigma, _denoised(denoise_fn, x, i, sched))
    return x + d * (sigma_down - sigma) + noise * sigma_up, state


def heun_step(denoise_fn, x, i, sched, state, noise):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1, s_churn = 0); Euler when sigma_next = 0."""
    sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
    d = to_d(x, sigma, _denoised(denoise_fn, x, i, sched))
    dt = sigma_next - sigma
    x_euler = x + d * dt

    def correct(_):
        # The corrector evaluates the model at the next step's (sigma, timestep).
        t_next = sched.timesteps[jnp.minimum(i + 1, sched.timesteps.shape[0] - 1)]
        x0 = _clip(denoise_fn(x_euler, sigma_next, t_next), sched)
        return x + (d + to_d(x_euler, sigma_next, x0)) / 2 * dt

    # A real branch, not a select: the last step costs one model evaluation, not two.
    return jax.lax.cond(sigma_next == 0, lambda _: x_euler, correct, None), state


def ddim_step(denoise_fn, x, i, sched, state, noise):
    """DDIM with eta = 0 (Song et al. 2021), which is Euler in sigma space: x0 + sigma_to * eps."""
    sigma, sigma_to, sigma_next = sched.sigmas[i], sched.sigmas_next[i], sched.sigmas[i + 1]
    x0 = denoise_fn(x, sigma, sched.timesteps[i])
    eps = to_d(x, sigma, x0)  # diffusers keeps the unclipped eps (use_clipped_model_output=False)
    # x0 + sigma_to * eps rather than x + (sigma_to - sigma) * eps: no cancellation at huge sigma.
    x = _clip(x0, sched) + sigma_to * eps
    # diffusers' next step reads this VP sample as if at sigmas[i + 1] (ratio is exactly 1 when equal).
    return x * jnp.sqrt((1 + sigma_next ** 2) / (1 + sigma_to ** 2)), state


def ddpm_step(denoise_fn, x, i, sched, state, noise):
    """DDPM ancestral step (Ho et al. 2020, fixed_small variance), which in sigma space is Euler
    ancestral: mean x0 + (s'/s)^2 (x - x0), noise std s' sqrt(1 - (s'/s)^2) for s -> s'."""
    sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
    x0 = _denoised(denoise_fn, x, i, sched)
    ratio = (sigma_next / sigma) ** 2
    return x0 + ratio * (x - x0) + noise * sigma_next * jnp.sqrt(1 - ratio), state


def _init_plms_history(x):
    return (jnp.zeros_like(x),) * 3


def plms_step(denoise_fn, x, i, sched, history, noise):
    """PLMS (Liu et al. 2022, PNDM without Runge-Kutta warm-up, as diffusers' skip_prk_steps):
    Adams-Bashforth of growing order on eps; the first step is a Heun step (2 model evaluations)."""
    sigma, sigma_to, sigma_next = sched.sigmas[i], sched.sigmas_next[i], sched.sigmas[i + 1]
    n = sched.timesteps.shape[0]
    eps = to_d(x, sigma, denoise_fn(x, sigma, sched.timesteps[i]))
    e1, e2, e3 = history  # eps of the last three steps, newest first
    combined = jnp.where(i == 0, eps, jnp.where(
        i == 1, (3 * eps - e1) / 2, jnp.where(
            i == 2, (23 * eps - 16 * e1 + 5 * e2) / 12,
            (55 * eps - 59 * e1 + 37 * e2 - 9 * e3) / 24)))
    # Like DDIM: move to sigma_to, then the next step reads the VP sample at sigmas[i + 1].
    reread = jnp.sqrt((1 + sigma_next ** 2) / (1 + sigma_to ** 2))

    def heun(_):
        x_pred = (x + (sigma_to - sigma) * eps) * reread
        e_pred = to_d(x_pred, sigma_next, denoise_fn(x_pred, sigma_next, sched.timesteps[min(1, n - 1)]))
        # diffusers averages the two eps but keeps only the first in its history.
        return x + (sigma_next - sigma) * (eps + e_pred) / 2

    def multistep(_):
        return (x + (sigma_to - sigma) * combined) * reread

    # With a single step there is no warm-up: diffusers takes one Euler (DDIM) step.
    x = jax.lax.cond((i == 0) & (n > 1), heun, multistep, None)
    return x, (eps, e1, e2)


def _dpmpp_2m_x0(i, sched, denoised, old_denoised):
    """h = lambda_next - lambda, and the multistep x0 estimate of DPM-Solver++(2M), midpoint form.

    First order at the first step (no history) and at the last (diffusers' final_sigmas_type="zero"
    / lower_order_final), chosen with jnp.where on the traced step index."""
    n = sched.timesteps.shape[0]
    lam = lambda s: -jnp.log(s)  # log-SNR in sigma space; +inf at sigma = 0
    sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
    h = lam(sigma_next) - lam(sigma)
    h_last = lam(sigma) - lam(sched.sigmas[jnp.maximum(i - 1, 0)])
    first_order = (i == 0) | (i == n - 1)
    r = jnp.where(first_order, 1.0, h_last / h)  # keep the unused branch finite
    second = denoised + (denoised - old_denoised) / (2 * r)
    return h, jnp.where(first_order, denoised, second)


def _init_history(x):
    return jnp.zeros_like(x)


def dpmpp_2m_step(denoise_fn, x, i, sched, old_denoised, noise):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; k-diffusion sample_dpmpp_2m)."""
    sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
    denoised = _denoised(denoise_fn, x, i, sched)
    h, x0 = _dpmpp_2m_x0(i, sched, denoised, old_denoised)
    return (sigma_next / sigma) * x - jnp.expm1(-h) * x0, denoised


def dpmpp_2m_sde_step(denoise_fn, x, i, sched, old_denoised, noise):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 5; diffusers' sde-dpmsolver++ midpoint)."""
    sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
    denoised = _denoised(denoise_fn, x, i, sched)
    h, x0 = _dpmpp_2m_x0(i, sched, denoised, old_denoised)
    decay = -jnp.expm1(-2 * h)  # 1 - exp(-2h)
    x = (sigma_next / sigma) * jnp.exp(-h) * x + decay * x0 + sigma_next * jnp.sqrt(decay) * noise
    return x, denoised


_EULER = Sampler(euler_step, _no_state, False)
_HEUN = Sampler(heun_step, _no_state, False)
_DPMPP_2M = Sampler(dpmpp_2m_step, _init_history, False)
_DPMPP_2M_SDE = Sampler(dpmpp_2m_sde_step, _init_history, True)

SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(ddim_step, _no_state, False),
    "ddpm": Sampler(ddpm_step, _no_state, True),
    "pndm": Sampler(plms_step, _init_plms_history, False),
    "euler": _EULER,
    "euler_karras": _EULER,
    "euler_a": Sampler(euler_ancestral_step, _no_state, True),
    "heun": _HEUN,
    "heun_karras": _HEUN,
    "dpmpp_2m": _DPMPP_2M,
    "dpmpp_2m_karras": _DPMPP_2M,
    "dpmpp_2m_sde": _DPMPP_2M_SDE,
    "dpmpp_2m_sde_karras": _DPMPP_2M_SDE,
}


def get(name: str) -> Sampler:
    """SAMPLERS[name], or a ValueError naming the known samplers."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
