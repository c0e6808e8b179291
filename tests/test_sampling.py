"""jaxdiff.sampling against diffusers' schedulers: schedules, full sampling loops, replayed noise."""

from __future__ import annotations

import functools
import inspect

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdiff.sampling import counterparts, loop, samplers, schedules
from tests import reference

# As StableDiffusionPipeline's PNDM scheduler_config.json carries it, with every key spelled out.
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
        "trained_betas": None}
# stabilityai/stable-diffusion-2's file as is: no timestep_spacing, so each class uses its own
# default (DDIM / DDPM leading, the others linspace).
SD2 = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
       "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
       "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
       "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
LINSPACE = {"beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
            "timestep_spacing": "linspace", "set_alpha_to_one": True, "prediction_type": "epsilon"}
TRAILING = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "clip_sample": False, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
CONFIGS = {"sd15": SD15, "sd2": SD2, "linspace": LINSPACE, "trailing": TRAILING}
# Schedule-only variants: other betas, Karras ranges, EDM-style timesteps, DPM's lambda clip.
EXTRA_CONFIGS = {
    "cosine": {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing",
               "prediction_type": "v_prediction"},
    "default_linear": {},
    "trained_betas": {"trained_betas": list(np.linspace(1e-4, 0.02, 1000) ** 1.1)},
    "karras_range": dict(SD15, sigma_min=0.1, sigma_max=10.0),
    "continuous_v": dict(TRAILING, timestep_type="continuous"),
    "lambda_clip": dict(LINSPACE, lambda_min_clipped=-3.0),
    "zero_snr": dict(TRAILING, rescale_betas_zero_snr=True),
    "steps_offset": dict(SD15, timestep_spacing="linspace", steps_offset=3),
}

STOCHASTIC = tuple(n for n in schedules.SAMPLER_NAMES if samplers.SAMPLERS[n].stochastic)
DETERMINISTIC = tuple(n for n in schedules.SAMPLER_NAMES if n not in STOCHASTIC)
NOISE = np.random.default_rng(0).standard_normal((2, 5, 7, 4)).astype(np.float32)  # NHWC


# A toy eps / v "model", identical in torch and jax. Close to x_vp at high noise like a real eps
# model, so that x0 and the final latents stay O(1) and 1e-4 is a meaningful tolerance.
def torch_model(x, t):
    t = t.float()
    return x * (0.6 + 0.0004 * t) + 0.1 * torch.tanh(0.7 * x + 0.001 * t) + 0.05 * torch.sin(3 * x)


def jax_model(x, t):
    return x * (0.6 + 0.0004 * t) + 0.1 * jnp.tanh(0.7 * x + 0.001 * t) + 0.05 * jnp.sin(3 * x)


STEPS = (1, 4, 25)  # the step counts most tests use: each new count compiles the loop again


@functools.lru_cache(maxsize=None)
def _jitted(sampler, prediction_type, replay):
    denoise_fn = loop.denoiser(jax_model, prediction_type)
    if replay:
        return jax.jit(lambda noise, sched, z:
                       loop.run_with_noise(denoise_fn, noise, sched, sampler, z))
    return jax.jit(lambda noise, sched, key: loop.run(denoise_fn, noise, sched, sampler, key))


def _shared_name(sampler):
    return next(n for n in schedules.SAMPLER_NAMES if samplers.SAMPLERS[n] is samplers.SAMPLERS[sampler])


def _jaxdiff(sampler, config, steps, step_noise=None, key=None):
    sched = schedules.make_schedule(sampler, config, steps)
    pt = config.get("prediction_type", "epsilon")
    # Names with the same Sampler (euler / euler_karras, ...) share one jitted loop: compiles are
    # most of this file's run time.
    shared = _shared_name(sampler)
    if step_noise is not None:
        return np.asarray(_jitted(shared, pt, True)(NOISE, sched, step_noise))
    return np.asarray(_jitted(shared, pt, False)(NOISE, sched, key))


def _diffusers(sampler, config, steps, seed=0):
    return reference.run_diffusers(reference.diffusers_scheduler(sampler, config), torch_model, NOISE,
                                   steps, seed)


def _max_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max())


