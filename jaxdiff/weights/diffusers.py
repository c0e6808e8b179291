"""diffusers pipeline folders: `model_index.json`, one sub-folder per component, safetensors weights.

Reading never unpickles unless asked: `.bin`/`.ckpt` files can run code when loaded, so they are
refused unless `allow_pickle=True`. Safetensors are parsed here (header + memory map) so that bf16
tensors load without torch.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from jaxdiff.weights.convert import WeightError, load_state_dict, to_state_dict

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
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


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as a NumPy array backed by a read-only memory map."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if len(mm) < 8:
        raise WeightError(f"{path} is not a safetensors file (too short)")
    (header_len,) = struct.unpack("<Q", mm[:8])
    try:
        header = json.loads(mm[8:8 + header_len])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WeightError(f"{path} is not a safetensors file (bad header)") from None
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise WeightError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if base + end > len(mm):
            raise WeightError(f"{path}: tensor {name!r} lies past the end of the file (truncated?)")
        out[name] = np.frombuffer(mm, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize,
                                  offset=base + start).reshape(info["shape"])
    return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    names = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        header[name] = {"dtype": names[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the spec aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())


def _read_pickle(path: str) -> dict[str, np.ndarray]:
    import torch  # only for checkpoints the caller explicitly allowed to unpickle

    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def read_component_tensors(folder: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The torch-named tensors of one component folder (`unet/`, `vae/`, `text_encoder/`...)."""
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return read_safetensors(path)
    for name in SHARD_INDEXES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            tensors = {}
            for shard in sorted(set(read_json(path)["weight_map"].values())):
                tensors.update(read_safetensors(os.path.join(folder, shard)))
            return tensors
    pickles = [p for p in (os.path.join(folder, n) for n in PICKLE_FILES) if os.path.exists(p)]
    pickles += sorted(glob.glob(os.path.join(folder, "*.ckpt")))
    if pickles and not allow_pickle:
        raise WeightError(f"{folder} has only pickle weights ({os.path.basename(pickles[0])}); pickle "
                          "files can run code when loaded. Convert them to safetensors, or pass "
                          "allow_pickle=True if you trust the file.")
    if pickles:
        return _read_pickle(pickles[0])
    raise WeightError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")


def _rename_legacy(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in tensors.items():
        for old, new in LEGACY_RENAMES.items():
            name = name.replace(old, new)
        out[name] = value
    return out


def load_component(folder: str, param_shapes, what: str, allow_pickle: bool = False,
                   rename=None) -> dict:
    """Reads a component folder into a params pytree with exactly the shapes of `param_shapes`.

    `rename`, if given, maps the folder's tensor dict to canonical names first (a model whose
    library saves it under more than one naming).
    """
    tensors = _rename_legacy(read_component_tensors(folder, allow_pickle))
    if rename is not None:
        tensors = rename(tensors)
    return load_state_dict(tensors, param_shapes, what=what, ignore=IGNORED_TENSORS)


def save_component(folder: str, config: Mapping, params, weights_name: str) -> None:
    """Writes `config.json` and the params as torch-named float32 safetensors."""
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"), config)
    tensors = {k: np.asarray(v, np.float32) for k, v in to_state_dict(params).items()}
    write_safetensors(os.path.join(folder, weights_name), tensors)
