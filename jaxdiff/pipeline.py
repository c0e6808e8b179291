"""Text-to-image: configs + params + one jitted function from token ids to pixels.

Two layers:
- pure functions (`encode_prompt`, `denoise`, `decode`, `generate`) that take a static `Models`
  bundle first and params as arguments, for research code to `jax.jit`, `jax.grad` or `jax.vmap`:

      models, params = pipe.models, pipe.params
      fn = jax.jit(functools.partial(jaxdiff.pipeline.generate, models), static_argnames=("sampler", "guidance"))

- `Pipeline`, which tokenizes on the host, validates input, draws noise and calls one cached jitted
  `generate`. Prompt text, seed and guidance scale are traced values: changing them never recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel, text
from jaxdiff.models import clip
from jaxdiff.models.clip import CLIPTextModel
from jaxdiff.models.unet import UNet2DConditionModel
from jaxdiff.models.vae import AutoencoderKL
from jaxdiff.sampling import denoise as denoise_lib
from jaxdiff.sampling import schedules
from jaxdiff.weights import diffusers as diffusers_io


@dataclasses.dataclass(frozen=True)
class Family:
    """What differs between SD1.x/2.x and SDXL outside the modules themselves."""
    conditioning: text.TextConditioning
    guidance_scale: float  # diffusers' default for the family
    micro_conditioning: bool  # SDXL's add_time_ids (original size, crop, target size)


FAMILIES = {
    "StableDiffusionPipeline": Family(text.TextConditioning(), 7.5, False),
    "StableDiffusionXLPipeline": Family(
        text.TextConditioning(hidden_layer=-2, final_norm=False, pooled=True), 5.0, True),
}

# The sampler that reproduces each diffusers scheduler class, used when the folder names no default.
SAMPLER_FOR_SCHEDULER = {
    "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a", "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m", "PNDMScheduler": "pndm",
}
# Optional in a folder: {"sampler", "steps", "guidance_scale"} and perhaps "guidance_rescale".
JAXDIFF_DEFAULTS_FILE = "jaxdiff.json"
# The default model shipped inside the package (trained on the shapes data set by configs/shapes_*.py).
BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes_model")


def family_of(pipeline_class: str) -> Family:
    # Img2Img/Inpaint variants of a family condition the same way.
    xl = "XL" in pipeline_class
    for name, family in FAMILIES.items():
        if pipeline_class.startswith(name.removesuffix("Pipeline")) and ("XL" in name) == xl:
            return family
    raise ValueError(f"unsupported pipeline class {pipeline_class!r}; jaxdiff loads "
                     f"{', '.join(FAMILIES)} folders")


@dataclasses.dataclass(frozen=True)
class Models:
    """The static half of a pipeline: linen modules and the config numbers the math needs."""
    text_encoders: tuple[CLIPTextModel, ...]
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    family: Family
    prediction_type: str
    scaling_factor: float
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None  # per-channel statistics some SDXL VAEs carry
    latents_std: tuple[float, ...] | None = None
    latent_channels: int = 4
    vae_scale_factor: int = 8  # 2 ** (number of VAE blocks - 1)
    sample_size: tuple[int, int] = (64, 64)  # the U-Net's native latent size


class Conditioning(NamedTuple):
    """What the U-Net is conditioned on for one batch."""
    context: jax.Array  # [B, T, D] token embeddings for cross-attention
    pooled: jax.Array | None = None  # [B, P] SDXL pooled text embedding
    time_ids: jax.Array | None = None  # [B, 6] SDXL original size, crop corner, target size


class GenerateInputs(NamedTuple):
    """Everything `generate` traces: new values of the same shapes reuse the compiled function."""
    ids: tuple[jax.Array, ...]  # per text encoder, [B, 77] int32
    uncond_ids: tuple[jax.Array, ...]
    uncond_keep: jax.Array  # 1.0, or 0.0 to zero the negative embeddings (SDXL, no negative prompt)
    noise: jax.Array  # [B, h, w, C] unit variance
    schedule: schedules.Schedule
    guidance_scale: jax.Array
    guidance_rescale: jax.Array  # 0 = plain classifier-free guidance
    time_ids: jax.Array | None
    key: jax.Array  # for stochastic samplers


def encode_prompt(models: Models, text_params, ids, time_ids=None) -> Conditioning:
    """Token ids (one array per text encoder) -> the U-Net's conditioning."""
    context, pooled = text.encode(models.text_encoders, text_params, ids, models.family.conditioning)
    return Conditioning(context, pooled, time_ids)


