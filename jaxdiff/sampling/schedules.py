"""Noise schedules: a diffusers scheduler config + a sampler name -> sigmas and model timesteps.

Everything here runs once on the host with NumPy, mirroring how the diffusers scheduler class that
matches each sampler builds its `timesteps` / `sigmas` in `set_timesteps` (down to float32 rounding:
torch's float32 `linspace` and float64-accumulated `cumprod` are reproduced). No torch or diffusers
import: `jaxdiff` must stay light.

All samplers work in sigma (variance-exploding) space, x = x_vp * sqrt(1 + sigma^2), where x_vp is
diffusers' `sample`. A discrete timestep t has sigma(t) = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]).

Which diffusers class a sampler name mirrors, and how a folder's scheduler config is read for it,
is `counterparts` (SAMPLER_NAMES, counterpart and resolve_config are re-exported here).
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple

import numpy as np

from jaxdiff.sampling import betas as training_betas
from jaxdiff.sampling.counterparts import SAMPLER_NAMES, counterpart, resolve_config  # noqa: F401 (API)


class Schedule(NamedTuple):
    """Per-step noise levels, a pytree of float32 arrays (jit them as traced args: no recompiles).

    sigmas:           [n + 1] sigma at which step i evaluates the model; sigmas[n] is the final level
                      (0, or alphas_cumprod[0]'s sigma for DDIM / PNDM with set_alpha_to_one=False).
    timesteps:        [n]     the model's timestep at sigmas[i] (fractional where diffusers' is).
    init_noise_sigma: []      x starts as unit noise * init_noise_sigma (in sigma space).
    sigmas_next:      [n]     the sigma step i moves the sample to. Equal to sigmas[1:] except for
                      DDIM and PNDM, which step to t - T // n (not the next listed timestep: they
                      differ for linspace / trailing spacing), after which the next step reads the
                      same VP sample as if it were at sigmas[i + 1]. (PNDM's first step, a Heun step,
                      lands on sigmas[1]; sigmas_next[0] is where its predictor goes.)
    x0_clip:          []      the denoised x0 is clipped to [-x0_clip, x0_clip] (inf: no clipping;
                      diffusers' clip_sample / clip_sample_range for DDIM, DDPM and Heun).
    """
    sigmas: np.ndarray
    timesteps: np.ndarray
    init_noise_sigma: np.ndarray
    sigmas_next: np.ndarray
    x0_clip: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(np.shape(self.timesteps)[0])


def make_schedule(sampler: str, scheduler_config: Mapping, num_steps: int) -> Schedule:
    """The Schedule of `sampler` for `num_steps` steps, as its diffusers counterpart builds it."""
    cls, _ = counterpart(sampler)
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    cfg = resolve_config(sampler, scheduler_config)
    if cfg.get("thresholding"):
        raise NotImplementedError("dynamic thresholding (thresholding=True) is not supported")
    n, T = int(num_steps), int(cfg["num_train_timesteps"])
    # diffusers' DDIM/DDPM/PNDM refuse this themselves; its DPM-Solver would repeat timesteps and
    # divide by a zero step (NaN images), and Euler would only repeat model calls.
    if n > T:
        raise ValueError(f"{sampler}: steps={n} cannot exceed the {T} timesteps the model was trained "
                         "on (num_train_timesteps)")
    # Timesteps past the last trained one index out of the noise schedule ('leading' spacing with
    # steps_offset at about T steps).
    spacing = _spaced(cfg, n, linspace_round=True)
    if spacing.max() >= T or spacing.min() < 0:
        _bad_steps(sampler, n, cfg, "put a timestep outside the model's 0..{}".format(T - 1))
    sched = _BUILDERS[cls](cfg, n)
    _check_schedule(sampler, n, sched, cfg)
    return sched


def _bad_steps(sampler: str, n: int, cfg, what: str):
    raise ValueError(f"{sampler}: {n} steps {what} with this scheduler config (timestep_spacing="
                     f"{cfg['timestep_spacing']!r}, steps_offset={cfg.get('steps_offset')}); use fewer steps")


def _check_schedule(sampler: str, n: int, sched: Schedule, cfg) -> None:
    """A schedule of n steps each of which moves to a lower noise level: a repeated sigma is a
    zero-length step (a division by zero in the multistep solvers)."""
    sigmas = np.asarray(sched.sigmas, np.float64)
    if len(sched.timesteps) != n or not np.isfinite(sigmas).all():
        _bad_steps(sampler, n, cfg, f"give a malformed schedule ({len(sched.timesteps)} timesteps)")
    if n > 1 and np.any(np.diff(sigmas[:n]) >= 0):
        _bad_steps(sampler, n, cfg, "repeat a noise level")


def img2img_tail(sched: Schedule, strength: float) -> Schedule:
    """The last steps of `sched` that img2img runs at `strength` in (0, 1], as diffusers' img2img
    pipelines pick them: the final int(strength * n) of the n steps. The caller noises the input to
    the tail's first sigma (x = latents + sigmas[0] * noise, in sigma space), so its init_noise_sigma
    is 1. A multistep sampler starts the tail with an empty history, as diffusers' does."""
    n = sched.num_steps
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    if int(n * strength) < 1:
        raise ValueError(f"strength {strength} of {n} steps leaves no step to run; raise either")
    start = n - int(n * strength)
    return sched._replace(sigmas=sched.sigmas[start:], timesteps=sched.timesteps[start:],
                          sigmas_next=sched.sigmas_next[start:], init_noise_sigma=np.float32(1.0))


def _alphas_cumprod(cfg, zero_snr_floor: float) -> np.ndarray:
    betas = training_betas.betas(cfg)
    zero_snr = bool(cfg.get("rescale_betas_zero_snr"))
    if zero_snr:
        betas = training_betas.rescale_zero_terminal_snr(betas)
    ac = training_betas.cumprod(1.0 - betas)
    if zero_snr:
        # Sigma space cannot hold the infinite sigma of zero SNR. Euler / DPM-Solver in diffusers set
        # this floor (2**-24) themselves; DDIM / DDPM work in VP space with a true 0, so for them we
        # use a smaller floor (2**-40, sigma 2**20), which keeps x0 within ~1e-6 of theirs.
        ac[-1] = zero_snr_floor
    return ac


def alphas_cumprod(scheduler_config: Mapping) -> np.ndarray:
    """The training noise schedule: cumulative alphas [num_train_timesteps], float32."""
    return _alphas_cumprod(resolve_config("ddpm", scheduler_config), zero_snr_floor=0.0)


def _sigma(ac) -> np.ndarray:
    ac = np.asarray(ac, np.float64)
    return np.sqrt((1.0 - ac) / ac)


# ----------------------------------------------------------------------------------------------
# Timestep spacings (each diffusers class has its own variant)


def _spaced(cfg, n: int, linspace_round: bool) -> np.ndarray:
    """DDIM / DDPM (linspace_round) and Euler / Heun timesteps, float64, descending."""
    T, spacing = int(cfg["num_train_timesteps"]), cfg["timestep_spacing"]
    if spacing == "linspace":
        if linspace_round:
            return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64).astype(np.float64)
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float64) + cfg["steps_offset"]
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64).astype(np.float64) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not supported (linspace, leading, trailing)")


