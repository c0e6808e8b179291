"""diffusers counterparts of jaxdiff's sampler names, and the reference torch sampling loop.

Written independently of jaxdiff.sampling.counterparts.COUNTERPARTS on purpose: the tests check that
the two agree rather than trusting either.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Mapping

import numpy as np
import torch

_DPM = dict(solver_order=2, solver_type="midpoint", use_lu_lambdas=False, use_flow_sigmas=False,
            use_exponential_sigmas=False, use_beta_sigmas=False)
_PLAIN = dict(use_exponential_sigmas=False, use_beta_sigmas=False)

# sampler name -> (diffusers class name, from_config overrides)
COUNTERPARTS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", dict(skip_prk_steps=True)),
    "euler": ("EulerDiscreteScheduler", dict(_PLAIN, use_karras_sigmas=False)),
    "euler_karras": ("EulerDiscreteScheduler", dict(_PLAIN, use_karras_sigmas=True)),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", dict(_PLAIN, use_karras_sigmas=False)),
    "heun_karras": ("HeunDiscreteScheduler", dict(_PLAIN, use_karras_sigmas=True)),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(_DPM, algorithm_type="dpmsolver++",
                                                     use_karras_sigmas=False)),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", dict(_DPM, algorithm_type="dpmsolver++",
                                                            use_karras_sigmas=True)),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", dict(_DPM, algorithm_type="sde-dpmsolver++",
                                                         use_karras_sigmas=False)),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", dict(_DPM, algorithm_type="sde-dpmsolver++",
                                                                use_karras_sigmas=True)),
}
STOCHASTIC = ("ddpm", "euler_a", "dpmpp_2m_sde", "dpmpp_2m_sde_karras")
# Schedulers whose `sample` is the VP sample itself (init_noise_sigma 1, no input scaling).
_VP_CLASSES = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler")


def diffusers_scheduler(sampler_name: str, scheduler_config: Mapping):
    """A fresh diffusers scheduler equivalent to jaxdiff's `sampler_name` under `scheduler_config`."""
    import diffusers

    cls_name, overrides = COUNTERPARTS[sampler_name]
    return getattr(diffusers, cls_name).from_config(dict(scheduler_config), **overrides)


@contextlib.contextmanager
def recording_noise(scheduler):
    """Record every randn_tensor draw the scheduler's `step` makes: yields a list that gets one
    entry per draw."""
    module = sys.modules[type(scheduler).__module__]
    drawn = []
    if not hasattr(module, "randn_tensor"):  # e.g. Heun: deterministic, never draws
        yield drawn
        return
    original = module.randn_tensor

    def record(*args, **kwargs):
        out = original(*args, **kwargs)
        drawn.append(out.detach().clone())
        return out

    module.randn_tensor = record
    try:
        yield drawn
    finally:
        module.randn_tensor = original


def run_diffusers(scheduler, model: Callable, noise_nhwc: np.ndarray, num_steps: int, seed: int = 0):
    """diffusers' denoising loop with `model(x, t) -> prediction` (torch, NCHW).

    Returns (latents NHWC float32, step_noise [num_steps, *noise.shape] NHWC): step_noise[i] is the
    noise the i-th jaxdiff step must use to replay this run (zeros where diffusers drew none; for
    Heun, diffusers' 2 * num_steps - 1 calls map onto num_steps jaxdiff steps, for PNDM its
    num_steps + 1).
    """
    scheduler.set_timesteps(num_steps)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.from_numpy(np.ascontiguousarray(noise_nhwc.transpose(0, 3, 1, 2))) \
        * scheduler.init_noise_sigma
    per_call = []
    with torch.no_grad(), recording_noise(scheduler) as drawn:
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(latents, t)
            kwargs = {"generator": generator} if "generator" in _step_params(scheduler) else {}
            before = len(drawn)
            latents = scheduler.step(model(inp, t), t, latents, **kwargs).prev_sample
            assert len(drawn) - before <= 1
            per_call.append(drawn[-1] if len(drawn) > before else None)
    if type(scheduler).__name__ == "HeunDiscreteScheduler":  # first-order calls: even indices
        per_call = per_call[::2]
    elif len(per_call) != num_steps:  # PNDM's warm-up: n + 1 calls, never random
        assert not any(z is not None for z in per_call)
        per_call = [None] * num_steps
    step_noise = np.stack([np.zeros_like(noise_nhwc) if z is None
                           else z.numpy().transpose(0, 2, 3, 1) for z in per_call]).astype(np.float32)
    return latents.numpy().transpose(0, 2, 3, 1), step_noise


def schedule_arrays(scheduler, num_steps: int) -> dict[str, np.ndarray]:
    """The diffusers scheduler's schedule, in jaxdiff.sampling.schedules.Schedule's conventions."""
    scheduler.set_timesteps(num_steps)
    cls = type(scheduler).__name__
    t = scheduler.timesteps.numpy().astype(np.float64)
    if cls == "PNDMScheduler":  # its list repeats the second timestep for the warm-up step
        t = np.asarray(scheduler._timesteps, np.float64)[::-1]
    if cls in ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler"):
        ac = scheduler.alphas_cumprod.numpy().astype(np.float64)
        sigma = lambda a: np.sqrt((1 - a) / np.where(a == 0, np.nan, a))  # (zero SNR: nan)
        sigmas = sigma(ac[t.astype(np.int64)])
        if cls in ("DDIMScheduler", "PNDMScheduler"):
            prev = t.astype(np.int64) - scheduler.config.num_train_timesteps // num_steps
            final = float(scheduler.final_alpha_cumprod)
            to = sigma(np.where(prev >= 0, ac[np.maximum(prev, 0)], final))
        else:
            to = np.concatenate([sigmas[1:], [0.0]])
        sigmas = np.concatenate([sigmas, to[-1:]])
    else:
        sigmas = scheduler.sigmas.numpy().astype(np.float64)
        if cls == "HeunDiscreteScheduler":  # [s0, s1, s1, ..., s_n-1, s_n-1, 0] -> one per step
            sigmas, t = np.concatenate([sigmas[:1], sigmas[1::2]]), np.concatenate([t[:1], t[1::2]])
        to = sigmas[1:]
    init = float(scheduler.init_noise_sigma)
    if cls in _VP_CLASSES:
        init *= float(np.sqrt(1 + sigmas[0] ** 2))
    return dict(sigmas=sigmas, timesteps=t, init_noise_sigma=np.float64(init), sigmas_next=to)


def _step_params(scheduler):
    import inspect

    return inspect.signature(scheduler.step).parameters
