"""Writing a pipeline back out as a diffusers folder that diffusers, transformers and jaxdiff all load.

    jaxdiff.weights.export.save(pipe, "out/my-model")                  # a loaded or trained Pipeline
    save_pipeline("out/my-model", configs, params, tokenizers, defaults)  # the parts, e.g. from training

Configs read from a folder keep every field they had; hand-written ones (a model trained from
scratch) get what the libraries need to load them: class names, versions, the text encoders'
`architectures`/`model_type` and token ids. Weights are float32 safetensors under the torch names,
text encoders under the hub's `text_model.` prefix, which every transformers version loads.

The folder is written into a hidden sibling and renamed into place at the end, so a crash leaves
no half-written model at `path` (and the next export to `path` removes what a killed one left). A
non-empty `path` is only replaced with `overwrite=True`, and only when it is a pipeline folder that
an export wrote: never a training run, the model being exported, or a folder holding it.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import math
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence

import numpy as np
from flax import traverse_util

from jaxdiff import components
from jaxdiff.components import Models, PipelineConfigs
from jaxdiff.models import clip
from jaxdiff.models.params import param_shapes
from jaxdiff.sampling import schedules
from jaxdiff.weights import safetensors
from jaxdiff.weights.convert import WeightError, to_state_dict
from jaxdiff.weights.folder import JAXDIFF_DEFAULTS_FILE, TEXT_COMPONENTS, write_json

# Written when the library that would read a field is not installed here.
FALLBACK_VERSIONS = {"diffusers": "0.30.0", "transformers": "4.44.0"}
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "model.safetensors"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return FALLBACK_VERSIONS[package]


def _is_xl(pipeline_class: str) -> bool:
    return components.family_of(pipeline_class) is components.FAMILIES["StableDiffusionXLPipeline"]


def save_component(folder: str, config: Mapping, params, weights_name: str) -> None:
    """Writes `config.json` and the params as torch-named float32 safetensors."""
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"), config)
    tensors = {k: np.asarray(v, np.float32) for k, v in to_state_dict(params).items()}
    safetensors.write_safetensors(os.path.join(folder, weights_name), tensors)


def diffusers_config(config: Mapping, class_name: str) -> dict:
    """A unet/vae config with the bookkeeping diffusers reads (the folder's own values win)."""
    return {"_diffusers_version": _version("diffusers"), **config, "_class_name": class_name}


def text_encoder_class(model: clip.CLIPTextModel) -> str:
    return "CLIPTextModelWithProjection" if model.with_projection else "CLIPTextModel"


def text_encoder_config(config: Mapping, model: clip.CLIPTextModel, tokenizer) -> dict:
    """A transformers `CLIPTextConfig` dict that builds the same model as `model`."""
    # Every field the forward pass reads, explicit, so transformers' defaults cannot differ from ours.
    resolved = dataclasses.asdict(model.config)
    # bos/pad ids are not read by the forward pass, but transformers warns when they lie outside the
    # vocabulary (its defaults do, for a small from-scratch vocabulary). eos_token_id is left as the
    # model computed with: it chooses the pooled token.
    token_ids = {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return {"transformers_version": _version("transformers"), **token_ids, **config, **resolved,
            "architectures": [text_encoder_class(model)], "model_type": "clip_text_model",
            # transformers >= 4.56 reads `dtype`, older versions `torch_dtype`; weights are float32.
            "dtype": "float32", "torch_dtype": "float32"}


def scheduler_config(config: Mapping, defaults: Mapping | None) -> dict:
    """The scheduler config with the diffusers class of the default sampler (and the settings that
    sampler fixes), so that diffusers, which samples with the folder's scheduler, draws what
    jaxdiff's defaults draw; with no default sampler the config must name its class."""
    config = dict(config)
    sampler = (defaults or {}).get("sampler")
    if sampler is not None:
        class_name, overrides = schedules.counterpart(sampler)
        config = {**config, **overrides, "_class_name": class_name}
    elif "_class_name" not in config:
        raise ValueError("the scheduler config has no _class_name (e.g. 'DDIMScheduler') and no "
                         "default sampler to take one from")
    return {"_diffusers_version": _version("diffusers"), **config}


def model_index(configs: PipelineConfigs, text_classes: Sequence[str],
                tokenizers: Sequence, scheduler_class: str) -> dict:
    """`model_index.json`: the pipeline class and the library and class of every component."""
    index = {"_class_name": configs.pipeline_class, "_diffusers_version": _version("diffusers"),
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", scheduler_class],
             # Optional components this pipeline does not have, named so diffusers does not look.
             "feature_extractor": [None, None], "image_encoder": [None, None]}
    for (encoder, tokenizer_name), cls, tokenizer in zip(TEXT_COMPONENTS, text_classes,
                                                         tokenizers):
        index[encoder] = ["transformers", cls]
        index[tokenizer_name] = ["transformers", type(tokenizer).__name__]
    if _is_xl(configs.pipeline_class):
        index["force_zeros_for_empty_prompt"] = configs.force_zeros_for_empty_prompt
    else:
        index.update(safety_checker=[None, None], requires_safety_checker=False)
        if configs.force_zeros_for_empty_prompt:  # not a diffusers SD option, but jaxdiff honours it
            index["force_zeros_for_empty_prompt"] = True
    return index


def check_params(models: Models, params) -> None:
    """Raises `WeightError` unless every component's params fit the module its config builds."""
    encoders, given = models.text_encoders, params["text_encoders"]
    if len(given) != len(encoders):
        raise WeightError(f"{len(given)} text encoder param trees for {len(encoders)} text encoder configs")
    parts = [("unet", models.unet, params["unet"]), ("vae", models.vae, params["vae"])]
    parts += [(f"text_encoders[{i}]", m, p) for i, (m, p) in enumerate(zip(encoders, given))]
    for what, module, tree in parts:
        want = traverse_util.flatten_dict(dict(param_shapes(module)))
        got = traverse_util.flatten_dict(dict(tree))
        bad = sorted(set(want) ^ set(got)) or [k for k in want if want[k].shape != np.shape(got[k])]
        if bad:
            key = bad[0]
            detail = (f"missing {'/'.join(key)}" if key not in got else
                      f"unexpected {'/'.join(key)}" if key not in want else
                      f"{'/'.join(key)} has shape {np.shape(got[key])}, expected {want[key].shape}")
            raise WeightError(f"{what} params do not fit its config: {detail}")


def write_folder(folder: str, configs: PipelineConfigs, params, tokenizers: Sequence,
                 defaults: Mapping | None) -> None:
    """Writes every file of the pipeline into the existing, empty `folder`."""
    models = components.build_models(configs)
    check_params(models, params)
    if len(tokenizers) != len(models.text_encoders):
        raise ValueError(f"{len(tokenizers)} tokenizers for {len(models.text_encoders)} text encoders")
    save_component(os.path.join(folder, "unet"), diffusers_config(configs.unet, "UNet2DConditionModel"),
                   params["unet"], UNET_WEIGHTS)
    save_component(os.path.join(folder, "vae"), diffusers_config(configs.vae, "AutoencoderKL"),
                   params["vae"], UNET_WEIGHTS)
    for (encoder, tokenizer_name), config, model, p, tokenizer in zip(
            TEXT_COMPONENTS, configs.text_encoders, models.text_encoders,
            params["text_encoders"], tokenizers):
        save_component(os.path.join(folder, encoder), text_encoder_config(config, model, tokenizer),
                       p, TEXT_WEIGHTS)
        tokenizer.save_pretrained(os.path.join(folder, tokenizer_name))
    scheduler = scheduler_config(configs.scheduler, defaults)
    os.makedirs(os.path.join(folder, "scheduler"))
    write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), scheduler)
    text_classes = [text_encoder_class(m) for m in models.text_encoders]
    write_json(os.path.join(folder, "model_index.json"),
               model_index(configs, text_classes, tokenizers, scheduler["_class_name"]))
    if defaults is not None:
        write_json(os.path.join(folder, JAXDIFF_DEFAULTS_FILE), defaults)