def _dpm_spaced(cfg, n: int, last_timestep: int) -> np.ndarray:
    """DPMSolverMultistepScheduler's timesteps: n + 1 points with the last (0) dropped."""
    T, spacing = int(cfg["num_train_timesteps"]), cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last_timestep // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg["steps_offset"]
    if spacing == "trailing":
        return np.arange(last_timestep, 0, -T / n).round().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not supported (linspace, leading, trailing)")


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma: linear interpolation in log sigma (k-diffusion's
    DiscreteSchedule.sigma_to_t), with diffusers' clipping at both ends."""
    out = []
    for sigma in np.asarray(sigmas, np.float64):
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - log_sigmas[:, None]
        low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
        out.append(((1 - w) * low + w * (low + 1)).reshape(()))
    return np.array(out)


def _karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _karras_range(cfg, default_min: float, default_max: float) -> tuple[float, float]:
    lo = cfg.get("sigma_min")
    hi = cfg.get("sigma_max")
    return (float(default_min) if lo is None else float(lo), float(default_max) if hi is None else float(hi))


def _pack(sigmas, timesteps, init_noise_sigma, sigmas_next=None, x0_clip=math.inf) -> Schedule:
    sigmas = np.asarray(sigmas, np.float32)
    return Schedule(
        sigmas=sigmas,
        timesteps=np.asarray(timesteps, np.float32),
        init_noise_sigma=np.asarray(init_noise_sigma, np.float32),
        sigmas_next=sigmas[1:].copy() if sigmas_next is None else np.asarray(sigmas_next, np.float32),
        x0_clip=np.asarray(x0_clip, np.float32))


