"""Bad generation requests: each a ValueError naming the bad input, before anything compiles, and
never a NaN image written as a black PNG (tiny random-weight pipelines from conftest)."""

import math
import os

import jax
import numpy as np
import pytest

import jaxdiff
from jaxdiff import limits
from jaxdiff.images import prepare_out_dir, save_pngs
from jaxdiff.pipeline import NonFiniteImageError
from jaxdiff.sampling import schedules

CASES = [
    # (arguments of Pipeline.prepare besides the prompt, what the message must name)
    (dict(steps=1001, sampler="dpmpp_2m"), "steps=1001"),
    (dict(steps=1001, sampler="dpmpp_2m_sde"), "steps=1001"),
    (dict(steps=1001, sampler="euler"), "steps=1001"),
    (dict(steps=0), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(steps=True), "steps"),
    (dict(guidance_scale=math.inf), "guidance_scale"),
    (dict(guidance_scale=math.nan), "guidance_scale"),
    (dict(guidance_scale="high"), "guidance_scale"),
    (dict(guidance_rescale=math.nan), "guidance_rescale"),
    (dict(guidance_rescale=2.0), "guidance_rescale"),
    (dict(seed=2 ** 63), "seed"),
    (dict(seed=-2 ** 63 - 1), "seed"),
    (dict(seed="5"), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(seed=None), "seed"),
    (dict(height=30), "height"),
    (dict(width=-8), "width"),
    (dict(height=64.0), "height"),
    (dict(sampler="eular"), "eular"),
    (dict(height=8192, width=8192), "pixels per image"),
    (dict(height=100_000, width=100_000, max_pixels=None), "need at least"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
]


@pytest.mark.parametrize("kwargs, named", CASES, ids=[f"{k}" for k, _ in CASES])
def test_bad_request_is_named(jaxdiff_pipeline, kwargs, named):
    pipe = jaxdiff_pipeline("sd1")
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        pipe.prepare("a red circle", **{"steps": 2, **kwargs})


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_latents_are_refused(jaxdiff_pipeline, bad):
    pipe = jaxdiff_pipeline("sd1")
    latents = np.zeros((1, *np.asarray(pipe.default_size()) // 8, 4), np.float32)
    latents[0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match="latents hold 1 NaN or infinite"):
        pipe.prepare("x", steps=2, latents=latents)


def test_a_seed_at_the_edges_of_the_range_works(jaxdiff_pipeline):
    pipe = jaxdiff_pipeline("sd1")
    for seed in (2 ** 63 - 1, -2 ** 63, np.int64(7)):
        pipe.prepare("x", steps=2, seed=seed)


def test_nan_weights_give_an_error_naming_the_images_not_an_image(jaxdiff_pipeline, tmp_path):
    pipe = jaxdiff_pipeline("sd1")
    params = {**pipe.params, "vae": jax.tree.map(lambda p: p * np.nan, pipe.params["vae"])}
    broken = jaxdiff.Pipeline(pipe.models, params, pipe.tokenizers, pipe.configs, pipe.defaults)
    with pytest.raises(NonFiniteImageError, match="image\\(s\\) 0, 1 of 2"):
        broken.generate(["a", "b"], steps=1)


def test_the_memory_estimate_grows_with_size_and_lets_normal_requests_through(jaxdiff_pipeline):
    configs = jaxdiff_pipeline("sd1").configs
    small = limits.peak_bytes(configs, 1, 64, 64, guidance=True)
    big = limits.peak_bytes(configs, 1, 640, 640, guidance=True)
    assert 0 < small < big
    limits.check_request(configs, 4, 512, 512, True, devices=1)  # no error


def test_every_schedule_of_a_sane_length_passes_its_checks():
    config = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                  beta_end=0.012, timestep_spacing="leading", steps_offset=1)
    for sampler in schedules.SAMPLER_NAMES:
        for steps in (1, 2, 20, 50, 500):
            if sampler == "pndm" and steps == 1:
                continue
            schedules.make_schedule(sampler, config, steps)


def test_save_pngs_refuses_nan_and_keeps_existing_files(tmp_path):
    images = np.full((2, 4, 4, 3), 0.5, np.float32)
    first = save_pngs(images, str(tmp_path))
    second = save_pngs(images, str(tmp_path))
    assert [os.path.basename(p) for p in first + second] == [
        "image_000.png", "image_001.png", "image_002.png", "image_003.png"]
    images[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="image\\(s\\) 1 of 2"):
        save_pngs(images, str(tmp_path / "new"))
    assert not os.path.exists(tmp_path / "new")


def test_an_output_folder_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        prepare_out_dir(str(tmp_path / "file"))
    with pytest.raises(OSError, match="cannot create"):
        prepare_out_dir(str(tmp_path / "file" / "sub"))


def test_fuzzed_request_arguments_are_refused_by_name_or_give_finite_inputs(jaxdiff_pipeline):
    """200 seeded random requests (wrong types, NaN, inf, huge and negative numbers, odd strings):
    each either prepares finite inputs or raises a ValueError; never another exception."""
    pipe = jaxdiff_pipeline("sd1")
    rng = np.random.default_rng(2026)
    values = [None, True, 0, 1, 2, -1, 3, 7, 64, 63, 2 ** 40, 2 ** 63, -2 ** 70, 1.5, 2.0, -0.5, math.nan,
              math.inf, -math.inf, "", "7", "euler", "eular", "a prompt", [], ["a", "b"], [1, 2], {"x": 1},
              np.int64(5), np.float32(np.nan), b"bytes"]
    fields = ["steps", "guidance_scale", "guidance_rescale", "seed", "height", "width", "sampler",
              "num_images_per_prompt", "max_pixels", "negative_prompts", "prompts"]
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(200):
        kwargs = {"steps": 2}
        for field in rng.choice(fields, size=rng.integers(1, 4), replace=False):
            kwargs[str(field)] = values[rng.integers(len(values))]
        prompts = kwargs.pop("prompts", "a red circle")
        try:
            inputs, _, _ = pipe.prepare(prompts, **kwargs)
        except ValueError:
            outcomes["refused"] += 1
            continue
        outcomes["ok"] += 1
        # (x0_clip is inf by design: "no clipping")
        inputs = inputs._replace(schedule=inputs.schedule._replace(x0_clip=np.float32(0)), key=None)
        for leaf in jax.tree.leaves(inputs):
            if np.issubdtype(np.asarray(leaf).dtype, np.floating):
                assert np.isfinite(np.asarray(leaf)).all(), kwargs
    assert outcomes["ok"] > 10 and outcomes["refused"] > 50, outcomes
