"""save_pipeline: exported folders load back bit-identically in jaxdiff and cleanly in diffusers."""

import dataclasses
import logging
import math
import os

import jax
import numpy as np
import pytest
import torch

import jaxdiff
from jaxdiff import components
from jaxdiff.models.params import param_shapes
from jaxdiff.weights import export
from tests.reference import diffusers_scheduler
from tests.tiny_pipelines import make_tokenizer

PROMPTS = ["a red circle to the left of a blue square", "a photo of a cat"]
NEGATIVES = ["a green triangle", ""]
STEPS, GUIDANCE = 3, 5.0
# Advice about optional packages this machine lacks (diffusers: accelerate; transformers 5.24 and
# later: torchvision, for image processors the pipeline does not use): not problems of the folder.
ABSENT_PACKAGE_NOTICES = ("`accelerate` was not found", "requires torchvision (not installed)")


@pytest.fixture
def library_logs(caplog):
    """The WARNING records diffusers and transformers log (their loggers do not propagate by default)."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.enable_propagation()
    caplog.set_level(logging.WARNING)
    yield caplog
    for lib in (diffusers, transformers):
        lib.utils.logging.disable_propagation()


def _diffusers_load(cls_name, path, logs):
    """`cls_name.from_pretrained(path)`, failing on any warning it logs (missing or unexpected keys...)."""
    import diffusers

    logs.clear()
    pipe = getattr(diffusers, cls_name).from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    logged = [r.getMessage() for r in logs.records
              if r.levelno >= logging.WARNING
              and not any(notice in r.getMessage() for notice in ABSENT_PACKAGE_NOTICES)]
    assert not logged, f"diffusers/transformers warned while loading {path}:\n" + "\n".join(logged)
    return pipe


def _diffusers_images(pipe, latents, prompts, negatives):
    """diffusers' images from NHWC `latents` (passed as NCHW), as NumPy NHWC in [0, 1]."""
    with torch.no_grad():
        return pipe(prompt=prompts, negative_prompt=negatives, height=latents.shape[1] * 8,
                    width=latents.shape[2] * 8, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                    output_type="np").images


def _latents(batch, height, width, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, height // 8, width // 8, 4)).astype(np.float32)


def _assert_matches(ours, ref):
    assert 0.02 < ref.std(), "reference images are flat: the comparison would prove nothing"
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)


def _assert_same_params(a, b):
    same = jax.tree.map(lambda x, y: x.dtype == y.dtype and np.array_equal(x, y), a, b)
    assert all(jax.tree.leaves(same))


def _leftovers(path):
    """Hidden staging siblings of `path` that a save left behind."""
    parent, name = os.path.split(path)
    return [n for n in os.listdir(parent) if n.startswith(f".{name}.")]


def test_sd1_round_trip(jaxdiff_pipeline, tmp_path, library_logs):
    pipe = jaxdiff_pipeline("sd1")
    out = str(tmp_path / "sd1")
    export.save(pipe, out)
    latents = _latents(2, 32, 32)
    ours = pipe.generate(PROMPTS, NEGATIVES, steps=STEPS, guidance_scale=GUIDANCE, sampler="ddim",
                         latents=latents)

    reloaded = jaxdiff.load(out)
    _assert_same_params(reloaded.params, pipe.params)
    assert reloaded.defaults == pipe.defaults
    again = reloaded.generate(PROMPTS, NEGATIVES, steps=STEPS, guidance_scale=GUIDANCE, sampler="ddim",
                              latents=latents)
    np.testing.assert_array_equal(again, ours)

    ref_pipe = _diffusers_load("StableDiffusionPipeline", out, library_logs)
    ref_pipe.scheduler = diffusers_scheduler("ddim", dict(ref_pipe.scheduler.config))
    _assert_matches(ours, _diffusers_images(ref_pipe, latents, PROMPTS, NEGATIVES))


def _scratch_configs(tokenizer):
    """Hand-written configs of a tiny SD1-like model, as one would write to train from scratch."""
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, projection_dim=32)
    unet = dict(sample_size=4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                cross_attention_dim=32, attention_head_dim=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = dict(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4,
               sample_size=32, scaling_factor=1.0)
    # No _class_name: the exporter takes DDIMScheduler from the default sampler.
    scheduler = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                     steps_offset=1)
    return components.PipelineConfigs("StableDiffusionPipeline", unet, vae, (text,), scheduler)


