"""Which diffusers scheduler class each sampler name reproduces (its counterpart), and the config
values that class would see: a key absent from a folder's scheduler config takes the default of the
counterpart class, not of the config's `_class_name`, and keys listed in `_use_default_values` count
as absent. That is what diffusers does: `Cls.from_config(pipe.scheduler.config)` drops the values the
old scheduler only had as defaults (configuration_utils.extract_init_dict).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
               trained_betas=None, prediction_type="epsilon", steps_offset=0)

# __init__ defaults of the diffusers classes (0.42), for the keys we read. tests/test_sampling.py
# checks them against the installed diffusers' signatures.
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": dict(
        _COMMON, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, thresholding=False,
        timestep_spacing="leading", rescale_betas_zero_snr=False),
    "DDPMScheduler": dict(
        _COMMON, variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0,
        thresholding=False, timestep_spacing="leading", rescale_betas_zero_snr=False),
    "EulerDiscreteScheduler": dict(
        _COMMON, interpolation_type="linear", use_karras_sigmas=False, use_exponential_sigmas=False,
        use_beta_sigmas=False, sigma_min=None, sigma_max=None, timestep_spacing="linspace",
        timestep_type="discrete", rescale_betas_zero_snr=False, final_sigmas_type="zero"),
    "EulerAncestralDiscreteScheduler": dict(
        _COMMON, timestep_spacing="linspace", rescale_betas_zero_snr=False),
    "HeunDiscreteScheduler": dict(
        _COMMON, beta_start=0.00085, beta_end=0.012, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, clip_sample=False, clip_sample_range=1.0,
        timestep_spacing="linspace"),
    "PNDMScheduler": dict(
        _COMMON, skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading"),
    "DPMSolverMultistepScheduler": dict(
        _COMMON, solver_order=2, thresholding=False, algorithm_type="dpmsolver++",
        solver_type="midpoint", lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
        use_flow_sigmas=False, final_sigmas_type="zero", lambda_min_clipped=-math.inf,
        variance_type=None, timestep_spacing="linspace", rescale_betas_zero_snr=False),
}
# Heun and DPM-Solver read sigma_min / sigma_max with hasattr(config, ...): only a config that
# carries them sets them. Euler has them as __init__ args (default None): same outcome.
_OPTIONAL_KEYS = ("sigma_min", "sigma_max")

_NO_EXTRA_SIGMAS = dict(use_exponential_sigmas=False, use_beta_sigmas=False)
_DPM = dict(_NO_EXTRA_SIGMAS, solver_order=2, solver_type="midpoint", use_lu_lambdas=False,
            use_flow_sigmas=False)

# sampler name -> (diffusers counterpart class, config overrides). The name alone picks the sigma
# spacing family, so e.g. "euler" ignores a config's use_karras_sigmas=True.
COUNTERPARTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    # PLMS as Stable Diffusion pipelines configure PNDMScheduler (no Runge-Kutta warm-up).
    "pndm": ("PNDMScheduler", dict(skip_prk_steps=True)),
    "euler": ("EulerDiscreteScheduler", dict(_NO_EXTRA_SIGMAS, use_karras_sigmas=False)),
    "euler_karras": ("EulerDiscreteScheduler", dict(_NO_EXTRA_SIGMAS, use_karras_sigmas=True)),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", dict(_NO_EXTRA_SIGMAS, use_karras_sigmas=False)),
    "heun_karras": ("HeunDiscreteScheduler", dict(_NO_EXTRA_SIGMAS, use_karras_sigmas=True)),
    "dpmpp_2m": ("DPMSolverMultistepScheduler",
                 dict(_DPM, algorithm_type="dpmsolver++", use_karras_sigmas=False)),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        dict(_DPM, algorithm_type="dpmsolver++", use_karras_sigmas=True)),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler",
                     dict(_DPM, algorithm_type="sde-dpmsolver++", use_karras_sigmas=False)),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler",
                            dict(_DPM, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)),
}
SAMPLER_NAMES = tuple(COUNTERPARTS)


def resolve_config(sampler: str, scheduler_config: Mapping) -> dict[str, Any]:
    """The config values the counterpart class of `sampler` would see after from_config(config)."""
    cls, overrides = counterpart(sampler)
    given = dict(scheduler_config)
    for key in given.pop("_use_default_values", None) or ():
        given.pop(key, None)
    cfg = {k: given.get(k, default) for k, default in CLASS_DEFAULTS[cls].items()}
    cfg.update({k: given.get(k) for k in _OPTIONAL_KEYS if k not in cfg})
    cfg.update(overrides)
    return cfg


def counterpart(sampler: str) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, config overrides) of `sampler`; ValueError naming the known ones."""
    if sampler not in COUNTERPARTS:
        raise ValueError(f"unknown sampler {sampler!r}; known samplers: {', '.join(SAMPLER_NAMES)}")
    return COUNTERPARTS[sampler]


# ----------------------------------------------------------------------------------------------
# Training noise schedule