# ----------------------------------------------------------------------------------------------
# Full sampling loops


def _pndm_config(config):
    """PNDM (PLMS) supports eps models only: the v configs, made epsilon, for it."""
    return dict({**CONFIGS, **EXTRA_CONFIGS}[config], prediction_type="epsilon")


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_deterministic_sampler_matches_diffusers(sampler, config):
    cfg, counts = CONFIGS[config], STEPS
    if sampler in ("ddim", "pndm") and config in ("linspace", "trailing"):
        counts += (3, 10)  # 1000 % 3 != 0: DDIM's t - 1000 // n is not the next trailing timestep
    if sampler == "pndm":
        cfg = _pndm_config(config)
        if config == "linspace":
            with pytest.raises(NotImplementedError, match="pndm with timestep_spacing='linspace'"):
                schedules.make_schedule(sampler, cfg, 4)
            counts = (1, 50)  # the step counts where diffusers' warm-up is consistent
    for steps in counts:
        ref, _ = _diffusers(sampler, cfg, steps)
        ours = _jaxdiff(sampler, cfg, steps)
        assert ours.shape == NOISE.shape and ours.dtype == np.float32
        assert np.abs(ref).max() > 0.01  # (1 linspace step: t = 0, sigma ~ 0.03)
        assert _max_err(ours, ref) <= 1e-4, (steps, _max_err(ours, ref))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_stochastic_sampler_replays_diffusers_noise(sampler, config):
    for steps in STEPS:
        ref, step_noise = _diffusers(sampler, CONFIGS[config], steps, seed=steps)
        if steps > 1:  # (1 linspace step is t = 0: DDPM draws no noise there)
            assert np.abs(step_noise).max() > 0  # the replay really injects torch's noise
        ours = _jaxdiff(sampler, CONFIGS[config], steps, step_noise=step_noise)
        assert _max_err(ours, ref) <= 1e-4, (steps, _max_err(ours, ref))


@functools.lru_cache(maxsize=None)
def _sample_jit():
    # sample itself jitted: sched and key traced, sampler static.
    return jax.jit(functools.partial(loop.run, loop.denoiser(jax_model, "epsilon")),
                   static_argnames="sampler")


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_stochastic_sampler_with_jax_noise(sampler):
    run, steps, shared = _sample_jit(), 4, _shared_name(sampler)  # (threefry compiles slowly on CPU)
    sched = schedules.make_schedule(sampler, SD15, steps)
    a = np.asarray(run(NOISE, sched, sampler=shared, key=jax.random.key(0)))
    size = run._cache_size()
    again = np.asarray(run(NOISE, sched, sampler=shared, key=jax.random.key(0)))
    b = np.asarray(run(NOISE, schedules.make_schedule(sampler, LINSPACE, steps), sampler=shared,
                       key=jax.random.key(1)))
    assert run._cache_size() == size  # new key, new schedule values: no recompile
    assert np.isfinite(a).all() and np.abs(a).max() > 0.1
    np.testing.assert_array_equal(a, again)
    assert np.abs(a - b).max() > 1e-2
    with pytest.raises(ValueError, match="PRNG key"):
        loop.run(loop.denoiser(jax_model, "epsilon"), NOISE, sched, sampler, None)
    if sampler == "euler_a":
        # Step i's noise is normal(fold_in(key, i)): replaying exactly those gives `sample`.
        draw = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(jax.random.key(0), i),
                                                            NOISE.shape)))
        replayed = _jaxdiff(sampler, SD15, steps, step_noise=draw(jnp.arange(steps)))
        np.testing.assert_allclose(a, replayed, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "heun"])