def apply_unet(models: Models, unet_params, x, t, cond: Conditioning) -> jax.Array:
    """The U-Net's prediction for latents x [B, h, w, C] at timesteps t [B] under `cond`."""
    added = None if cond.pooled is None else {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    return models.unet.apply({"params": unet_params}, x, t, cond.context, added)


def micro_conditioning_ids(height: int, width: int, batch: int) -> np.ndarray:
    """SDXL's add_time_ids [B, 6]: original size, crop top-left (0, 0), target size, as diffusers'
    pipeline builds them with its defaults."""
    return np.tile(np.float32([height, width, 0, 0, height, width]), (batch, 1))


def _concat(a: Conditioning, b: Conditioning) -> Conditioning:
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


def guided_model(models: Models, unet_params, cond: Conditioning, uncond: Conditioning | None,
                 guidance_scale, guidance_rescale=0.0):
    """model_fn(x_in, t) -> eps or v, with classifier-free guidance when `uncond` is given.

    Guidance mixes the model outputs, as diffusers does; the uncond and cond halves go through the
    U-Net as one batch of 2B. `guidance_rescale` (Lin et al. 2024, sec. 3.4; diffusers'
    `rescale_noise_cfg`) blends the guided output with itself scaled back to the conditional output's
    standard deviation per image: large guidance scales inflate it, which on zero-terminal-SNR
    v-prediction models washes images out.
    """
    both = cond if uncond is None else _concat(uncond, cond)

    def model_fn(x_in, t):
        if uncond is not None:
            x_in = jnp.concatenate([x_in, x_in])
        ts = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_in.shape[0],))
        out = apply_unet(models, unet_params, x_in, ts, both)
        if uncond is None:
            return out
        out_uncond, out_cond = jnp.split(out.astype(jnp.float32), 2)
        guided = out_uncond + guidance_scale * (out_cond - out_uncond)
        axes = tuple(range(1, guided.ndim))
        rescaled = guided * (jnp.std(out_cond, axis=axes, keepdims=True)
                             / jnp.std(guided, axis=axes, keepdims=True))
        # where(), not the blend alone: at 0 a flat guided output (std 0) must not turn into NaN.
        return jnp.where(guidance_rescale > 0,
                         guidance_rescale * rescaled + (1 - guidance_rescale) * guided, guided)

    return model_fn


def denoise(models: Models, unet_params, noise, cond: Conditioning, uncond: Conditioning | None,
            guidance_scale, schedule: schedules.Schedule, sampler: str, key,
            guidance_rescale=0.0) -> jax.Array:
    """Unit noise [B, h, w, C] -> clean latents, by one `lax.scan` over the schedule. (With an
    `schedules.img2img_tail` schedule, `noise` is latents noised to the tail's first sigma.)"""
    model_fn = guided_model(models, unet_params, cond, uncond, guidance_scale, guidance_rescale)
    denoise_fn = denoise_lib.denoiser(model_fn, models.prediction_type)
    return denoise_lib.sample(denoise_fn, noise, schedule, sampler, key)


def decode(models: Models, vae_params, latents) -> jax.Array:
    """Latents -> images [B, H, W, 3] in [0, 1]."""
    latents = unscale_latents(models, latents.astype(jnp.float32))
    images = models.vae.apply({"params": vae_params}, latents, method="decode")
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def posterior(models: Models, vae_params, images) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, 3] in [0, 1] -> (mean, std) of the VAE's posterior, unscaled latents."""
    mean, logvar = models.vae.apply({"params": vae_params}, images * 2 - 1, method="encode")
    return mean, jnp.exp(0.5 * jnp.clip(logvar, -30, 20))


def scale_latents(models: Models, latents) -> jax.Array:
    """VAE latents -> the scaled latents the U-Net works in (`decode` undoes this)."""
    if models.latents_mean is not None:
        return (latents - jnp.asarray(models.latents_mean)) * models.scaling_factor / jnp.asarray(
            models.latents_std)
    return (latents - (models.shift_factor or 0.0)) * models.scaling_factor


def unscale_latents(models: Models, latents) -> jax.Array:
    """The U-Net's scaled latents -> VAE latents (`scale_latents` undone)."""
    if models.latents_mean is not None:
        return latents * jnp.asarray(models.latents_std) / models.scaling_factor + jnp.asarray(
            models.latents_mean)
    return latents / models.scaling_factor + (models.shift_factor or 0.0)