def _clip_range(cfg) -> float:
    return float(cfg["clip_sample_range"]) if cfg["clip_sample"] else math.inf


def _check_steps_le_train(cfg, n: int) -> None:
    if n > cfg["num_train_timesteps"]:
        raise ValueError(f"num_steps={n} cannot exceed num_train_timesteps={cfg['num_train_timesteps']}")


# ----------------------------------------------------------------------------------------------
# One builder per diffusers class


def _ddim(cfg, n: int) -> Schedule:
    """DDIMScheduler: integer timesteps; each step goes to t - T // n (or the final alpha)."""
    _check_steps_le_train(cfg, n)
    ac = _alphas_cumprod(cfg, zero_snr_floor=2.0 ** -40)
    t = _spaced(cfg, n, linspace_round=True).astype(np.int64)
    prev = t - int(cfg["num_train_timesteps"]) // n
    final_ac = 1.0 if cfg["set_alpha_to_one"] else ac[0]
    sigma_to = _sigma(np.where(prev >= 0, ac[np.maximum(prev, 0)], final_ac))
    sigmas = np.concatenate([_sigma(ac[t]), sigma_to[-1:]])
    # VP sampler: diffusers starts from unit noise, i.e. x = noise * sqrt(1 + sigma_0^2) here.
    return _pack(sigmas, t, math.sqrt(1 + sigmas[0] ** 2), sigma_to, _clip_range(cfg))


def _pndm(cfg, n: int) -> Schedule:
    """PNDMScheduler with skip_prk_steps: DDIM's timesteps and t - T // n targets."""
    if cfg["prediction_type"] != "epsilon":
        # PNDM mixes raw model outputs across steps (v included) before converting them at the
        # current step; our samplers only see x0, which reproduces that for eps models alone.
        raise NotImplementedError("the pndm sampler supports prediction_type='epsilon' only")
    ac = _alphas_cumprod(cfg, zero_snr_floor=2.0 ** -40)
    t = _spaced(cfg, n, linspace_round=True).astype(np.int64)
    ratio = int(cfg["num_train_timesteps"]) // n
    if n > 1 and t[1] + ratio != t[0]:
        # diffusers' warm-up step would start from sigma(t[1] + T // n), not from sigma(t[0]).
        raise NotImplementedError(f"pndm with timestep_spacing={cfg['timestep_spacing']!r} and "
                                  f"{n} steps is not supported; use leading spacing or another sampler")
    prev = t - ratio
    final_ac = 1.0 if cfg["set_alpha_to_one"] else ac[0]
    sigma_to = _sigma(np.where(prev >= 0, ac[np.maximum(prev, 0)], final_ac))
    sigmas = np.concatenate([_sigma(ac[t]), sigma_to[-1:]])
    return _pack(sigmas, t, math.sqrt(1 + sigmas[0] ** 2), sigma_to)


def _ddpm(cfg, n: int) -> Schedule:
    """DDPMScheduler: integer timesteps; each step goes to the next listed one, the last to 0."""
    _check_steps_le_train(cfg, n)
    if cfg["variance_type"] not in ("fixed_small", "fixed_small_log"):
        raise NotImplementedError(f"DDPM variance_type {cfg['variance_type']!r} is not supported "
                                  "(fixed_small, fixed_small_log)")
    ac = _alphas_cumprod(cfg, zero_snr_floor=2.0 ** -40)
    t = _spaced(cfg, n, linspace_round=True).astype(np.int64)
    sigmas = np.concatenate([_sigma(ac[t]), [0.0]])
    return _pack(sigmas, t, math.sqrt(1 + sigmas[0] ** 2), None, _clip_range(cfg))


