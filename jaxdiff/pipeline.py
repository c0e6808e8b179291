"""`Pipeline`: a loaded model that turns prompts into images, and `load`, which makes one.

    pipe = jaxdiff.load(path)                      # a diffusers folder; none: the bundled model
    images = pipe.generate("a red circle", seed=0)  # NumPy [B, H, W, 3] in [0, 1]

The host-side half of generation: validating arguments, tokenizing, drawing noise, placing every
input on the device mesh, and calling one cached, jitted `sample.generate`. Prompt text, seed and
guidance scale are traced values: changing them never recompiles. The math itself is in `sample`.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import compile_cache, components, limits, parallel, sample, text
from jaxdiff import images as images_lib
from jaxdiff.components import Models, PipelineConfigs
from jaxdiff.sample import GenerateInputs
from jaxdiff.sampling import schedules
from jaxdiff.weights import folder


# The default model shipped inside the package (trained on the shapes data set by configs/shapes_*.py).
BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes_model")
# The functional layer under the names jaxdiff 0.1.0 documented (`jaxdiff.pipeline.generate`, ...);
# `jaxdiff.sample` is their home.
encode_prompt, denoise, decode, generate = sample.encode_prompt, sample.denoise, sample.decode, sample.generate
# The fields of GenerateInputs with a leading batch axis.
BATCH_FIELDS = ("ids", "uncond_ids", "noise", "time_ids")
SEED_RANGE = (-2 ** 63, 2 ** 63)  # what jax.random.key takes


class NonFiniteImageError(ValueError):
    """A generation gave NaN or infinite pixels (a model's weights or an input out of range)."""


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ValueError(f"seed must be in [-2**63, 2**63), got {seed}")
    return int(seed)


def check_finite_number(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_finite_images(images: np.ndarray) -> np.ndarray:
    """Raises `NonFiniteImageError` naming the images [B, H, W, 3] that hold NaN or inf pixels."""
    bad = images_lib.non_finite(images)
    if bad:
        raise NonFiniteImageError(
            f"image(s) {', '.join(map(str, bad))} of {len(images)} came out NaN or infinite: the model "
            "diverged on these inputs (NaN weights, extreme latents or guidance); nothing was written")
    return images


class Pipeline:
    """A loaded model: `generate(prompts, ...)` returns NumPy images [B, H, W, 3] in [0, 1]."""

    def __init__(self, models: Models, params, tokenizers, configs: PipelineConfigs,
                 defaults: dict, path: str | None = None):
        self.models = models
        # Sampling spreads the batch over every device; params are placed by the one sharding rule.
        self.mesh = parallel.make_mesh(data=-1, fsdp=1)
        self.params = parallel.reshard(params, parallel.shardings_for(params, self.mesh))
        self.tokenizers = tuple(tokenizers)
        self.configs = configs
        self.defaults = dict(defaults)
        self.path = path
        self._generate = jax.jit(functools.partial(sample.generate, models),
                                 static_argnames=("sampler", "guidance"))

    def __repr__(self):
        return f"Pipeline({self.path!r}, defaults={self.defaults})"

    def default_size(self) -> tuple[int, int]:
        h, w = self.models.sample_size
        return h * self.models.vae_scale_factor, w * self.models.vae_scale_factor

    def prepare(self, prompts, negative_prompts=None, height=None, width=None, steps=None,
                guidance_scale=None, sampler=None, seed=0, latents=None,
                num_images_per_prompt: int = 1, guidance_rescale=None,
                max_pixels: int | None = limits.DEFAULT_MAX_PIXELS) -> tuple[GenerateInputs, str, bool]:
        """Validates and tokenizes on the host: the arguments of `generate` for these settings."""
        seed = check_seed(seed)
        prompts = text.as_prompt_list(prompts)
        if negative_prompts is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompts, str):
            negatives = [negative_prompts] * len(prompts)
        else:
            negatives = text.as_prompt_list(negative_prompts, "negative_prompts")
            if len(negatives) != len(prompts):
                raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; "
                                 "give one per prompt, a single string, or None")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        if len(prompts) * num_images_per_prompt > limits.MAX_BATCH:
            raise ValueError(f"{len(prompts)} prompt(s) x num_images_per_prompt={num_images_per_prompt} is "
                             f"over the cap of {limits.MAX_BATCH} images a request; split it")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        batch = len(prompts)

        sampler = sampler or self.defaults["sampler"]
        if sampler not in schedules.SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(schedules.SAMPLER_NAMES)}")
        steps = self.defaults["steps"] if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        guidance_scale = check_finite_number(
            "guidance_scale", self.defaults["guidance_scale"] if guidance_scale is None else guidance_scale)
        guidance_rescale = check_finite_number(
            "guidance_rescale",
            self.defaults.get("guidance_rescale", 0.0) if guidance_rescale is None else guidance_rescale)
        if not 0.0 <= guidance_rescale <= 1.0:  # also refuses NaN
            raise ValueError(f"guidance_rescale must be in [0, 1] (0: off; 0.7 is the paper's value), "
                             f"got {guidance_rescale!r}")

        f = self.models.vae_scale_factor
        c = self.models.latent_channels
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.ndim != 4:
                raise ValueError(f"latents must be NHWC [B, H/{f}, W/{f}, {c}], got shape {latents.shape}")
            if not np.isfinite(latents).all():
                raise ValueError(f"latents hold {int(np.size(latents) - np.isfinite(latents).sum())} NaN or "
                                 "infinite values; give finite unit-variance noise")
            height = latents.shape[1] * f if height is None else height
            width = latents.shape[2] * f if width is None else width
        default_h, default_w = self.default_size()
        height = default_h if height is None else height
        width = default_w if width is None else width
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v % f:
                raise ValueError(f"{name} must be a positive multiple of {f} (the VAE's downscale "
                                 f"factor), got {v!r}")
        height, width = int(height), int(width)
        # diffusers skips the unconditional pass when guidance_scale <= 1.
        guidance = guidance_scale > 1.0
        limits.check_request(self.configs, batch, height, width, guidance, self.mesh.size, max_pixels)
        shape = (batch, height // f, width // f, c)
        if latents is None:
            keys = jax.random.split(jax.random.key(seed), batch)
            noise = jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(keys)
        elif latents.shape != shape:
            raise ValueError(f"latents have shape {latents.shape}, expected {shape} (NHWC) for "
                             f"{batch} image(s) of {height}x{width}")
        else:
            noise = jnp.asarray(latents)

        time_ids = None
        if self.models.family.micro_conditioning:
            time_ids = jnp.asarray(sample.micro_conditioning_ids(height, width, batch))
        zero_uncond = negative_prompts is None and self.configs.force_zeros_for_empty_prompt
        inputs = GenerateInputs(
            ids=tuple(jnp.asarray(text.tokenize(t, prompts)) for t in self.tokenizers),
            uncond_ids=tuple(jnp.asarray(text.tokenize(t, negatives)) for t in self.tokenizers),
            uncond_keep=jnp.float32(0.0 if zero_uncond else 1.0),
            noise=noise,
            schedule=schedules.make_schedule(sampler, self.configs.scheduler, int(steps)),
            guidance_scale=jnp.float32(guidance_scale),
            guidance_rescale=jnp.float32(guidance_rescale),
            time_ids=time_ids,
            key=jax.random.fold_in(jax.random.key(seed), 1),
        )
        return inputs, sampler, guidance

    def generate(self, prompts, negative_prompts=None, height=None, width=None, steps=None,
                 guidance_scale=None, sampler=None, seed=0, latents=None,
                 num_images_per_prompt: int = 1, guidance_rescale=None,
                 max_pixels: int | None = limits.DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Images [B, H, W, 3] float32 in [0, 1] for `prompts` (a string or a list).

        Bad arguments raise ValueError naming them (an unknown sampler, a size not divisible by 8, a
        non-finite guidance scale, a request over `max_pixels` per image or too big for the device's
        memory); images that come out NaN raise `NonFiniteImageError` naming them.

        `guidance_rescale` in [0, 1] is diffusers' (see `sample.guided_model`); None: the folder's default, or 0.

        `latents`, if given, is unit-variance NHWC noise [B, H/8, W/8, C]; otherwise image i of the
        batch draws its noise from `jax.random.split(jax.random.key(seed), B)[i]`.
        """
        inputs, sampler, guidance = self.prepare(
            prompts, negative_prompts, height, width, steps, guidance_scale, sampler, seed, latents,
            num_images_per_prompt, guidance_rescale, max_pixels)
        n = inputs.noise.shape[0]
        # The pad repeats the last example; it is computed, then dropped.
        size = parallel.pad_batch(n, self.mesh)
        inputs = self._place(inputs._replace(**{k: parallel.pad_rows(getattr(inputs, k), size)
                                                for k in BATCH_FIELDS}))
        images = self._generate(self.params, inputs, sampler=sampler, guidance=guidance)
        return check_finite_images(np.asarray(images[:n], np.float32))

    def _place(self, inputs: GenerateInputs) -> GenerateInputs:
        """Batch leaves split over the mesh's batch axes; everything else replicated (each put once)."""
        replicated = parallel.replicated(self.mesh)
        split = lambda x: jax.device_put(x, parallel.batch_sharding(self.mesh, x.ndim))
        whole = lambda x: jax.device_put(x, replicated)
        return GenerateInputs(**{k: jax.tree.map(split if k in BATCH_FIELDS else whole, v)
                                 for k, v in inputs._asdict().items()})


def load(path: str | None = None, *, dtype: Any = jnp.float32, allow_pickle: bool = False) -> Pipeline:
    """Loads a diffusers pipeline folder (SD1.x, SD2.x, SDXL) into a `Pipeline`; with no path,
    the bundled shapes model.

    Every tensor must map onto a parameter of the same shape and every parameter must be filled;
    anything else raises `WeightError` naming the tensor. `dtype` is the compute dtype: with
    `jnp.bfloat16` the models run and keep their params in it (`jnp.float16` computes in it from
    float32 params), while the sampler's arithmetic and the decoded images stay float32. Pickle weights (`.bin`, `.ckpt`) are refused unless `allow_pickle=True`. Turns on the
    persistent compilation cache (`compile_cache`; JAXDIFF_COMPILE_CACHE=0 opts out).
    """
    if path is None:
        path = BUNDLED_MODEL
        if not os.path.exists(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"the bundled model is missing from {path}; reinstall jaxdiff or "
                                    "pass a model folder")
    compile_cache.enable()
    # bf16 compute keeps bf16 params (no float32 copy of a half checkpoint, half the memory); not
    # float16, whose range would turn large float32 weights into inf.
    bf16 = jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16)
    checkpoint = folder.read_folder(path, allow_pickle=allow_pickle,
                                    param_dtype=jnp.bfloat16 if bf16 else jnp.float32)
    models = components.build_models(checkpoint.configs, dtype)
    return Pipeline(models, checkpoint.params, checkpoint.tokenizers, checkpoint.configs,
                    checkpoint.defaults, path=path)
