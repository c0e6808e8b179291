"""diffusers pipeline folders, read: `model_index.json`, one sub-folder per component, safetensors
weights, and jaxdiff's own `jaxdiff.json` of default settings.

    checkpoint = read_folder(path)   # configs + params + tokenizers + defaults

Reading never unpickles unless asked: `.bin`/`.ckpt` files can run code when loaded, so they are
refused unless `allow_pickle=True`. (`weights.export` writes folders.)
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import components
from jaxdiff.components import PipelineConfigs
from jaxdiff.models import clip
from jaxdiff.models.clip import CLIPTextModel
from jaxdiff.models.params import param_shapes
from jaxdiff.models.unet import UNet2DConditionModel
from jaxdiff.models.vae import AutoencoderKL
from jaxdiff.sampling import schedules
from jaxdiff.weights import safetensors
from jaxdiff.weights.convert import WeightError, load_state_dict

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
SHARD_INDEXES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
PICKLE_FILES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
# Older diffusers checkpoints name the VAE's mid-block attention like this; diffusers renames on load.
LEGACY_RENAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.",
                  ".proj_attn.": ".to_out.0."}
# Buffers that transformers saves beside the weights in some versions.
IGNORED_TENSORS = (r"\.position_ids$",)


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {os.path.basename(path)} in {os.path.dirname(path)}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def write_json(path: str, obj: Mapping) -> None:
    """Writes `obj` as JSON, indented, keys sorted."""
    with open(path, "w") as f:
        json.dump(dict(obj), f, indent=2, sort_keys=True)


def read_component_tensors(folder: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The torch-named tensors of one component folder (`unet/`, `vae/`, `text_encoder/`...)."""
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return safetensors.read_safetensors(path)
    for name in SHARD_INDEXES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            tensors = {}
            for shard in sorted(set(read_json(path)["weight_map"].values())):
                tensors.update(safetensors.read_safetensors(os.path.join(folder, shard)))
            return tensors
    pickles = [p for p in (os.path.join(folder, n) for n in PICKLE_FILES) if os.path.exists(p)]
    pickles += sorted(glob.glob(os.path.join(folder, "*.ckpt")))
    if pickles and not allow_pickle:
        raise WeightError(f"{folder} has only pickle weights ({os.path.basename(pickles[0])}); pickle "
                          "files can run code when loaded. Convert them to safetensors, or pass "
                          "allow_pickle=True if you trust the file.")
    if pickles:
        return safetensors.read_pickle(pickles[0])
    raise WeightError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")


def _rename_legacy(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in tensors.items():
        for old, new in LEGACY_RENAMES.items():
            name = name.replace(old, new)
        out[name] = value
    return out


def load_component(folder: str, shapes, what: str, allow_pickle: bool = False,
                   rename=None) -> dict:
    """Reads a component folder into a params pytree with exactly the shapes of `shapes`.

    `rename`, if given, maps the folder's tensor dict to canonical names first (a model whose
    library saves it under more than one naming).
    """
    tensors = _rename_legacy(read_component_tensors(folder, allow_pickle))
    if rename is not None:
        tensors = rename(tensors)
    return load_state_dict(tensors, shapes, what=what, ignore=IGNORED_TENSORS)


# The diffusers/transformers classes each jaxdiff module reads, with the tensor renaming it needs.
MODULE_FOR_CLASS = {
    "CLIPTextModel": (CLIPTextModel, clip.canonical_state_dict),
    "CLIPTextModelWithProjection": (CLIPTextModel, clip.canonical_state_dict),
    "UNet2DConditionModel": (UNet2DConditionModel, None),
    "AutoencoderKL": (AutoencoderKL, None),
}
# (text encoder, its tokenizer) sub-folders, in the order the family concatenates them.
TEXT_COMPONENTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
# Optional in a folder: {"sampler", "steps", "guidance_scale"} and perhaps "guidance_rescale".
JAXDIFF_DEFAULTS_FILE = "jaxdiff.json"
# The sampler that reproduces each diffusers scheduler class, used when the folder names no default.
SAMPLER_FOR_SCHEDULER = {
    "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a", "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m", "PNDMScheduler": "pndm",
}


class Checkpoint(NamedTuple):
    """Everything a pipeline folder holds: what `pipeline.Pipeline` is built from."""
    configs: PipelineConfigs
    params: dict  # {"text_encoders": (...), "unet": ..., "vae": ...}, float32
    tokenizers: tuple
    defaults: dict  # sampler, steps, guidance_scale (and perhaps guidance_rescale)


def default_settings(configs: PipelineConfigs) -> dict:
    """Sampler, steps and guidance a folder generates with unless it names its own."""
    sampler = SAMPLER_FOR_SCHEDULER.get(configs.scheduler.get("_class_name"), "euler")
    if configs.scheduler.get("use_karras_sigmas") and sampler + "_karras" in schedules.SAMPLER_NAMES:
        sampler += "_karras"
    if sampler not in schedules.SAMPLER_NAMES:
        sampler = "euler"
    return {"sampler": sampler, "steps": 50,
            "guidance_scale": components.family_of(configs.pipeline_class).guidance_scale}


def _component(index: dict, name: str) -> str | None:
    entry = index.get(name)
    return entry[1] if isinstance(entry, (list, tuple)) and entry[1] is not None else None


def read_configs(path: str) -> PipelineConfigs:
    """The configs of a diffusers pipeline folder, checking that jaxdiff reads each component."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    index = read_json(os.path.join(path, "model_index.json"))
    component_config = lambda name: read_json(os.path.join(path, name, "config.json"))
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
        scheduler=read_json(os.path.join(path, "scheduler", "scheduler_config.json")),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)))
    components.check_latent_channels(configs)
    return configs


def read_folder(path: str, *, allow_pickle: bool = False) -> Checkpoint:
    """A diffusers pipeline folder (SD1.x, SD2.x, SDXL): its configs, params, tokenizers and defaults.

    Every tensor must map onto a parameter of the same shape and every parameter must be filled;
    anything else raises `WeightError` naming the tensor. Pickle weights (`.bin`, `.ckpt`) are
    refused unless `allow_pickle=True`.
    """
    from transformers import CLIPTokenizer

    configs = read_configs(path)
    models = components.build_models(configs)  # float32 modules: only their param shapes are used
    index = read_json(os.path.join(path, "model_index.json"))

    def load_params(name, module):
        rename = MODULE_FOR_CLASS[_component(index, name)][1]
        params = load_component(os.path.join(path, name), param_shapes(module),
                                what=name, allow_pickle=allow_pickle, rename=rename)
        return jax.tree.map(jnp.asarray, params)

    present = [(e, t) for e, t in TEXT_COMPONENTS if _component(index, e)]
    params = {"text_encoders": tuple(load_params(e, m) for (e, _), m in zip(present, models.text_encoders)),
              "unet": load_params("unet", models.unet), "vae": load_params("vae", models.vae)}
    tokenizers = tuple(CLIPTokenizer.from_pretrained(os.path.join(path, t)) for _, t in present)
    defaults = default_settings(configs)
    defaults_file = os.path.join(path, JAXDIFF_DEFAULTS_FILE)
    if os.path.exists(defaults_file):
        defaults.update(read_json(defaults_file))
    return Checkpoint(configs, params, tokenizers, defaults)