def _k_style(cfg, n: int, karras: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """Euler / Euler ancestral / Heun: fractional timesteps, sigmas interpolated linearly in t;
    Karras sigmas between the interpolated ends, mapped back to fractional timesteps."""
    ac = _alphas_cumprod(cfg, zero_snr_floor=2.0 ** -24)
    full = np.sqrt((1 - ac) / ac)  # float32, as diffusers' torch tensor
    t = _spaced(cfg, n, linspace_round=False).astype(np.float32)
    sig = np.interp(t, np.arange(len(full)), full)
    if karras:
        sig = _karras(*_karras_range(cfg, sig[-1], sig[0]), n)
        t = _sigma_to_t(sig, np.log(full))
    sigmas = np.concatenate([sig, [0.0]]).astype(np.float32)
    peak = float(sigmas.max())
    # Leading spacing starts below sigma_max, so diffusers adds the unit variance of x_vp back.
    init = peak if cfg["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(peak ** 2 + 1)
    return sigmas, t, init


def _euler(cfg, n: int) -> Schedule:
    """EulerDiscreteScheduler."""
    if cfg["interpolation_type"] != "linear":
        raise NotImplementedError(f"interpolation_type {cfg['interpolation_type']!r} is not supported")
    if cfg["final_sigmas_type"] != "zero":
        # diffusers would return the sample at sigma_min unscaled, unlike every other sampler here.
        raise NotImplementedError("EulerDiscreteScheduler final_sigmas_type='sigma_min' is not supported")
    sigmas, t, init = _k_style(cfg, n, cfg["use_karras_sigmas"])
    if cfg["timestep_type"] == "continuous" and cfg["prediction_type"] == "v_prediction":
        t = (0.25 * np.log(sigmas[:-1])).astype(np.float32)  # EDM-style c_noise
    return _pack(sigmas, t, init)


def _euler_ancestral(cfg, n: int) -> Schedule:
    """EulerAncestralDiscreteScheduler."""
    return _pack(*_k_style(cfg, n, karras=False))


def _heun(cfg, n: int) -> Schedule:
    """HeunDiscreteScheduler (its repeated-timestep bookkeeping collapsed to one entry per step)."""
    cfg = dict(cfg, rescale_betas_zero_snr=False)  # not a HeunDiscreteScheduler option
    sigmas, t, init = _k_style(cfg, n, cfg["use_karras_sigmas"])
    return _pack(sigmas, t, init, None, _clip_range(cfg))


def _dpm_solver(cfg, n: int) -> Schedule:
    """DPMSolverMultistepScheduler (dpmsolver++ / sde-dpmsolver++, order 2)."""
    if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type {cfg['final_sigmas_type']!r} must be 'zero' or 'sigma_min'")
    # Our multistep samplers take a first-order last step; diffusers does so for a zero final sigma,
    # with euler_at_final, or with lower_order_final under 15 steps.
    if cfg["final_sigmas_type"] != "zero" and not (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15)):
        raise NotImplementedError("final_sigmas_type='sigma_min' needs euler_at_final=True or "
                                  "lower_order_final=True with fewer than 15 steps")
    ac = _alphas_cumprod(cfg, zero_snr_floor=2.0 ** -24)
    T = int(cfg["num_train_timesteps"])
    lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))  # float32, as diffusers
    last = T - int(np.searchsorted(lambdas[::-1], cfg["lambda_min_clipped"]))
    t = _dpm_spaced(cfg, n, last)
    full = np.sqrt((1 - ac) / ac)
    if cfg["use_karras_sigmas"]:
        sig = _karras(*_karras_range(cfg, full[0], full[-1]), n)
        t = _sigma_to_t(sig, np.log(full))
        if cfg["beta_schedule"] != "squaredcos_cap_v2":
            t = t.round()
        t = t.astype(np.int64)  # diffusers stores int64 timesteps (truncating the cosine case)
    else:
        sig = np.interp(t, np.arange(len(full)), full)
    final = 0.0 if cfg["final_sigmas_type"] == "zero" else _sigma(ac[0])
    sigmas = np.concatenate([sig, [final]]).astype(np.float32)
    return _pack(sigmas, t, math.sqrt(1 + float(sigmas[0]) ** 2))  # VP sampler: unit noise


_BUILDERS = {
    "DDIMScheduler": _ddim,
    "DDPMScheduler": _ddpm,
    "PNDMScheduler": _pndm,
    "EulerDiscreteScheduler": _euler,
    "EulerAncestralDiscreteScheduler": _euler_ancestral,
    "HeunDiscreteScheduler": _heun,
    "DPMSolverMultistepScheduler": _dpm_solver,
}