def encode_images(models: Models, vae_params, images, noise=None) -> jax.Array:
    """Images [B, H, W, 3] in [0, 1] -> scaled latents: the posterior mean, or with `noise` (standard
    normal, the latents' shape) the posterior sample mean + std * noise."""
    mean, std = posterior(models, vae_params, images)
    return scale_latents(models, mean if noise is None else mean + std * noise)


def generate(models: Models, params, inputs: GenerateInputs, sampler: str, guidance: bool):
    """Token ids and noise -> images [B, H, W, 3] in [0, 1]: encode, denoise, decode."""
    cond = encode_prompt(models, params["text_encoders"], inputs.ids, inputs.time_ids)
    uncond = None
    if guidance:
        uncond = encode_prompt(models, params["text_encoders"], inputs.uncond_ids, inputs.time_ids)
        keep = inputs.uncond_keep
        uncond = uncond._replace(context=uncond.context * keep,
                                 pooled=None if uncond.pooled is None else uncond.pooled * keep)
    latents = denoise(models, params["unet"], inputs.noise, cond, uncond, inputs.guidance_scale,
                      inputs.schedule, sampler, inputs.key, inputs.guidance_rescale)
    return decode(models, params["vae"], latents)


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
        self._generate = jax.jit(functools.partial(generate, models),
                                 static_argnames=("sampler", "guidance"))

    def __repr__(self):
        return f"Pipeline({self.path!r}, defaults={self.defaults})"

    def default_size(self) -> tuple[int, int]:
        h, w = self.models.sample_size
        return h * self.models.vae_scale_factor, w * self.models.vae_scale_factor

    def prepare(self, prompts, negative_prompts=None, height=None, width=None, steps=None,
                guidance_scale=None, sampler=None, seed=0, latents=None,
                num_images_per_prompt: int = 1,
                guidance_rescale=None) -> tuple[GenerateInputs, str, bool]:
        """Validates and tokenizes on the host: the arguments of `generate` for these settings."""
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
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        batch = len(prompts)

        sampler = sampler or self.defaults["sampler"]
        if sampler not in schedules.SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(schedules.SAMPLER_NAMES)}")
        steps = self.defaults["steps"] if steps is None else steps
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        guidance_scale = self.defaults["guidance_scale"] if guidance_scale is None else float(guidance_scale)
        guidance_rescale = float(self.defaults.get("guidance_rescale", 0.0) if guidance_rescale is None
                                 else guidance_rescale)
        if not 0.0 <= guidance_rescale <= 1.0:  # also refuses NaN
            raise ValueError(f"guidance_rescale must be in [0, 1] (0: off; 0.7 is the paper's value), "
                             f"got {guidance_rescale!r}")

        f = self.models.vae_scale_factor
        c = self.models.latent_channels
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.ndim != 4:
                raise ValueError(f"latents must be NHWC [B, H/{f}, W/{f}, {c}], got shape {latents.shape}")
            height = latents.shape[1] * f if height is None else height
            width = latents.shape[2] * f if width is None else width
        default_h, default_w = self.default_size()
        height = default_h if height is None else height
        width = default_w if width is None else width
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % f:
                raise ValueError(f"{name} must be a positive multiple of {f} (the VAE's downscale "
                                 f"factor), got {v!r}")
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
            time_ids = jnp.asarray(micro_conditioning_ids(height, width, batch))
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
        # diffusers skips the unconditional pass when guidance_scale <= 1.
        return inputs, sampler, guidance_scale > 1.0

    def generate(self, prompts, negative_prompts=None, height=None, width=None, steps=None,
                 guidance_scale=None, sampler=None, seed=0, latents=None,
                 num_images_per_prompt: int = 1, guidance_rescale=None) -> np.ndarray:
        """Images [B, H, W, 3] float32 in [0, 1] for `prompts` (a string or a list).

        `guidance_rescale` in [0, 1] is diffusers' (see `guided_model`); None: the folder's default, or 0.

        `latents`, if given, is unit-variance NHWC noise [B, H/8, W/8, C]; otherwise image i of the
        batch draws its noise from `jax.random.split(jax.random.key(seed), B)[i]`.
        """
        inputs, sampler, guidance = self.prepare(
            prompts, negative_prompts, height, width, steps, guidance_scale, sampler, seed, latents,
            num_images_per_prompt, guidance_rescale)
        n = inputs.noise.shape[0]
        # The pad repeats the last example; it is computed, then dropped.
        size = parallel.pad_batch(n, self.mesh)
        inputs = self._place(inputs._replace(**{k: parallel.pad_rows(getattr(inputs, k), size)
                                                for k in BATCH_FIELDS}))
        images = self._generate(self.params, inputs, sampler=sampler, guidance=guidance)
        return np.asarray(images[:n], np.float32)

    def _place(self, inputs: GenerateInputs) -> GenerateInputs:
        """Batch leaves split over the mesh's batch axes; everything else replicated (each put once)."""
        replicated = parallel.NamedSharding(self.mesh, parallel.P())
        split = lambda x: jax.device_put(x, parallel.batch_sharding(self.mesh, x.ndim))
        whole = lambda x: jax.device_put(x, replicated)
        return GenerateInputs(**{k: jax.tree.map(split if k in BATCH_FIELDS else whole, v)
                                 for k, v in inputs._asdict().items()})