def test_clip_sample_matches_diffusers(sampler):
    config = dict(LINSPACE, clip_sample=True, clip_sample_range=0.5)
    for steps in STEPS[1:]:
        ref, step_noise = _diffusers(sampler, config, steps)
        ours = _jaxdiff(sampler, config, steps, step_noise=step_noise if sampler == "ddpm" else None)
        assert _max_err(ours, ref) <= 1e-4
        assert _max_err(ours, _jaxdiff(sampler, LINSPACE, steps, step_noise=step_noise
                                       if sampler == "ddpm" else None)) > 1e-2


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler", "euler_a", "dpmpp_2m"])
def test_zero_terminal_snr_matches_diffusers(sampler):
    config = dict(TRAILING, rescale_betas_zero_snr=True)
    for steps in STEPS:
        ref, step_noise = _diffusers(sampler, config, steps)
        ours = _jaxdiff(sampler, config, steps, step_noise=step_noise if sampler in STOCHASTIC else None)
        # One Euler step from sigma = 4096 to 0 is x + d * (0 - 4096) with |x| ~ 4096 |noise|:
        # diffusers' own float32 result is only good to ~4096 * 2**-24 * |noise| ~ 5e-4 there.
        tol = 2e-3 if steps == 1 and sampler in ("euler", "euler_a") else 1e-4
        assert _max_err(ours, ref) <= tol, (steps, _max_err(ours, ref))


def test_cosine_betas_sample_matches_diffusers():
    # (Not dpmpp_2m_karras: there diffusers' truncated int timesteps repeat and its step index runs
    # past the end, an IndexError.)
    config = EXTRA_CONFIGS["cosine"]
    for sampler in ("dpmpp_2m", "euler_karras"):
        ref, _ = _diffusers(sampler, config, 25)
        assert _max_err(_jaxdiff(sampler, config, 25), ref) <= 1e-4


def test_sample_prediction_type_matches_diffusers():
    config = dict(LINSPACE, prediction_type="sample")
    for sampler in ("ddim", "dpmpp_2m"):
        ref, _ = _diffusers(sampler, config, 4)
        assert _max_err(_jaxdiff(sampler, config, 4), ref) <= 1e-4


def _diffusers_img2img(sampler, config, steps, strength, init, noise):
    """diffusers' img2img loop (StableDiffusionImg2ImgPipeline.get_timesteps and add_noise)."""
    scheduler = reference.diffusers_scheduler(sampler, config)
    scheduler.set_timesteps(steps)
    start = steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[start:]
    if hasattr(type(scheduler), "set_begin_index"):  # (DDIM keeps no step index)
        scheduler.set_begin_index(start)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    x = scheduler.add_noise(nchw(init), nchw(noise), timesteps[:1])
    with torch.no_grad():
        for t in timesteps:
            x = scheduler.step(torch_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_img2img_tail_matches_diffusers(sampler, strength):
    """A schedule's img2img tail, started from latents noised to its first sigma, is diffusers'
    img2img run (its first steps skipped, a multistep sampler's history empty at the start)."""
    config = dict(TRAILING, rescale_betas_zero_snr=True)
    init = np.tanh(NOISE[::-1]).copy()  # "image latents": anything but the noise
    noise = NOISE
    tail = schedules.img2img_tail(schedules.make_schedule(sampler, config, 10), strength)
    assert tail.num_steps == int(10 * strength) and float(tail.init_noise_sigma) == 1.0
    denoise_fn = loop.denoiser(jax_model, "v_prediction")
    ours = np.asarray(loop.run(denoise_fn, init + tail.sigmas[0] * noise, tail, sampler))
    ref = _diffusers_img2img(sampler, config, 10, strength, init, noise)
    assert _max_err(ours, ref) <= 1e-4, _max_err(ours, ref)
    assert _max_err(ours, init) > 0.01  # it ran


def test_img2img_tail_refuses_a_strength_with_no_steps():
    sched = schedules.make_schedule("euler", SD15, 10)
    for bad in (0.0, -0.5, 1.5, 0.05):
        with pytest.raises(ValueError, match="strength"):
            schedules.img2img_tail(sched, bad)


@pytest.mark.parametrize("a, b", [("euler", "heun"), ("dpmpp_2m", "dpmpp_2m_karras"),
                                  ("euler", "euler_karras"), ("euler", "dpmpp_2m"), ("ddim", "heun"),
                                  ("ddim", "pndm")])
def test_swapped_samplers_differ(a, b):
    """The parity tests can fail: neighbouring samplers give clearly different latents."""
    assert _max_err(_jaxdiff(a, SD15, 4), _jaxdiff(b, SD15, 4)) > 1e-2


# ----------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("sampler, config", [
    (s, c) for c in list(CONFIGS) + list(EXTRA_CONFIGS) for s in schedules.SAMPLER_NAMES
    # timestep_type="continuous" is an option of the Euler schedulers only.
    if c != "continuous_v" or s.startswith("euler")])
