"""Torch state dicts <-> Flax params, by one naming rule shared by every model.

jaxdiff's modules are named after the torch modules they mirror, so a tensor name maps to a param
path mechanically: `down_blocks.0.resnets.1.conv1.weight` <-> `down_blocks_0/resnets_1/conv1/kernel`.
A list index joins the list's name with `_`; a torch `weight` becomes the Flax leaf that the target
module has (`kernel`, `scale` or `embedding`), transposed to Flax layout:
  Linear (out, in) <-> Dense (in, out);  Conv2d (O, I, kh, kw) <-> Conv (kh, kw, I, O), i.e. NHWC.

Loading is strict: every tensor must land on a param of the same shape and every param must be
filled; anything else is a `WeightError` that names the tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
from flax import traverse_util

# Names of torch containers (nn.ModuleList / nn.Sequential) whose items are addressed by index.
# A digit segment is only legal after one of these, which is what makes the rule reversible
# (`linear_1` in a timestep embedding is a plain name, `resnets_1` is an index).
LIST_CONTAINERS = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "layers", "to_out", "net",
})
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


class WeightError(ValueError):
    """A checkpoint does not fit the model: a missing, unexpected or mis-shaped tensor."""


def torch_name_to_path(name: str) -> tuple[str, ...]:
    """`a.0.b.weight` -> ("a_0", "b", "weight"); the leaf is still the torch leaf name."""
    parts = name.split(".")
    path: list[str] = []
    for part in parts:
        if part.isdigit():
            if not path or path[-1] not in LIST_CONTAINERS:
                raise WeightError(f"tensor {name!r}: index {part} follows {path[-1:] or 'nothing'}, "
                                  "which is not a known module list")
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def path_to_torch_name(path: Iterable[str]) -> str:
    """The inverse of `torch_name_to_path` for module paths (leaf names are left alone)."""
    out = []
    for part in path:
        m = re.fullmatch(r"(.+)_(\d+)", part)
        if m and m.group(1) in LIST_CONTAINERS:
            out.extend([m.group(1), m.group(2)])
        else:
            out.append(part)
    return ".".join(out)


def _to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array


def _shape(x) -> tuple[int, ...]:
    return tuple(x.shape)


def load_state_dict(tensors: Mapping[str, np.ndarray], target, *, what: str = "model",
                    ignore: Iterable[str] = ()) -> dict:
    """Converts a torch-named state dict into a params pytree shaped like `target`.

    `target` is a params pytree or its `jax.eval_shape` (only shapes and dtypes are read). Tensor
    names matching a regex in `ignore` are skipped (buffers such as CLIP's `position_ids`).
    Returns a nested dict of NumPy arrays in the target's dtypes.
    """
    ignore_res = [re.compile(p) for p in ignore]
    flat_target = traverse_util.flatten_dict(dict(target))
    modules: dict[tuple[str, ...], set[str]] = {}
    for key in flat_target:
        modules.setdefault(key[:-1], set()).add(key[-1])

    out: dict[tuple[str, ...], np.ndarray] = {}
    problems: list[str] = []
    for name, array in tensors.items():
        if any(r.search(name) for r in ignore_res):
            continue
        try:
            path = torch_name_to_path(name)
        except WeightError as e:
            problems.append(str(e))
            continue
        module, torch_leaf = path[:-1], path[-1]
        leaves = modules.get(module, set())
        if torch_leaf == "weight":
            leaf = next((lf for lf in _WEIGHT_LEAVES if lf in leaves), None)
        else:
            leaf = torch_leaf if torch_leaf in leaves else None
        if leaf is None:
            problems.append(f"unexpected tensor {name!r} {_shape(array)}: {what} has no such parameter")
            continue
        key = module + (leaf,)
        value = _to_flax_layout(leaf, np.asarray(array))
        expected = _shape(flat_target[key])
        if _shape(value) != expected:
            torch_expected = _shape(_to_torch_layout(leaf, np.empty(expected, np.uint8)))
            problems.append(f"tensor {name!r} has shape {_shape(array)}, {what} expects {torch_expected}")
            continue
        out[key] = value.astype(flat_target[key].dtype, copy=False)  # (a file of the target dtype: no copy)

    for key in flat_target:
        if key not in out:
            torch_leaf = "weight" if key[-1] in _WEIGHT_LEAVES else key[-1]
            torch_name = path_to_torch_name(key[:-1]) + "." + torch_leaf
            problems.append(f"missing tensor {torch_name!r} {_shape(flat_target[key])} for {what}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise WeightError(f"{len(problems)} problem(s) loading {what}:\n  {shown}{more}")
    return traverse_util.unflatten_dict(out)


def to_state_dict(params) -> dict[str, np.ndarray]:
    """The inverse of `load_state_dict`: a params pytree -> torch-named NumPy arrays."""
    out = {}
    for key, value in traverse_util.flatten_dict(dict(params)).items():
        leaf = key[-1]
        torch_leaf = "weight" if leaf in _WEIGHT_LEAVES else leaf
        name = path_to_torch_name(key[:-1]) + "." + torch_leaf
        out[name] = np.ascontiguousarray(_to_torch_layout(leaf, np.asarray(value)))
    return out
