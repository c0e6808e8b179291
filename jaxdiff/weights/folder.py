"""diffusers pipeline folders, read: `model_index.json`, one sub-folder per component, safetensors
weights, and jaxdiff's own `jaxdiff.json` of default settings.

    checkpoint = read_folder(path)   # configs + params + tokenizers + defaults

Reading never unpickles unless asked: `.bin`/`.ckpt` files can run code when loaded, so they are
refused unless `allow_pickle=True`. (`weights.export` writes folders.)
"""

from __future__ import annotations

import dataclasses
import errno
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
from jaxdiff.models import unet as unet_module
from jaxdiff.models import vae as vae_module
from jaxdiff.models.clip import CLIPTextConfig, CLIPTextModel
from jaxdiff.models.config import check_fields
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


def _loop_error(path: str) -> ValueError:
    """The error for a path that hits a symbolic link loop, naming the link that loops (`path` itself,
    or the folder above it that is the loop)."""
    parts = os.path.normpath(path).split(os.sep)
    for i in range(1, len(parts) + 1):
        prefix = os.sep.join(parts[:i]) or os.sep
        try:
            os.stat(prefix)
        except OSError as e:
            if e.errno == errno.ELOOP:
                path = prefix
            break
    return ValueError(f"{path} is a symbolic link loop (it resolves back to itself)")


def exists(path: str) -> bool:
    """`os.path.exists`, except that a symbolic link loop raises (exists() says False for one)."""
    try:
        os.stat(path)
        return True
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _loop_error(path) from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise


def isdir(path: str) -> bool:
    return exists(path) and os.path.isdir(path)


def read_json(path: str, expect: type | None = dict):
    """A JSON file's contents, which must be a JSON object (`expect=dict`); `expect=None` takes any.

    Missing files raise `FileNotFoundError`, bad JSON or the wrong JSON type `ValueError`, each
    naming the file.
    """
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {os.path.basename(path)} in {os.path.dirname(path)}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a JSON file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _loop_error(path) from None
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON: nested too deeply") from None
    if expect is dict and not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got a JSON {_json_type(value)}")
    return value


def _json_type(value) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def write_json(path: str, obj: Mapping) -> None:
    """Writes `obj` as JSON, indented, keys sorted."""
    with open(path, "w") as f:
        json.dump(dict(obj), f, indent=2, sort_keys=True)