def test_schedule_matches_diffusers(sampler, config):
    cfg = {**CONFIGS, **EXTRA_CONFIGS}[config]
    if sampler == "pndm":
        cfg = _pndm_config(config)
    for steps in (1, 2, 7, 10, 50):
        try:
            ours = schedules.make_schedule(sampler, cfg, steps)
        except NotImplementedError:
            # (pndm where diffusers' warm-up step starts off the schedule: linspace, trailing 7)
            assert sampler == "pndm" and cfg.get("timestep_spacing") in ("linspace", "trailing")
            continue
        ref = reference.schedule_arrays(reference.diffusers_scheduler(sampler, cfg), steps)
        assert ours.sigmas.shape == (steps + 1,) and ours.timesteps.shape == (steps,)
        for field in ("sigmas", "timesteps", "init_noise_sigma", "sigmas_next"):
            value = getattr(ours, field)
            assert value.dtype == np.float32, field
            expected = np.asarray(ref[field], np.float64)
            # Zero terminal SNR: DDIM / DDPM's sigma is inf there, ours a 2**20 stand-in.
            huge = ~np.isfinite(expected)
            assert (value[huge] >= 2.0 ** 20 - 1).all(), field
            # diffusers' float32 zero-SNR rescale cancels catastrophically (betas = 1 - a ratio
            # near 1), so one-ulp differences in torch's sqrt grow to ~3e-6 in sigma.
            rtol = 2e-5 if config == "zero_snr" else 2e-6
            np.testing.assert_allclose(value[~huge], expected[~huge], rtol=rtol, atol=1e-7,
                                       err_msg=f"{field} @ {steps}")


@pytest.mark.parametrize("sampler, evaluations", [
    ("heun", lambda n: 2 * n - 1),  # two per step, one for the last (sigma_next = 0: Euler)
    ("pndm", lambda n: n + (n > 1)),  # two for the warm-up (Heun) step, then one per step
    ("dpmpp_2m", lambda n: n),
])
def test_model_evaluations_per_run(sampler, evaluations):
    calls = []

    def model(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return jax_model(x, t)

    denoise_fn = loop.denoiser(model, "epsilon")
    run = jax.jit(lambda sched: loop.run(denoise_fn, NOISE, sched, sampler))
    for n in (1, 6):
        calls.clear()
        jax.block_until_ready(run(schedules.make_schedule(sampler, SD15, n)))
        assert len(calls) == evaluations(n), n


def test_missing_keys_take_the_counterpart_class_defaults():
    """A bare scheduler_config.json, and diffusers' own `pipe.scheduler.config` (whose
    `_use_default_values` marks keys it only had as defaults), resolve as from_config does."""
    raw = {k: v for k, v in SD15.items() if k not in ("timestep_spacing", "prediction_type")}
    loaded = dict(diffusers.PNDMScheduler.from_config(raw).config)
    assert "timestep_spacing" in loaded["_use_default_values"]
    for config in (raw, loaded):
        for sampler in ("ddim", "euler", "heun", "dpmpp_2m"):
            ours = schedules.make_schedule(sampler, config, 10)
            ref = reference.schedule_arrays(reference.diffusers_scheduler(sampler, config), 10)
            np.testing.assert_allclose(ours.sigmas, ref["sigmas"], rtol=2e-6)
            np.testing.assert_allclose(ours.timesteps, ref["timesteps"], rtol=2e-6)
    # DDIM's default spacing is leading, Euler's linspace: different first timesteps.
    assert schedules.make_schedule("ddim", raw, 10).timesteps[0] == 901
    assert schedules.make_schedule("euler", raw, 10).timesteps[0] == 999


def test_class_defaults_match_installed_diffusers():
    for cls_name, defaults in counterparts.CLASS_DEFAULTS.items():
        params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
        for key, value in defaults.items():
            assert key in params, (cls_name, key)
            assert params[key].default == value, (cls_name, key, params[key].default, value)


def test_counterparts_agree_with_reference():
    assert set(counterparts.COUNTERPARTS) == set(reference.COUNTERPARTS) == set(samplers.SAMPLERS)
    for name, (cls_name, overrides) in counterparts.COUNTERPARTS.items():
        assert reference.COUNTERPARTS[name][0] == cls_name
        ref_overrides = reference.COUNTERPARTS[name][1]
        assert {k: ref_overrides.get(k) for k in overrides} == overrides, name
    assert set(reference.STOCHASTIC) == set(STOCHASTIC)
    assert {"ddim", "ddpm", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras"} <= set(
        schedules.SAMPLER_NAMES)


# ----------------------------------------------------------------------------------------------
# API contract


def test_pndm_rejects_v_prediction():
    with pytest.raises(NotImplementedError, match="epsilon"):
        schedules.make_schedule("pndm", SD2, 10)


def test_unknown_sampler_and_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"unknown sampler 'plms_typo'.*ddim.*dpmpp_2m_karras"):
        schedules.make_schedule("plms_typo", SD15, 10)
    with pytest.raises(ValueError, match=r"unknown sampler 'plms_typo'.*euler_a"):
        loop.run(loop.denoiser(jax_model, "epsilon"), NOISE,
                       schedules.make_schedule("euler", SD15, 2), "plms_typo", None)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_steps"):
            schedules.make_schedule("euler", SD15, bad)
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        loop.denoiser(jax_model, "flow")
    with pytest.raises(ValueError, match="cannot exceed"):
        schedules.make_schedule("ddim", SD15, 1001)
    with pytest.raises(NotImplementedError, match="beta_schedule"):
        schedules.make_schedule("euler", dict(SD15, beta_schedule="sigmoid"), 10)
    with pytest.raises(NotImplementedError, match="thresholding"):
        schedules.make_schedule("ddim", dict(SD15, thresholding=True), 10)


