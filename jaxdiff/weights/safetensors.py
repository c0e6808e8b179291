"""Tensor files: safetensors, parsed here (header + memory map) so that bf16 tensors load without
torch, and, only when the caller allows it, pickle checkpoints (which can run code when loaded).

The header is checked as the `safetensors` library checks it before a byte of data is read: its
length, that it is a JSON object of well-formed entries, and that the entries tile the data section
exactly (sorted by offset, contiguous from 0, each as long as its shape and dtype say, the last one
ending at the end of the file). A file that fails any of these raises `WeightError` naming the file
and the tensor, instead of reading header bytes or a neighbour's bytes as weights.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from jaxdiff.weights.convert import WeightError

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
# The floating dtypes among them (ml_dtypes' types are not np.floating subtypes).
FLOAT_DTYPES = frozenset(np.dtype(SAFETENSORS_DTYPES[k])
                         for k in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"))
# The safetensors library refuses larger headers (its HeaderTooLarge).
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicate_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise WeightError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_header(header_bytes: bytes, data_len: int, what: str) -> dict[str, tuple[np.dtype, tuple, int, int]]:
    """Validates a safetensors JSON header against a data section of `data_len` bytes.

    Returns {tensor name: (dtype, shape, start, end)}, offsets relative to the data section; raises
    `WeightError` starting with `what` (the file) for anything the safetensors library would refuse.
    """
    if not header_bytes.startswith(b"{"):
        raise WeightError(f"{what}: not a safetensors file (the header is not a JSON object)")
    try:
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except WeightError as e:
        raise WeightError(f"{what}: bad safetensors header ({e})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightError(f"{what}: not a safetensors file (the header is not valid UTF-8 JSON: "
                          f"{type(e).__name__})") from None
    if not isinstance(header, dict):
        raise WeightError(f"{what}: not a safetensors file (the header is a JSON {type(header).__name__}, "
                          "not an object)")
    metadata = header.get(METADATA_KEY)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise WeightError(f"{what}: {METADATA_KEY} must be an object of string to string, got "
                          f"{_short(metadata)}")

    entries = {}
    for name, info in header.items():
        if name == METADATA_KEY:
            continue
        tensor = f"{what}: tensor {name!r}"
        if not isinstance(info, dict):
            raise WeightError(f"{tensor}: entry must be an object with dtype, shape and data_offsets, got "
                              f"{_short(info)}")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise WeightError(f"{tensor}: entry has no {', '.join(missing)}")
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
            raise WeightError(f"{tensor}: unsupported dtype {_short(dtype_name)} (jaxdiff reads "
                              f"{', '.join(SAFETENSORS_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise WeightError(f"{tensor}: shape must be a list of non-negative ints, got {_short(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise WeightError(f"{tensor}: data_offsets must be two ints [start, end], got {_short(offsets)}")
        start, end = offsets
        if not 0 <= start <= end:
            raise WeightError(f"{tensor}: data_offsets {offsets} must satisfy 0 <= start <= end")
        dtype = np.dtype(SAFETENSORS_DTYPES[dtype_name])
        needed = math.prod(shape) * dtype.itemsize
        if end - start != needed:
            raise WeightError(f"{tensor}: data_offsets {offsets} hold {end - start} bytes but shape {shape} "
                              f"{dtype.name} needs {needed}")
        entries[name] = (dtype, tuple(shape), start, end)

    # The tensors, in data order, must tile [0, data_len) exactly: no gap, no overlap, nothing after.
    position, previous = 0, None
    for name, (_, _, start, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if start != position:
            if start < position:
                raise WeightError(f"{what}: tensor {name!r}: data_offsets [{start}, {end}] overlap tensor "
                                  f"{previous!r}, which ends at {position}")
            after = f"tensor {previous!r}, which ends at {position}" if previous is not None else "the header"
            raise WeightError(f"{what}: tensor {name!r}: data_offsets [{start}, {end}] leave a gap of "
                              f"{start - position} bytes after {after}")
        if end > data_len:
            raise WeightError(f"{what}: tensor {name!r}: data_offsets [{start}, {end}] lie past the end of "
                              f"the data ({data_len} bytes; truncated file?)")
        position, previous = end, name
    if position != data_len:
        last = f"the last tensor, {previous!r}, ends" if previous is not None else "the tensors end"
        raise WeightError(f"{what}: {last} at byte {position} of the data but the data section holds "
                          f"{data_len} bytes (trailing bytes, or a header that does not describe the file)")
    return entries


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as a NumPy array backed by a read-only memory map.

    The header is validated first (see the module docstring); any problem raises `WeightError`.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise WeightError(f"{path}: not a safetensors file (only {size} bytes; truncated?)")
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > MAX_HEADER_BYTES:
                raise WeightError(f"{path}: not a safetensors file (header length {header_len} is over the "
                                  f"{MAX_HEADER_BYTES} byte limit)")
            if 8 + header_len > size:
                raise WeightError(f"{path}: not a safetensors file (header length {header_len} runs past the "
                                  f"end of the {size} byte file; truncated?)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except IsADirectoryError:
        raise WeightError(f"{path} is a directory, not a safetensors file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise WeightError(f"{path} is a symbolic link loop (it resolves back to itself)") from None
        raise
    if len(mm) != size:  # the file changed under us
        raise WeightError(f"{path}: the file changed size while being read")
    entries = parse_header(mm[8:8 + header_len], size - 8 - header_len, path)
    base = 8 + header_len
    return {name: np.frombuffer(mm, dtype=dtype, count=math.prod(shape), offset=base + start).reshape(shape)
            for name, (dtype, shape, start, _) in entries.items()}


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