# What `write_folder` puts in a pipeline folder: `overwrite` replaces a folder holding nothing else.
EXPORTED_ENTRIES = frozenset({"model_index.json", JAXDIFF_DEFAULTS_FILE, "unet", "vae", "scheduler",
                              "README.md"} | {name for pair in TEXT_COMPONENTS for name in pair})


def _check_target(path: str, overwrite: bool, source: str | None = None) -> None:
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a folder")
    if source is not None:
        target, origin = os.path.realpath(path), os.path.realpath(source)
        if origin == target or origin.startswith(target + os.sep):
            raise FileExistsError(f"cannot export into {path}: it is or holds the model being exported "
                                  f"({source}); choose another folder")
    if not (os.path.isdir(path) and os.listdir(path)):
        return
    if not overwrite:
        raise FileExistsError(f"{path} is not empty; pass overwrite=True (jaxdiff export --overwrite) "
                              "to replace it")
    foreign = sorted(set(os.listdir(path)) - EXPORTED_ENTRIES)
    if foreign or not os.path.exists(os.path.join(path, "model_index.json")):
        raise FileExistsError(f"{path} is not a pipeline folder an export wrote (it holds "
                              f"{', '.join(foreign[:4]) or 'no model_index.json'}); overwrite only "
                              "replaces those; choose another folder")


