"""Tensor files: safetensors, parsed here (header + memory map) so that bf16 tensors load without
torch, and, only when the caller allows it, pickle checkpoints (which can run code when loaded)."""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from jaxdiff.weights.convert import WeightError

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


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


def read_pickle(path: str) -> dict[str, np.ndarray]:
    import torch  # only for checkpoints the caller explicitly allowed to unpickle

    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}