def _random_params(models, seed=0):
    """Random params in the pipeline's tree and shapes, with non-zero biases and norm scales (unlike
    `init_params`'s zeros and ones), so that an exported tensor in the wrong place would show."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if path[-1].key == "scale":  # norms near identity, as trained ones are
            return 1 + 0.1 * noise
        fan_in = math.prod(leaf.shape[:-1]) if path[-1].key == "kernel" else 1
        return noise / fan_in ** 0.5

    init = lambda m: jax.tree_util.tree_map_with_path(draw, param_shapes(m))
    return {"text_encoders": tuple(init(m) for m in models.text_encoders),
            "unet": init(models.unet), "vae": init(models.vae)}


@pytest.mark.parametrize("class_name, sampler, expected", [
    (None, "ddim", "DDIMScheduler"),
    # A run's scheduler config names DDIM (configs/common.py); exported with another default sampler,
    # the folder's scheduler is that sampler's, so diffusers draws what jaxdiff's defaults draw.
    ("DDIMScheduler", "dpmpp_2m", "DPMSolverMultistepScheduler"),
    ("DDIMScheduler", "euler_karras", "EulerDiscreteScheduler"),
])
def test_from_scratch_pipeline_loads_in_diffusers(tmp_path, library_logs, class_name, sampler, expected):
    tokenizer = make_tokenizer()
    configs = _scratch_configs(tokenizer)
    if class_name:
        configs = dataclasses.replace(configs, scheduler=dict(configs.scheduler, _class_name=class_name))
    models = components.build_models(configs)
    params = _random_params(models)
    defaults = {"sampler": sampler, "steps": STEPS, "guidance_scale": GUIDANCE}
    out = export.save_pipeline(str(tmp_path / "scratch"), configs, params, [tokenizer], defaults)

    pipe = jaxdiff.Pipeline(models, params, [tokenizer], configs, defaults)
    latents = _latents(2, 32, 32, seed=1)
    ours = pipe.generate(PROMPTS, NEGATIVES, latents=latents)
    ref_pipe = _diffusers_load("StableDiffusionPipeline", out, library_logs)
    assert type(ref_pipe.scheduler).__name__ == expected
    _assert_matches(ours, _diffusers_images(ref_pipe, latents, PROMPTS, NEGATIVES))
    assert jaxdiff.load(out).defaults == defaults


def test_sdxl_round_trip(jaxdiff_pipeline, tmp_path, library_logs):
    pipe = jaxdiff_pipeline("sdxl")
    out = str(tmp_path / "sdxl")
    export.save(pipe, out)
    _assert_same_params(jaxdiff.load(out).params, pipe.params)
    latents = _latents(2, 48, 40)
    # No negative prompt: force_zeros_for_empty_prompt must survive the trip for the images to match.
    ours = pipe.generate(PROMPTS, steps=STEPS, guidance_scale=GUIDANCE, sampler="euler", latents=latents)
    ref_pipe = _diffusers_load("StableDiffusionXLPipeline", out, library_logs)
    assert type(ref_pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    ref_pipe.scheduler = diffusers_scheduler("euler", dict(ref_pipe.scheduler.config))
    _assert_matches(ours, _diffusers_images(ref_pipe, latents, PROMPTS, None))


def test_refuses_to_overwrite_a_non_empty_folder(jaxdiff_pipeline, tmp_path):
    pipe = jaxdiff_pipeline("sd1")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken"):
        export.save(pipe, str(out))
    assert os.listdir(out) == ["notes.txt"] and not _leftovers(str(out))

    # overwrite replaces only a folder an export wrote: never files of someone else's.
    with pytest.raises(FileExistsError, match="notes.txt"):
        export.save(pipe, str(out), overwrite=True)
    assert os.listdir(out) == ["notes.txt"] and not _leftovers(str(out))

    (out / "notes.txt").unlink()
    export.save(pipe, str(out))
    export.save(pipe, str(out), overwrite=True)
    assert (out / "model_index.json").exists() and not _leftovers(str(out))


@pytest.mark.parametrize("where", ["itself", "its parent"])
def test_never_exports_over_its_source(jaxdiff_pipeline, pipeline_dir, tmp_path, where):
    """`jaxdiff export RUN RUN --overwrite` once replaced the run with the export."""
    import shutil

    source = tmp_path / "model"
    shutil.copytree(pipeline_dir("sd1"), source)
    pipe = jaxdiff.load(str(source))
    before = sorted(p.name for p in source.rglob("*"))
    target = source if where == "itself" else tmp_path
    with pytest.raises(FileExistsError, match="model being exported"):
        export.save(pipe, str(target), overwrite=True)
    assert sorted(p.name for p in source.rglob("*")) == before


def test_a_killed_export_leaves_nothing_behind_on_the_next_run(jaxdiff_pipeline, tmp_path):
    pipe = jaxdiff_pipeline("sd1")
    out = tmp_path / "out"
    killed = tmp_path / ".out.partial-deadbeef"  # what an export killed before its rename leaves
    (killed / "unet").mkdir(parents=True)
    export.save(pipe, str(out))
    assert not killed.exists() and not _leftovers(str(out))


@pytest.mark.parametrize("defaults, field", [
    ({"sampler": "euler", "steps": 2, "guidance_scale": float("nan")}, "guidance_scale"),
    ({"sampler": "euler", "steps": 2, "guidance_scale": float("inf")}, "guidance_scale"),
    ({"sampler": "euler", "steps": 0, "guidance_scale": 2.0}, "steps"),
    ({"sampler": "eular", "steps": 2, "guidance_scale": 2.0}, "eular"),
    ({"sampler": "euler", "steps": 2, "guidance_scale": 2.0, "guidance_rescale": float("nan")},
     "guidance_rescale"),
])
def test_refuses_defaults_that_are_not_finite_or_known(jaxdiff_pipeline, tmp_path, defaults, field):
    pipe = jaxdiff_pipeline("sd1")
    with pytest.raises(ValueError, match=field):
        export.save_pipeline(str(tmp_path / "out"), pipe.configs, pipe.params, pipe.tokenizers, defaults)
    assert not os.path.exists(tmp_path / "out")


def test_failed_save_leaves_nothing(jaxdiff_pipeline, tmp_path, monkeypatch):
    pipe = jaxdiff_pipeline("sd1")
    out = str(tmp_path / "crashed")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(pipe.tokenizers[0]), "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        export.save(pipe, out)
    assert not os.path.exists(out) and not _leftovers(out)
