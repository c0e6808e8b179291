"""End to end: jaxdiff images equal diffusers' from the same latents, for SD1, SD2 and SDXL."""

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

import jaxdiff
from jaxdiff.weights.convert import WeightError
from tests.reference import diffusers_scheduler

PROMPTS = ["a red circle to the left of a blue square", "a photo of a cat"]
NEGATIVES = ["a green triangle", ""]
HEIGHT, WIDTH = 48, 80  # non-square, not powers of two: latents 6 x 10
DETERMINISTIC = ("ddim", "euler", "heun", "dpmpp_2m", "dpmpp_2m_karras")


def _diffusers_pipe(path, sampler):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler(sampler, dict(pipe.scheduler.config))
    return pipe


def _latents(batch, seed=0, height=HEIGHT, width=WIDTH):
    return np.random.default_rng(seed).standard_normal((batch, height // 8, width // 8, 4)).astype(np.float32)


def _diffusers_images(path, sampler, prompts, negatives, latents, steps, guidance, **kw):
    pipe = _diffusers_pipe(path, sampler)
    with torch.no_grad():
        out = pipe(prompt=prompts, negative_prompt=negatives, height=latents.shape[1] * 8,
                   width=latents.shape[2] * 8, num_inference_steps=steps, guidance_scale=guidance,
                   latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), output_type="np", **kw)
    return out.images


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_matches_diffusers(kind, sampler, pipeline_dir, jaxdiff_pipeline):
    path, pipe = pipeline_dir(kind), jaxdiff_pipeline(kind)
    latents = _latents(len(PROMPTS))
    ref = _diffusers_images(path, sampler, PROMPTS, NEGATIVES, latents, steps=6, guidance=5.0)
    ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, steps=6, guidance_scale=5.0,
                         sampler=sampler, latents=latents)
    assert ours.shape == (2, HEIGHT, WIDTH, 3) and ours.dtype == np.float32
    assert 0.02 < ref.std(), "reference images are flat: the fixture would hide sampler mistakes"
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_guidance_rescale_matches_diffusers(kind, pipeline_dir, jaxdiff_pipeline):
    path, pipe = pipeline_dir(kind), jaxdiff_pipeline(kind)
    latents = _latents(len(PROMPTS), seed=4)
    kw = dict(negative_prompts=NEGATIVES, steps=5, guidance_scale=9.0, sampler="euler", latents=latents)
    ref = _diffusers_images(path, "euler", PROMPTS, NEGATIVES, latents, steps=5, guidance=9.0,
                            guidance_rescale=0.7)
    ours = pipe.generate(PROMPTS, guidance_rescale=0.7, **kw)
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)
    # The rescale changes the images at all (else the check above would not test it).
    assert np.abs(ours - pipe.generate(PROMPTS, **kw)).max() > 2e-2


def test_sampler_swap_is_detected(jaxdiff_pipeline):
    """The fixtures are sensitive enough that using the wrong sampler fails the parity check."""
    pipe = jaxdiff_pipeline("sd1")
    latents = _latents(2)
    images = {s: pipe.generate(PROMPTS, NEGATIVES, steps=6, guidance_scale=5.0, sampler=s, latents=latents)
              for s in ("euler", "heun", "dpmpp_2m")}
    assert np.abs(images["euler"] - images["heun"]).max() > 2e-2
    assert np.abs(images["euler"] - images["dpmpp_2m"]).max() > 2e-2


def test_sdxl_without_negative_prompt_zeroes_uncond(pipeline_dir, jaxdiff_pipeline):
    path, pipe = pipeline_dir("sdxl"), jaxdiff_pipeline("sdxl")
    latents = _latents(2, seed=3, height=64, width=56)
    ref = _diffusers_images(path, "euler", PROMPTS, None, latents, steps=4, guidance=6.0)
    ours = pipe.generate(PROMPTS, steps=4, guidance_scale=6.0, sampler="euler", latents=latents)
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)