# The fields of GenerateInputs with a leading batch axis.
BATCH_FIELDS = ("ids", "uncond_ids", "noise", "time_ids")


@dataclasses.dataclass(frozen=True)
class PipelineConfigs:
    """The config dicts a pipeline is built from, as its diffusers folder stores them."""
    pipeline_class: str
    unet: dict
    vae: dict
    text_encoders: tuple[dict, ...]
    scheduler: dict
    force_zeros_for_empty_prompt: bool = False


# The diffusers/transformers classes each jaxdiff module reads, with the tensor renaming it needs.
MODULE_FOR_CLASS = {
    "CLIPTextModel": (CLIPTextModel, clip.canonical_state_dict),
    "CLIPTextModelWithProjection": (CLIPTextModel, clip.canonical_state_dict),
    "UNet2DConditionModel": (UNet2DConditionModel, None),
    "AutoencoderKL": (AutoencoderKL, None),
}
TEXT_COMPONENTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def check_latent_channels(configs: PipelineConfigs) -> None:
    """Raises if the U-Net does not predict the VAE's latents. (Not in `build_models`: a VAE or text
    encoder training run carries a placeholder U-Net that never meets the VAE.)"""
    predicted = int(configs.unet.get("out_channels", 4))
    latent = int(configs.vae.get("latent_channels", 4))
    if predicted != latent:
        raise ValueError(f"the U-Net predicts {predicted} latent channels (unet out_channels) but the VAE's "
                         f"latents have {latent} (vae latent_channels); they must be equal")


def build_models(configs: PipelineConfigs, dtype: Any = jnp.float32) -> Models:
    """The linen modules and static numbers of a pipeline, from its configs (no params)."""
    unet_config, vae_config = configs.unet, configs.vae
    optional = lambda key: tuple(vae_config[key]) if vae_config.get(key) is not None else None
    return Models(
        text_encoders=tuple(CLIPTextModel.from_config(c, dtype=dtype) for c in configs.text_encoders),
        unet=UNet2DConditionModel.from_config(unet_config, dtype=dtype),
        vae=AutoencoderKL.from_config(vae_config, dtype=dtype),
        family=family_of(configs.pipeline_class),
        prediction_type=configs.scheduler.get("prediction_type", "epsilon"),
        scaling_factor=float(vae_config.get("scaling_factor", 0.18215)),
        shift_factor=vae_config.get("shift_factor"),
        latents_mean=optional("latents_mean"), latents_std=optional("latents_std"),
        latent_channels=int(unet_config.get("in_channels", 4)),
        vae_scale_factor=2 ** (len(vae_config.get("block_out_channels", (0,) * 4)) - 1),
        sample_size=_pair(unet_config.get("sample_size", 64)))


def param_shapes(module):
    """The params pytree of a linen module as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    return jax.eval_shape(module.init, jax.random.key(0), *module.dummy_inputs())["params"]


def pipeline_param_shapes(models: Models) -> dict:
    """The params pytree of every component as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    return {"text_encoders": tuple(param_shapes(m) for m in models.text_encoders),
            "unet": param_shapes(models.unet), "vae": param_shapes(models.vae)}


def init_params(models: Models, seed: int) -> dict:
    """Random params for every component, for training from scratch (`random_params`)."""
    return random_params(pipeline_param_shapes(models), seed)


