"""The static half of a pipeline: which family it is, its config dicts, and the linen modules and
numbers built from them. No params, no weights files: `weights/` fills params in, `sample` runs them.

    configs = PipelineConfigs(...)          # as a diffusers folder stores them (weights.folder reads one)
    models = build_models(configs)          # modules + the numbers the math needs
    params = init_params(models, seed=0)    # random, for training from scratch
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxdiff import text
from jaxdiff.models.clip import CLIPTextModel
from jaxdiff.models.params import param_shapes, random_params
from jaxdiff.models.unet import UNet2DConditionModel
from jaxdiff.models.vae import AutoencoderKL


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


def family_of(pipeline_class: str) -> Family:
    # Img2Img/Inpaint variants of a family condition the same way.
    xl = "XL" in pipeline_class
    for name, family in FAMILIES.items():
        if pipeline_class.startswith(name.removesuffix("Pipeline")) and ("XL" in name) == xl:
            return family
    raise ValueError(f"unsupported pipeline class {pipeline_class!r}; jaxdiff loads "
                     f"{', '.join(FAMILIES)} folders")


@dataclasses.dataclass(frozen=True)
class PipelineConfigs:
    """The config dicts a pipeline is built from, as its diffusers folder stores them."""
    pipeline_class: str
    unet: dict
    vae: dict
    text_encoders: tuple[dict, ...]
    scheduler: dict
    force_zeros_for_empty_prompt: bool = False


def check_latent_channels(configs: PipelineConfigs) -> None:
    """Raises if the U-Net does not predict the VAE's latents. (Not in `build_models`: a VAE or text
    encoder training run carries a placeholder U-Net that never meets the VAE.)"""
    predicted = int(configs.unet.get("out_channels", 4))
    latent = int(configs.vae.get("latent_channels", 4))
    if predicted != latent:
        raise ValueError(f"the U-Net predicts {predicted} latent channels (unet out_channels) but the VAE's "
                         f"latents have {latent} (vae latent_channels); they must be equal")


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


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


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


def pipeline_param_shapes(models: Models) -> dict:
    """The params pytree of every component as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    return {"text_encoders": tuple(param_shapes(m) for m in models.text_encoders),
            "unet": param_shapes(models.unet), "vae": param_shapes(models.vae)}


def init_params(models: Models, seed: int) -> dict:
    """Random params for every component, for training from scratch (`random_params`)."""
    return random_params(pipeline_param_shapes(models), seed)