def test_empty_and_overlong_prompts_match_diffusers(pipeline_dir, jaxdiff_pipeline):
    path, pipe = pipeline_dir("sd1"), jaxdiff_pipeline("sd1")
    long_prompt = " ".join(["red circle"] * 60)  # > 77 tokens
    prompts = ["", long_prompt]
    latents = _latents(2, seed=1)
    ref = _diffusers_images(path, "euler", prompts, None, latents, steps=3, guidance=4.0)
    with pytest.warns(UserWarning, match="truncated to 77 tokens"):
        ours = pipe.generate(prompts, steps=3, guidance_scale=4.0, sampler="euler", latents=latents)
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)


def test_no_recompile_for_new_prompt_seed_or_guidance_values(jaxdiff_pipeline):
    pipe = jaxdiff_pipeline("sd1")
    kw = dict(height=32, width=40, steps=2, sampler="euler")
    a = pipe.generate(["a red circle"], guidance_scale=3.0, seed=0, **kw)
    size = pipe._generate._cache_size()
    b = pipe.generate(["a blue square"], negative_prompts="a cat", guidance_scale=9.0, seed=5,
                      guidance_rescale=0.5, **kw)
    assert pipe._generate._cache_size() == size
    assert not np.allclose(a, b)


def test_seeded_noise_is_per_image_and_reproducible(jaxdiff_pipeline):
    pipe = jaxdiff_pipeline("sd1")
    kw = dict(height=32, width=32, steps=2, sampler="euler", seed=7)
    both = pipe.generate(["a red circle", "a red circle"], **kw)
    again = pipe.generate(["a red circle", "a red circle"], **kw)
    np.testing.assert_array_equal(both, again)
    assert np.abs(both[0] - both[1]).max() > 1e-2  # each image draws its own noise


@pytest.mark.parametrize("bad, match", [
    (dict(sampler="plms_typo"), "unknown sampler 'plms_typo'"),
    (dict(height=50), "height must be a positive multiple of 8"),
    (dict(width=0), "width must be a positive multiple of 8"),
    (dict(steps=0), "steps must be a positive int"),
    (dict(guidance_rescale=1.5), r"guidance_rescale must be in \[0, 1\]"),
    (dict(latents=np.zeros((1, 4, 4, 4), np.float32), height=64, width=64), r"latents have shape"),
    (dict(negative_prompts=["a", "b"]), "2 negative prompts for 1 prompts"),
])
def test_bad_generate_arguments(bad, match, jaxdiff_pipeline):
    with pytest.raises(ValueError, match=match):
        jaxdiff_pipeline("sd1").generate("a red circle", **bad)


@pytest.mark.parametrize("prompts", [[], None, 3])
def test_bad_prompts(prompts, jaxdiff_pipeline):
    with pytest.raises(ValueError, match="prompts must be a string or a non-empty list"):
        jaxdiff_pipeline("sd1").generate(prompts)


def _copy(src, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(src, dst)
    return dst


def _rewrite_unet(path, edit):
    from jaxdiff.weights.safetensors import read_safetensors, write_safetensors

    f = os.path.join(path, "unet", "diffusion_pytorch_model.safetensors")
    tensors = {k: np.array(v) for k, v in read_safetensors(f).items()}
    edit(tensors)
    write_safetensors(f, tensors)


def test_missing_tensor_is_named(pipeline_dir, tmp_path):
    path = _copy(pipeline_dir("sd1"), tmp_path)
    _rewrite_unet(path, lambda t: t.pop("down_blocks.0.attentions.0.proj_in.weight"))
    with pytest.raises(WeightError, match=r"missing tensor 'down_blocks\.0\.attentions\.0\.proj_in\.weight'"):
        jaxdiff.load(path)


def test_misshaped_and_extra_tensors_are_named(pipeline_dir, tmp_path):
    path = _copy(pipeline_dir("sd1"), tmp_path)

    def edit(t):
        t["conv_in.bias"] = np.zeros(7, np.float32)
        t["mystery.weight"] = np.zeros(3, np.float32)

    _rewrite_unet(path, edit)
    with pytest.raises(WeightError) as err:
        jaxdiff.load(path)
    assert "tensor 'conv_in.bias' has shape (7,), unet expects (32,)" in str(err.value)
    assert "unexpected tensor 'mystery.weight'" in str(err.value)


def test_unet_that_does_not_predict_the_vae_latents_is_named(pipeline_dir, tmp_path):
    path = _copy(pipeline_dir("sd1"), tmp_path)
    config_file = os.path.join(path, "vae", "config.json")
    with open(config_file) as f:
        config = json.load(f)
    with open(config_file, "w") as f:
        json.dump(dict(config, latent_channels=8), f)
    with pytest.raises(ValueError, match=r"predicts 4 latent channels \(unet out_channels\) but the VAE's latents have 8"):
        jaxdiff.load(path)


def test_pickle_weights_are_refused_unless_allowed(pipeline_dir, tmp_path):
    from jaxdiff.weights.safetensors import read_safetensors

    path = _copy(pipeline_dir("sd1"), tmp_path)
    f = os.path.join(path, "vae", "diffusion_pytorch_model.safetensors")
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in read_safetensors(f).items()},
               os.path.join(path, "vae", "diffusion_pytorch_model.bin"))
    os.remove(f)
    with pytest.raises(WeightError, match="pickle"):
        jaxdiff.load(path)
    pipe = jaxdiff.load(path, allow_pickle=True)
    assert pipe.generate("a red circle", height=32, width=32, steps=1).shape == (1, 32, 32, 3)