def random_params(shapes, seed: int):
    """Random params of the shapes (a pytree of `jax.ShapeDtypeStruct`s), as a PyTorch model of
    them would start.

    PyTorch's default initialisation, which diffusers models are trained from: kernels
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases 0, norm scales 1, embeddings N(0, 0.02) (as CLIP),
    attention pooling's query offset N(0, 1/dim) (as diffusers).
    Drawn with NumPy from the shapes alone, each leaf from a generator seeded by its path, because
    `module.init` would execute (and compile) every op of the forward pass just to create weights.
    """
    def draw(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        shape, kind = leaf.shape, name.rsplit("/", 1)[-1]
        if kind == "kernel":
            bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
            value = rng.uniform(-bound, bound, shape)
        elif kind == "embedding":
            value = rng.normal(0.0, 0.02, shape)
        elif kind == "positional_embedding":  # AttentionPooling's query offset, randn / sqrt(dim)
            value = rng.normal(0.0, shape[-1] ** -0.5, shape)
        elif kind == "scale":
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def default_settings(configs: PipelineConfigs) -> dict:
    """Sampler, steps and guidance a folder generates with unless it names its own."""
    sampler = SAMPLER_FOR_SCHEDULER.get(configs.scheduler.get("_class_name"), "euler")
    if configs.scheduler.get("use_karras_sigmas") and sampler + "_karras" in schedules.SAMPLER_NAMES:
        sampler += "_karras"
    if sampler not in schedules.SAMPLER_NAMES:
        sampler = "euler"
    return {"sampler": sampler, "steps": 50,
            "guidance_scale": family_of(configs.pipeline_class).guidance_scale}


def _component(index: dict, name: str) -> str | None:
    entry = index.get(name)
    return entry[1] if isinstance(entry, (list, tuple)) and entry[1] is not None else None


def read_configs(path: str) -> PipelineConfigs:
    """The configs of a diffusers pipeline folder, checking that jaxdiff reads each component."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    index = diffusers_io.read_json(os.path.join(path, "model_index.json"))
    component_config = lambda name: diffusers_io.read_json(os.path.join(path, name, "config.json"))
    for name in ("unet", "vae") + tuple(e for e, _ in TEXT_COMPONENTS):
        cls = _component(index, name)
        if cls is not None and cls not in MODULE_FOR_CLASS:
            raise ValueError(f"{path}: component {name!r} is a {cls}; jaxdiff reads "
                             f"{', '.join(MODULE_FOR_CLASS)}")
    text_configs = tuple(component_config(e) for e, _ in TEXT_COMPONENTS if _component(index, e))
    if not text_configs:
        raise ValueError(f"{path}: model_index.json names no text encoder")
    configs = PipelineConfigs(
        pipeline_class=index.get("_class_name", ""), unet=component_config("unet"),
        vae=component_config("vae"), text_encoders=text_configs,
        scheduler=diffusers_io.read_json(os.path.join(path, "scheduler", "scheduler_config.json")),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)))
    check_latent_channels(configs)
    return configs


def load(path: str | None = None, *, dtype: Any = jnp.float32, allow_pickle: bool = False) -> Pipeline:
    """Loads a diffusers pipeline folder (SD1.x, SD2.x, SDXL) into a `Pipeline`; with no path,
    the bundled shapes model.

    Every tensor must map onto a parameter of the same shape and every parameter must be filled;
    anything else raises `WeightError` naming the tensor. `dtype` is the compute dtype (params stay
    float32). Pickle weights (`.bin`, `.ckpt`) are refused unless `allow_pickle=True`.
    """
    from transformers import CLIPTokenizer

    if path is None:
        path = BUNDLED_MODEL
        if not os.path.exists(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"the bundled model is missing from {path}; reinstall jaxdiff or "
                                    "pass a model folder")
    configs = read_configs(path)
    models = build_models(configs, dtype)
    index = diffusers_io.read_json(os.path.join(path, "model_index.json"))

    def load_params(name, module):
        rename = MODULE_FOR_CLASS[_component(index, name)][1]
        params = diffusers_io.load_component(os.path.join(path, name), param_shapes(module),
                                             what=name, allow_pickle=allow_pickle, rename=rename)
        return jax.tree.map(jnp.asarray, params)

    present = [(e, t) for e, t in TEXT_COMPONENTS if _component(index, e)]
    params = {"text_encoders": tuple(load_params(e, m) for (e, _), m in zip(present, models.text_encoders)),
              "unet": load_params("unet", models.unet), "vae": load_params("vae", models.vae)}
    tokenizers = [CLIPTokenizer.from_pretrained(os.path.join(path, t)) for _, t in present]
    defaults = default_settings(configs)
    defaults_file = os.path.join(path, JAXDIFF_DEFAULTS_FILE)
    if os.path.exists(defaults_file):
        defaults.update(diffusers_io.read_json(defaults_file))
    return Pipeline(models, params, tokenizers, configs, defaults, path=path)