def check_defaults(defaults: Mapping) -> None:
    """Raises ValueError for defaults a folder must not carry: non-finite or mistyped numbers."""
    for key in ("guidance_scale", "guidance_rescale"):
        value = defaults.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ValueError(f"default {key} must be a finite number, got {value!r}")
    steps = defaults.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"default steps must be a positive int, got {steps!r}")
    sampler = defaults.get("sampler")
    if sampler is not None and sampler not in schedules.SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r} as the folder's default; choose one of {', '.join(schedules.SAMPLER_NAMES)}")


def _remove_leftovers(path: str) -> None:
    """Staging folders of earlier exports to `path` that were killed before their rename."""
    parent, name = os.path.split(os.path.abspath(path))
    for leftover in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.partial-*")):
        shutil.rmtree(leftover, ignore_errors=True)


def _sibling(path: str, tag: str) -> str:
    """A fresh hidden name next to `path` (same file system, so renames are atomic)."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.{tag}-{uuid.uuid4().hex[:8]}")


def _move_into_place(staged: str, path: str, overwrite: bool) -> None:
    if not os.path.lexists(path):
        os.rename(staged, path)
        return
    old = _sibling(path, "old")
    os.rename(path, old)
    os.rename(staged, path)
    # Without overwrite the old folder was empty; rmdir (not rmtree) fails rather than delete
    # anything written into it meanwhile, which then stays in `old`.
    if overwrite:
        shutil.rmtree(old)
    else:
        os.rmdir(old)


def save_pipeline(path: str, configs: PipelineConfigs, params, tokenizers: Sequence,
                  defaults: Mapping | None = None, *, overwrite: bool = False,
                  source: str | None = None) -> str:
    """Writes a diffusers pipeline folder at `path` (and `jaxdiff.json` with `defaults`); returns `path`.

    `params` is `{"text_encoders": (...), "unet": ..., "vae": ...}` as `init_params` and `load` give.
    `source`, the folder or run the params came from, is never replaced or written into.
    """
    _check_target(path, overwrite, source)
    if defaults is not None:
        check_defaults(defaults)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _remove_leftovers(path)
    staged = _sibling(path, "partial")
    os.mkdir(staged)  # not mkdtemp: its 0o700 mode would survive the rename
    try:
        write_folder(staged, configs, params, tokenizers, defaults)
        _check_target(path, overwrite, source)  # again: something may have been written there meanwhile
        _move_into_place(staged, path, overwrite)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return path


def save(pipe, path: str, *, overwrite: bool = False) -> str:
    """Writes a `pipeline.Pipeline` (loaded or trained) with its configs, params, tokenizers and defaults."""
    return save_pipeline(path, pipe.configs, pipe.params, pipe.tokenizers, pipe.defaults,
                         overwrite=overwrite, source=pipe.path)