def test_schedule_is_a_float32_pytree():
    sched = schedules.make_schedule("dpmpp_2m", SD15, 10)
    leaves = jax.tree_util.tree_leaves(sched)
    assert len(leaves) == len(schedules.Schedule._fields)
    assert all(np.asarray(v).dtype == np.float32 for v in leaves)
    assert sched.num_steps == 10


def test_new_schedule_with_same_steps_does_not_recompile():
    traces = []
    denoise_fn = loop.denoiser(jax_model, "epsilon")

    @jax.jit
    def run(noise, sched):
        traces.append(1)
        return loop.run(denoise_fn, noise, sched, "dpmpp_2m")

    a = run(NOISE, schedules.make_schedule("dpmpp_2m", SD15, 8))
    b = run(NOISE, schedules.make_schedule("dpmpp_2m", LINSPACE, 8))
    c = run(NOISE, schedules.make_schedule("dpmpp_2m_karras", SD15, 8))
    assert len(traces) == 1 and run._cache_size() == 1
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-2
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2


def test_denoiser_computes_in_float32_for_a_bf16_model():
    denoise_fn = loop.denoiser(lambda x, t: jax_model(x, t).astype(jnp.bfloat16), "v_prediction")
    x0 = jax.eval_shape(denoise_fn, NOISE, jnp.float32(3.0), jnp.float32(500.0))
    assert x0.dtype == jnp.float32


def test_step_functions_are_pure_and_take_injected_noise():
    sched = schedules.make_schedule("euler_a", SD15, 4)
    denoise_fn = loop.denoiser(jax_model, "epsilon")
    x = jnp.asarray(NOISE) * sched.init_noise_sigma
    s = samplers.SAMPLERS["euler_a"]
    z = jnp.ones_like(x)
    step = jax.jit(s.step, static_argnums=0)
    x1, _ = step(denoise_fn, x, 0, sched, s.init(x), z)
    x1_again, _ = step(denoise_fn, x, 0, sched, s.init(x), z)
    x1_other, _ = step(denoise_fn, x, 0, sched, s.init(x), -z)
    np.testing.assert_array_equal(x1, x1_again)
    assert np.abs(np.asarray(x1 - x1_other)).max() > 1e-2