def test_cli_generate_writes_pngs(pipeline_dir, tmp_path):
    import main
    from PIL import Image

    out = tmp_path / "out"
    rc = main.main(["generate", "a red circle", "--model", pipeline_dir("sd1"), "--steps", "2",
                    "--height", "32", "--width", "48", "--batch", "2", "--sampler", "dpmpp_2m",
                    "--guidance-rescale", "0.7",
                    "--out", str(out)])
    assert rc == 0
    files = sorted(os.listdir(out))
    assert files == ["image_000.png", "image_001.png"]
    assert Image.open(out / files[0]).size == (48, 32)


def test_cli_reports_bad_input_without_traceback(pipeline_dir, tmp_path, capsys):
    import main

    rc = main.main(["generate", "x", "--model", pipeline_dir("sd1"), "--height", "30", "--out", str(tmp_path)])
    assert rc == 2
    assert "height must be a positive multiple of 8" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_programs_are_kept_between_runs(pipeline_dir, tmp_path):
    """The library (`jaxdiff.load`) caches what it compiles under XDG_CACHE_HOME/jaxdiff/xla: a
    `jaxdiff generate` writes the entries and a later Python-API run reads every one;
    JAXDIFF_COMPILE_CACHE=0 and JAX_COMPILATION_CACHE_DIR="" each turn the cache off."""
    import subprocess
    import sys

    from tests.test_parallel import ROOT

    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    cache = tmp_path / "cache" / "jaxdiff" / "xla"

    def generate(env, cli=True):
        cmd = [sys.executable, "main.py", "generate", "a red circle", "--model", pipeline_dir("sd1"),
               "--steps", "2", "--height", "32", "--width", "32", "--out", str(tmp_path / "out")]
        if not cli:
            cmd = [sys.executable, "-c", f"import jaxdiff; jaxdiff.load({pipeline_dir('sd1')!r}).generate("
                   "'a red circle', steps=2, height=32, width=32)"]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
        # entry -> when it was last used: jax writes that time into the entry's "-atime" file on each
        # write and each read (least recently used entries go first when the cache is full).
        return {p.name[:-len("-atime")]: int.from_bytes(p.read_bytes(), "little") for p in cache.glob("*-atime")}

    first = generate(env)
    assert any(name.startswith("jit_generate") for name in first), first
    # The second run read every program the first one wrote. (It may add entries of its own: jax keeps
    # only programs whose compile took over a second, and a small one can cross that line when the
    # machine is loaded.)
    second = generate(env, cli=False)
    assert all(second[name] > used for name, used in first.items()), (first, second)
    env["XDG_CACHE_HOME"] = str(tmp_path / "off")
    generate({**env, "JAXDIFF_COMPILE_CACHE": "0"})
    generate({**env, "JAX_COMPILATION_CACHE_DIR": ""})
    assert not (tmp_path / "off").exists()