def read_component_tensors(folder: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The torch-named tensors of one component folder (`unet/`, `vae/`, `text_encoder/`...)."""
    if not isdir(folder):
        raise FileNotFoundError(f"missing component folder {folder}")
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if exists(path):
            return safetensors.read_safetensors(path)
    for name in SHARD_INDEXES:
        path = os.path.join(folder, name)
        if exists(path):
            return _read_shards(folder, path)
    pickles = [p for p in (os.path.join(folder, n) for n in PICKLE_FILES) if exists(p)]
    pickles += sorted(glob.glob(os.path.join(folder, "*.ckpt")))
    if pickles and not allow_pickle:
        raise WeightError(f"{folder} has only pickle weights ({os.path.basename(pickles[0])}); pickle "
                          "files can run code when loaded. Convert them to safetensors, or pass "
                          "allow_pickle=True if you trust the file.")
    if pickles:
        return safetensors.read_pickle(pickles[0])
    raise WeightError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")


def _read_shards(folder: str, index_path: str) -> dict[str, np.ndarray]:
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(s, str) and s and os.path.basename(s) == s for s in weight_map.values()):
        raise WeightError(f"{index_path}: weight_map must be an object of tensor name to a shard file "
                          f"name in {folder}")
    tensors, origin = {}, {}
    for shard in sorted(set(weight_map.values())):
        if not exists(os.path.join(folder, shard)):
            raise FileNotFoundError(f"{index_path} names the shard {shard}, which is missing from {folder}")
        for name, array in safetensors.read_safetensors(os.path.join(folder, shard)).items():
            if name in tensors:
                raise WeightError(f"{folder}: tensor {name!r} is in two shards, {origin[name]} and {shard}")
            tensors[name], origin[name] = array, shard
    return tensors


def check_finite(tensors: Mapping[str, np.ndarray], where: str) -> None:
    """Raises `WeightError` naming the first floating tensor that holds NaN or infinite values.

    One float64 sum per tensor (no temporary the size of the tensor): a NaN or inf anywhere makes
    it non-finite. Only then is the exact count made (and a float64 overflow of finite values told
    apart).
    """
    for name, array in tensors.items():
        array = np.asarray(array)
        if array.dtype not in safetensors.FLOAT_DTYPES or not array.size:
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.sum(array, dtype=np.float64)):
                continue
        values = array.astype(np.float32) if array.dtype.itemsize < 4 else array
        nan = int(np.count_nonzero(np.isnan(values)))
        inf = int(np.count_nonzero(np.isinf(values)))
        if nan or inf:
            counts = " and ".join(f"{n} {kind} value{'s' if n != 1 else ''}"
                                  for n, kind in ((nan, "NaN"), (inf, "infinite")) if n)
            raise WeightError(f"{where}: tensor {name!r} has {counts}")


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
    check_finite(tensors, folder)
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


# The model_index.json entries jaxdiff reads, each a [library, class] pair.
INDEX_COMPONENTS = ("unet", "vae", "scheduler") + tuple(n for pair in TEXT_COMPONENTS for n in pair)
INDEX_EXAMPLES = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                  "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                  "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
# Each component's config defaults (what its fields' types are checked against) and class name.
CONFIG_DEFAULTS = {
    "UNet2DConditionModel": unet_module.DEFAULTS,
    "AutoencoderKL": vae_module.DEFAULTS,
    "CLIPTextModel": {f.name: f.default for f in dataclasses.fields(CLIPTextConfig)},
}


def check_index(index: dict, where: str) -> None:
    """Raises `ValueError` naming the field of a model_index.json of the wrong type."""
    for field in ("_class_name",):
        if field in index and not isinstance(index[field], str):
            raise ValueError(f"{where}: {field} must be a string, got {index[field]!r}")
    if "force_zeros_for_empty_prompt" in index and not isinstance(index["force_zeros_for_empty_prompt"], bool):
        raise ValueError(f"{where}: force_zeros_for_empty_prompt must be true or false, got "
                         f"{index['force_zeros_for_empty_prompt']!r}")
    for name in INDEX_COMPONENTS:
        entry = index.get(name)
        if entry is not None and not (isinstance(entry, list) and len(entry) == 2 and all(
                v is None or isinstance(v, str) for v in entry)):
            raise ValueError(f"{where}: {name!r} must be a [library, class] list such as "
                             f"{json.dumps(INDEX_EXAMPLES[name.removesuffix('_2')])}, got {entry!r}")
    for name in ("unet", "vae"):
        if _component(index, name) is None:
            raise ValueError(f"{where}: names no {name} (expected e.g. \"{name}\": "
                             f"{json.dumps(INDEX_EXAMPLES[name])})")


def read_component_config(path: str, name: str, cls: str) -> dict:
    """`<path>/<name>/config.json`, its fields' types checked against the defaults of `cls`'s module
    (`ValueError` naming the file and the field); integral floats in int fields come back as ints."""
    file = os.path.join(path, name, "config.json")
    config = read_json(file)
    module_class = "CLIPTextModel" if cls in ("CLIPTextModel", "CLIPTextModelWithProjection") else cls
    return {**config, **check_fields(config, CONFIG_DEFAULTS[module_class], file, cls=module_class)}


def read_configs(path: str) -> PipelineConfigs:
    """The configs of a diffusers pipeline folder, checking that jaxdiff reads each component."""
    if not isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    index_file = os.path.join(path, "model_index.json")
    index = read_json(index_file)
    check_index(index, index_file)
    for name in ("unet", "vae") + tuple(e for e, _ in TEXT_COMPONENTS):
        cls = _component(index, name)
        if cls is not None and cls not in MODULE_FOR_CLASS:
            raise ValueError(f"{path}: component {name!r} is a {cls}; jaxdiff reads "
                             f"{', '.join(MODULE_FOR_CLASS)}")
    text_configs = tuple(read_component_config(path, e, _component(index, e))
                         for e, _ in TEXT_COMPONENTS if _component(index, e))
    if not text_configs:
        raise ValueError(f"{path}: model_index.json names no text encoder")
    scheduler_file = os.path.join(path, "scheduler", "scheduler_config.json")
    scheduler = read_json(scheduler_file)
    if "_class_name" in scheduler and not isinstance(scheduler["_class_name"], str):
        raise ValueError(f"{scheduler_file}: _class_name must be a string, got {scheduler['_class_name']!r}")
    configs = PipelineConfigs(
        pipeline_class=index.get("_class_name", ""),
        unet=read_component_config(path, "unet", _component(index, "unet")),
        vae=read_component_config(path, "vae", _component(index, "vae")), text_encoders=text_configs,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)))
    components.check_latent_channels(configs)
    return configs


# A tokenizer folder holds tokenizer.json (a fast tokenizer) or vocab.json and merges.txt (BPE files).
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def check_tokenizer_folder(folder: str) -> None:
    """Raises `FileNotFoundError` naming a missing tokenizer folder or its missing vocabulary files."""
    if not isdir(folder):
        raise FileNotFoundError(f"missing tokenizer folder {folder}")
    if not any(all(exists(os.path.join(folder, f)) for f in files) for files in TOKENIZER_FILES):
        raise FileNotFoundError(f"tokenizer folder {folder} has no vocabulary: expected tokenizer.json, "
                                "or vocab.json and merges.txt")


def read_tokenizer(folder: str):
    """The CLIP tokenizer saved in `folder`, read locally only (never a hub lookup)."""
    from transformers import CLIPTokenizer

    check_tokenizer_folder(folder)
    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers/tokenizers raise many types (OSError, ValueError, Exception)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"tokenizer folder {folder} cannot be read: {first_line}") from e


def read_folder(path: str, *, allow_pickle: bool = False, param_dtype=jnp.float32) -> Checkpoint:
    """A diffusers pipeline folder (SD1.x, SD2.x, SDXL): its configs, params, tokenizers and defaults.

    Every tensor must map onto a parameter of the same shape and every parameter must be filled;
    anything else raises `WeightError` naming the tensor. Pickle weights (`.bin`, `.ckpt`) are
    refused unless `allow_pickle=True`. Floating params come back in `param_dtype`: a half dtype
    reads fp16/bf16 files without a float32 copy on the host (and halves the params' memory).
    """
    configs = read_configs(path)
    index = read_json(os.path.join(path, "model_index.json"))
    present = [(e, t) for e, t in TEXT_COMPONENTS if _component(index, e)]
    for _, t in present:  # before the weights: a missing tokenizer should not wait for them
        check_tokenizer_folder(os.path.join(path, t))
    models = components.build_models(configs)  # float32 modules: only their param shapes are used

    def load_params(name, module):
        rename = MODULE_FOR_CLASS[_component(index, name)][1]
        shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype)
                              if jnp.issubdtype(s.dtype, jnp.floating) else s, param_shapes(module))
        params = load_component(os.path.join(path, name), shapes,
                                what=name, allow_pickle=allow_pickle, rename=rename)
        return jax.tree.map(jnp.asarray, params)

    params = {"text_encoders": tuple(load_params(e, m) for (e, _), m in zip(present, models.text_encoders)),
              "unet": load_params("unet", models.unet), "vae": load_params("vae", models.vae)}
    tokenizers = tuple(read_tokenizer(os.path.join(path, t)) for _, t in present)
    defaults = default_settings(configs)
    defaults_file = os.path.join(path, JAXDIFF_DEFAULTS_FILE)
    if exists(defaults_file):
        defaults.update(read_json(defaults_file))
    return Checkpoint(configs, params, tokenizers, defaults)
