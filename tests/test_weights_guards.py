"""Bad checkpoints are refused with one clear error naming what is wrong: corrupt safetensors headers,
non-finite weights, config and model_index.json files of the wrong JSON types, config fields of the
wrong type, missing tokenizers and symbolic link loops. Never a raw error from deep inside NumPy,
JSON or transformers, and never a silent garbage result."""

import json
import math
import os
import random
import shutil
import struct
import warnings

import ml_dtypes
import numpy as np
import pytest

import jaxdiff
from jaxdiff.weights import folder
from jaxdiff.weights.convert import WeightError
from jaxdiff.weights.safetensors import SAFETENSORS_DTYPES, read_safetensors, write_safetensors

# ---------------------------------------------------------------------------------------------------
# safetensors headers

TENSORS = {
    "a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),   # data [0, 24)
    "b.bias": np.arange(4, dtype=np.float16),                   # data [24, 32)
    "c.count": np.array([7, 8], dtype=np.int64),                # data [32, 48)
}


def _valid(tmp_path) -> tuple[dict, bytes, str]:
    """(header, data section, path) of a small valid file written by `write_safetensors`."""
    path = str(tmp_path / "model.safetensors")
    write_safetensors(path, TENSORS)
    blob = open(path, "rb").read()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:], path


def _pack(header, data: bytes, header_bytes: bytes | None = None) -> bytes:
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _offsets(name, start, end):
    def edit(h, d):
        h[name]["data_offsets"] = [start, end]
        return _pack(h, d)
    return edit


def _field(name, key, value):
    def edit(h, d):
        h[name][key] = value
        return _pack(h, d)
    return edit


def _shift_all(h, d):
    for info in h.values():
        info["data_offsets"] = [o + 8 for o in info["data_offsets"]]
    return _pack(h, d)


# (id, edit(header, data) -> file bytes, substrings the message must hold besides the file's path)
HEADER_CASES = [
    ("negative offsets", _offsets("a.weight", -8, 16), ["'a.weight'", "[-8, 16]"]),
    ("start after end", _offsets("b.bias", 32, 24), ["'b.bias'", "start <= end"]),
    ("overlapping", _offsets("b.bias", 16, 24), ["'b.bias'", "overlap tensor 'a.weight', which ends at 24"]),
    ("overlapping same start", _offsets("b.bias", 0, 8), ["overlap", "'a.weight'"]),
    ("shifted", _shift_all, ["'a.weight'", "gap of 8 bytes"]),
    ("gap", lambda h, d: _pack({**h, "c.count": dict(h["c.count"], data_offsets=[40, 56])}, d + bytes(8)),
     ["'c.count'", "gap of 8 bytes", "'b.bias'"]),
    ("past end", lambda h, d: _pack({**h, "c.count": dict(h["c.count"], shape=[4], data_offsets=[32, 64])}, d),
     ["'c.count'", "past the end"]),
    ("trailing bytes", lambda h, d: _pack(h, d + bytes(16)), ["'c.count'", "48", "64 bytes"]),
    ("size mismatch", _field("a.weight", "shape", [2, 2]),
     ["'a.weight'", "data_offsets [0, 24] hold 24 bytes but shape [2, 2] float32 needs 16"]),
    ("size mismatch dtype", _field("b.bias", "dtype", "F32"), ["'b.bias'", "needs 16"]),
    ("unknown dtype", _field("a.weight", "dtype", "F17"), ["'a.weight'", "unsupported dtype 'F17'"]),
    ("dtype not a string", _field("a.weight", "dtype", 32), ["'a.weight'", "dtype"]),
    ("negative dimension", _field("a.weight", "shape", [-2, -3]), ["'a.weight'", "non-negative"]),
    ("shape not a list", _field("a.weight", "shape", "2x3"), ["'a.weight'", "shape"]),
    ("float dimension", _field("a.weight", "shape", [2.0, 3]), ["'a.weight'", "shape"]),
    ("bool dimension", _field("b.bias", "shape", [True, 4]), ["'b.bias'", "shape"]),
    ("one offset", _field("a.weight", "data_offsets", [24]), ["'a.weight'", "data_offsets"]),
    ("string offsets", _field("a.weight", "data_offsets", ["0", "24"]), ["'a.weight'", "data_offsets"]),
    ("missing shape", lambda h, d: _pack({**h, "a.weight": {"dtype": "F32", "data_offsets": [0, 24]}}, d),
     ["'a.weight'", "shape"]),
    ("entry not an object", lambda h, d: _pack({**h, "a.weight": [0, 24]}, d), ["'a.weight'", "object"]),
    ("header a list", lambda h, d: _pack(None, d, json.dumps(list(h.values())).encode()), ["JSON object"]),
    ("header a number", lambda h, d: _pack(None, d, b"12345678"), ["JSON object"]),
    ("header not JSON", lambda h, d: _pack(None, d, b"{not json"), ["JSON"]),
    ("header not UTF-8", lambda h, d: _pack(None, d, b'{"\xff\xfe": 1}'), ["UTF-8"]),
    ("header UTF-16", lambda h, d: _pack(None, d, json.dumps(h).encode("utf-16")), ["JSON object"]),
    ("duplicate tensor", lambda h, d: _pack(None, d, json.dumps(h).encode()[:-1] + b',"a.weight":'
                                             + json.dumps(h["a.weight"]).encode() + b"}"),
     ["duplicate", "'a.weight'"]),
    ("header length huge", lambda h, d: struct.pack("<Q", 2 ** 63) + _pack(h, d)[8:], ["header length"]),
    ("header length 200 MB", lambda h, d: struct.pack("<Q", 200_000_000) + _pack(h, d)[8:], ["limit"]),
    ("header length past the file", lambda h, d: struct.pack("<Q", len(_pack(h, d))) + _pack(h, d)[8:],
     ["past the end"]),
    ("truncated data", lambda h, d: _pack(h, d)[:-4], ["'c.count'", "past the end"]),
    ("truncated header", lambda h, d: _pack(h, d)[:20], ["past the end"]),
    ("too short", lambda h, d: b"\x01\x02\x03", ["3 bytes"]),
    ("empty file", lambda h, d: b"", ["0 bytes"]),
    ("metadata not an object", lambda h, d: _pack({**h, "__metadata__": ["format", "pt"]}, d), ["__metadata__"]),
    ("metadata values not strings", lambda h, d: _pack({**h, "__metadata__": {"format": 1}}, d),
     ["__metadata__"]),
    ("metadata keys of a nested object", lambda h, d: _pack({**h, "__metadata__": {"a": {"b": "c"}}}, d),
     ["__metadata__"]),
]


@pytest.mark.parametrize("edit,expected", [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES])
def test_corrupt_safetensors_are_refused_by_name(tmp_path, edit, expected):
    header, data, path = _valid(tmp_path)
    with open(path, "wb") as f:
        f.write(edit(header, data))
    with pytest.raises(WeightError) as err:
        read_safetensors(path)
    message = str(err.value)
    assert path in message and "\n" not in message
    for part in expected:
        assert part in message, (part, message)


def test_valid_files_still_load(tmp_path):
    header, data, path = _valid(tmp_path)
    loaded = read_safetensors(path)
    assert set(loaded) == set(TENSORS)
    for name, array in TENSORS.items():
        np.testing.assert_array_equal(loaded[name], array)
        assert loaded[name].dtype == array.dtype
        assert not loaded[name].flags.owndata and not loaded[name].flags.writeable  # a memory map view
    # What the spec allows: metadata (and null metadata), empty tensors, entries in any order, bf16.
    for extra in ({"__metadata__": {"format": "pt"}}, {"__metadata__": None}):
        with open(path, "wb") as f:
            f.write(_pack(dict(reversed(list({**header, **extra}.items()))), data))
        assert set(read_safetensors(path)) == set(TENSORS)
    write_safetensors(path, {"e": np.zeros((0, 3), np.float32), "z": np.ones(3, ml_dtypes.bfloat16)})
    loaded = read_safetensors(path)
    assert loaded["e"].shape == (0, 3) and loaded["z"].dtype == ml_dtypes.bfloat16
    write_safetensors(path, {})
    assert read_safetensors(path) == {}


def _independent_check(blob: bytes, loaded: dict) -> None:
    """What a file that loaded must satisfy, re-derived from its bytes without jaxdiff's parser."""
    (n,) = struct.unpack("<Q", blob[:8])
    assert 8 + n <= len(blob) and n <= 100_000_000
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    assert isinstance(header, dict)
    data = blob[8 + n:]
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    assert set(loaded) == set(entries)
    position = 0
    for name, info in sorted(entries.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        start, end = info["data_offsets"]
        assert start == position and end >= start, "not contiguous"
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        assert end - start == math.prod(info["shape"]) * dtype.itemsize
        array = loaded[name]
        assert array.dtype == dtype and list(array.shape) == info["shape"]
        assert array.tobytes() == data[start:end]
        position = end
    assert position == len(data), "the tensors do not cover the data section exactly"
    assert sum(a.nbytes for a in loaded.values()) == len(data)


def _mutate(rng: random.Random, header: dict, data: bytes) -> bytes:
    """One random corruption of a valid file: of its header's values, JSON types or bytes, or its data."""
    names = list(header)
    name = rng.choice(names)
    junk = [None, True, -1, 0, 1, 2 ** 64, 1.5, "x", [], {}, [1, 2, 3], {"a": 1}, "F32", [0, 24]]
    kind = rng.randrange(10)
    h = json.loads(json.dumps(header))
    if kind == 0:  # random offsets
        start = rng.choice([0, 8, 16, 24, 32, 48, -8, rng.randrange(-64, 128)])
        h[name]["data_offsets"] = [start, start + rng.choice([0, 8, 16, 24, -8, rng.randrange(-32, 64)])]
    elif kind == 1:  # random shape
        h[name]["shape"] = [rng.choice([0, 1, 2, 3, 4, 6, 8, -1, 2 ** 62]) for _ in range(rng.randrange(4))]
    elif kind == 2:  # random dtype
        h[name]["dtype"] = rng.choice(list(SAFETENSORS_DTYPES) + ["F17", "f32", "", "C64", 4])
    elif kind == 3:  # a field or the entry replaced by another JSON type
        if rng.random() < 0.5:
            h[name][rng.choice(["dtype", "shape", "data_offsets", "extra"])] = rng.choice(junk)
        else:
            h[name] = rng.choice(junk)
    elif kind == 4:  # a field removed, or __metadata__ added
        if rng.random() < 0.5:
            h[name].pop(rng.choice(["dtype", "shape", "data_offsets"]))
        else:
            h["__metadata__"] = rng.choice(junk + [{"format": "pt"}])
    elif kind == 5:  # a consistent re-layout (often valid): shapes and offsets rebuilt in a new order
        order = names[:]
        rng.shuffle(order)
        position = 0
        for n_ in order:
            size = math.prod(h[n_]["shape"]) * np.dtype(SAFETENSORS_DTYPES[h[n_]["dtype"]]).itemsize
            h[n_]["data_offsets"] = [position, position + size]
            position += size
    elif kind in (6, 7):  # byte flips in the header (and perhaps its length)
        raw = bytearray(_pack(h, data))
        (n,) = struct.unpack("<Q", raw[:8])
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(0 if kind == 7 else 8, 8 + n)
            raw[i] = rng.randrange(256)
        return bytes(raw)
    elif kind == 8:  # the data section cut or extended
        cut = rng.choice([-16, -8, -1, 1, 8, 16])
        return _pack(h, data[:cut] if cut < 0 else data + bytes(cut))
    else:  # a whole header swapped for random JSON
        return _pack(None, data, json.dumps(rng.choice(junk)).encode())
    return _pack(h, data)


def test_fuzzed_headers_load_exactly_or_raise(tmp_path):
    """300 seeded mutations of a valid file: each loads into arrays that tile the data section exactly
    (checked independently and against the safetensors library) or raises WeightError/ValueError."""
    safetensors_lib = pytest.importorskip("safetensors")
    header, data, path = _valid(tmp_path)
    rng = random.Random(30)
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(300):
        blob = _mutate(rng, header, data)
        with open(path, "wb") as f:
            f.write(blob)
        try:
            loaded = read_safetensors(path)
        except ValueError as e:  # WeightError is a ValueError
            assert isinstance(e, WeightError), (i, e)
            assert path in str(e), (i, e)
            outcomes["refused"] += 1
            try:
                reference = safetensors_lib.deserialize(blob)
            except Exception:
                continue
            # The library took a file jaxdiff refused: only a dtype jaxdiff does not read may explain it.
            assert any(info["dtype"] not in SAFETENSORS_DTYPES for _, info in reference), (i, str(e))
            continue
        _independent_check(blob, loaded)
        reference = dict(safetensors_lib.deserialize(blob))
        assert set(reference) == set(loaded), i
        for name, info in reference.items():
            assert bytes(info["data"]) == loaded[name].tobytes() and info["shape"] == list(loaded[name].shape)
        outcomes["loaded"] += 1
    assert outcomes["loaded"] >= 10 and outcomes["refused"] >= 200, outcomes  # both paths exercised


# ---------------------------------------------------------------------------------------------------
# diffusers folders


def _copy(pipeline_dir, tmp_path, kind="sd1") -> str:
    dst = str(tmp_path / kind)
    shutil.copytree(pipeline_dir(kind), dst)
    return dst


def _edit_json(path, edit):
    with open(path) as f:
        value = json.load(f)
    value = edit(value)
    with open(path, "w") as f:
        json.dump(value, f)


def _nan_in_unet(path):
    f = os.path.join(path, "unet", "diffusion_pytorch_model.safetensors")
    tensors = {k: np.array(v) for k, v in read_safetensors(f).items()}
    weight = tensors["conv_in.weight"]
    weight.flat[[0, 5, 9]] = np.nan
    write_safetensors(f, tensors)


def _inf_in_text_encoder(path):
    f = os.path.join(path, "text_encoder", "model.safetensors")
    tensors = {k: np.array(v) for k, v in read_safetensors(f).items()}
    name = next(k for k in sorted(tensors) if k.endswith("final_layer_norm.weight"))
    tensors[name] = tensors[name].astype(ml_dtypes.bfloat16)
    tensors[name][1] = np.inf
    write_safetensors(f, tensors)


def _loop(path, *parts):
    target = os.path.join(path, *parts)
    if os.path.isdir(target):
        shutil.rmtree(target)
    else:
        os.remove(target)
    os.symlink(os.path.basename(target), target)  # a link to itself


def _remove(*parts):
    def edit(path):
        target = os.path.join(path, *parts)
        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    return edit


def _json(*parts, edit):
    return lambda path: _edit_json(os.path.join(path, *parts), edit)


def _set(*parts, **fields):
    """Sets fields of a JSON object file (values of the wrong type, mostly)."""
    return _json(*parts, edit=lambda v: {**v, **fields})


# (id, corrupt(folder), exception type, substrings the message must hold)
FOLDER_CASES = [
    ("NaN in unet weights", _nan_in_unet, WeightError,
     ["unet", "tensor 'conv_in.weight' has 3 NaN values"]),
    ("inf in bf16 text encoder weights", _inf_in_text_encoder, WeightError,
     ["text_encoder", "final_layer_norm.weight' has 1 infinite value"]),
    ("model_index.json a list", _json("model_index.json", edit=lambda v: [v]), ValueError,
     ["model_index.json", "expected a JSON object, got a JSON array"]),
    ("model_index entry a string", _set("model_index.json", unet="UNet2DConditionModel"),
     ValueError, ["model_index.json", "'unet' must be a [library, class] list"]),
    ("model_index entry too long", _set("model_index.json", vae=["a", "b", "c"]),
     ValueError, ["model_index.json", "'vae' must be a [library, class] list", '["diffusers", "AutoencoderKL"]']),
    ("model_index entry of numbers", _set("model_index.json", text_encoder=[1, 2]),
     ValueError, ["model_index.json", "'text_encoder'"]),
    ("model_index with a null unet", _set("model_index.json", unet=None),
     ValueError, ["model_index.json", "names no unet"]),
    ("model_index _class_name a list", _set("model_index.json", _class_name=["x"]),
     ValueError, ["model_index.json", "_class_name"]),
    ("unet config a list", _json("unet", "config.json", edit=lambda v: [v]), ValueError,
     [os.path.join("unet", "config.json"), "JSON object"]),
    ("scheduler config a string", _json("scheduler", "scheduler_config.json", edit=lambda v: "ddim"), ValueError,
     ["scheduler_config.json", "JSON object"]),
    ("unet layers_per_block a string", _set("unet", "config.json", layers_per_block="2"),
     ValueError, [os.path.join("unet", "config.json"), "layers_per_block must be an int", "'2'"]),
    ("unet layers_per_block 1.5", _set("unet", "config.json", layers_per_block=1.5),
     ValueError, [os.path.join("unet", "config.json"), "layers_per_block", "1.5"]),
    ("unet negative channels", _set("unet", "config.json", block_out_channels=[32, -64]),
     ValueError, [os.path.join("unet", "config.json"), "block_out_channels must be a list of positive ints"]),
    ("unet in_channels a list", _set("unet", "config.json", in_channels=[4]),
     ValueError, [os.path.join("unet", "config.json"), "in_channels must be an int, got [4]"]),
    ("vae layers_per_block a list", _set("vae", "config.json", layers_per_block=[1, 1]),
     ValueError, [os.path.join("vae", "config.json"), "layers_per_block must be an int"]),
    ("text encoder hidden_size a string", _set("text_encoder", "config.json", hidden_size="16"),
     ValueError, [os.path.join("text_encoder", "config.json"), "hidden_size must be an int, got '16'"]),
    ("text encoder zero heads", _set("text_encoder", "config.json", num_attention_heads=0),
     ValueError, [os.path.join("text_encoder", "config.json"), "num_attention_heads"]),
    ("missing tokenizer folder", _remove("tokenizer"), FileNotFoundError,
     ["tokenizer", "missing tokenizer folder"]),
    ("tokenizer folder without vocabulary", lambda p: [os.remove(os.path.join(p, "tokenizer", f))
                                                       for f in os.listdir(os.path.join(p, "tokenizer"))
                                                       if f != "tokenizer_config.json"],
     FileNotFoundError, ["tokenizer", "no vocabulary"]),
    ("missing unet weights", _remove("unet", "diffusion_pytorch_model.safetensors"), WeightError,
     ["no weights in", "unet"]),
    ("unet config.json a symlink loop", lambda p: _loop(p, "unet", "config.json"), ValueError,
     [os.path.join("unet", "config.json"), "symbolic link loop"]),
    ("vae folder a symlink loop", lambda p: _loop(p, "vae"), ValueError, ["vae is a symbolic link loop"]),
    ("unet weights a symlink loop", lambda p: _loop(p, "unet", "diffusion_pytorch_model.safetensors"), ValueError,
     ["diffusion_pytorch_model.safetensors", "symbolic link loop"]),
    ("tokenizer folder a symlink loop", lambda p: _loop(p, "tokenizer"), ValueError,
     ["tokenizer", "symbolic link loop"]),
]


@pytest.mark.parametrize("corrupt,error,expected", [c[1:] for c in FOLDER_CASES],
                         ids=[c[0] for c in FOLDER_CASES])
def test_bad_folders_are_refused_by_name(pipeline_dir, tmp_path, corrupt, error, expected):
    path = _copy(pipeline_dir, tmp_path)
    corrupt(path)
    with pytest.raises(error) as err:
        jaxdiff.load(path)
    message = str(err.value)
    assert path in message, message
    for part in expected:
        assert part in message, (part, message)


def test_sharded_weights_in_two_shards_are_refused(pipeline_dir, tmp_path):
    path = _copy(pipeline_dir, tmp_path)
    vae = os.path.join(path, "vae")
    weights = os.path.join(vae, "diffusion_pytorch_model.safetensors")
    tensors = {k: np.array(v) for k, v in read_safetensors(weights).items()}
    os.remove(weights)
    names = sorted(tensors)
    write_safetensors(os.path.join(vae, "s1.safetensors"), {k: tensors[k] for k in names[:5]})
    write_safetensors(os.path.join(vae, "s2.safetensors"), {k: tensors[k] for k in names[4:]})
    index = {"weight_map": {k: "s1.safetensors" if i < 5 else "s2.safetensors" for i, k in enumerate(names)}}
    with open(os.path.join(vae, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(WeightError, match=f"tensor '{names[4]}' is in two shards"):
        jaxdiff.load(path)
    index["weight_map"][names[0]] = "../unet/diffusion_pytorch_model.safetensors"
    with open(os.path.join(vae, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(WeightError, match="weight_map"):
        jaxdiff.load(path)


def test_check_finite_is_exact_for_finite_overflow():
    """A float64 sum that overflows on finite values is not mistaken for a NaN."""
    big = np.full(4, np.finfo(np.float64).max)
    folder.check_finite({"x.weight": big, "n": np.array([1, 2])}, "unet")
    with pytest.raises(WeightError, match=r"unet: tensor 'x.weight' has 1 NaN value and 1 infinite value"):
        folder.check_finite({"x.weight": np.array([1.0, np.nan, -np.inf], np.float16)}, "unet")


# ---------------------------------------------------------------------------------------------------
# config field types (models/config.py), outside any folder


def test_config_field_types():
    from jaxdiff.models.unet import UNet2DConditionModel
    from jaxdiff.models.vae import AutoencoderKL
    from configs.shapes_components import TINY_UNET, TINY_VAE

    # diffusers' own spellings still build: lists per block, integral floats, null optional fields.
    UNet2DConditionModel.from_config(dict(TINY_UNET, attention_head_dim=[2, 4], layers_per_block=[1, 1],
                                          transformer_layers_per_block=[1, 1], cross_attention_dim=[16, 16],
                                          sample_size=[16, 16], norm_eps=1, freq_shift=0.0,
                                          projection_class_embeddings_input_dim=None))
    model = UNet2DConditionModel.from_config(dict(TINY_UNET, layers_per_block=1.0))
    assert model.config.layers_per_block == (1, 1)
    AutoencoderKL.from_config(dict(TINY_VAE, sample_size=[64, 64], latents_mean=[0.0] * 8, force_upcast=False))
    bad = [
        (UNet2DConditionModel, TINY_UNET, "layers_per_block", "2", "must be an int or a list of ints"),
        (UNet2DConditionModel, TINY_UNET, "norm_num_groups", 4.5, "norm_num_groups"),
        (UNet2DConditionModel, TINY_UNET, "block_out_channels", 8, "must be a list of ints"),
        (UNet2DConditionModel, TINY_UNET, "down_block_types", "DownBlock2D", "must be a list of strings"),
        (UNet2DConditionModel, TINY_UNET, "use_linear_projection", "yes", "must be a bool"),
        (UNet2DConditionModel, TINY_UNET, "norm_eps", float("nan"), "must be a finite number"),
        (UNet2DConditionModel, TINY_UNET, "attention_head_dim", [2, "4"], "attention_head_dim"),
        (UNet2DConditionModel, TINY_UNET, "addition_time_embed_dim", "256", "null or"),
        (AutoencoderKL, TINY_VAE, "latent_channels", -4, "must be a positive int"),
        (AutoencoderKL, TINY_VAE, "layers_per_block", True, "must be an int"),
        (AutoencoderKL, TINY_VAE, "act_fn", ["silu"], "must be a string"),
    ]
    for cls, base, field, value, message in bad:
        with pytest.raises(ValueError) as err:
            cls.from_config(dict(base, **{field: value}))
        text = str(err.value)
        assert cls.__name__ in text and field in text and message in text and repr(value) in text, text


# Real hub configs, as published: they must keep loading. SDXL's U-Net has "upcast_attention": null.
REAL_CONFIGS = {
    "sd1_unet": ("UNet2DConditionModel",
        {'_class_name': 'UNet2DConditionModel',
         '_diffusers_version': '0.6.0',
         'act_fn': 'silu',
         'attention_head_dim': 8,
         'block_out_channels': [320, 640, 1280, 1280],
         'center_input_sample': False,
         'cross_attention_dim': 768,
         'down_block_types': ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                              'DownBlock2D'],
         'downsample_padding': 1,
         'flip_sin_to_cos': True,
         'freq_shift': 0,
         'in_channels': 4,
         'layers_per_block': 2,
         'mid_block_scale_factor': 1,
         'norm_eps': 1e-05,
         'norm_num_groups': 32,
         'out_channels': 4,
         'sample_size': 64,
         'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D']}),
    "sd2_unet": ("UNet2DConditionModel",
        {'_class_name': 'UNet2DConditionModel',
         '_diffusers_version': '0.10.0.dev0',
         'act_fn': 'silu',
         'attention_head_dim': [5, 10, 20, 20],
         'block_out_channels': [320, 640, 1280, 1280],
         'center_input_sample': False,
         'cross_attention_dim': 1024,
         'down_block_types': ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                              'DownBlock2D'],
         'downsample_padding': 1,
         'dual_cross_attention': False,
         'flip_sin_to_cos': True,
         'freq_shift': 0,
         'in_channels': 4,
         'layers_per_block': 2,
         'mid_block_scale_factor': 1,
         'norm_eps': 1e-05,
         'norm_num_groups': 32,
         'num_class_embeds': None,
         'only_cross_attention': False,
         'out_channels': 4,
         'sample_size': 96,
         'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
         'upcast_attention': True,
         'use_linear_projection': True}),
    "sdxl_unet": ("UNet2DConditionModel",
        {'_class_name': 'UNet2DConditionModel',
         '_diffusers_version': '0.19.0.dev0',
         'act_fn': 'silu',
         'addition_embed_type': 'text_time',
         'addition_embed_type_num_heads': 64,
         'addition_time_embed_dim': 256,
         'attention_head_dim': [5, 10, 20],
         'block_out_channels': [320, 640, 1280],
         'center_input_sample': False,
         'class_embed_type': None,
         'class_embeddings_concat': False,
         'conv_in_kernel': 3,
         'conv_out_kernel': 3,
         'cross_attention_dim': 2048,
         'cross_attention_norm': None,
         'down_block_types': ['DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'],
         'downsample_padding': 1,
         'dual_cross_attention': False,
         'encoder_hid_dim': None,
         'encoder_hid_dim_type': None,
         'flip_sin_to_cos': True,
         'freq_shift': 0,
         'in_channels': 4,
         'layers_per_block': 2,
         'mid_block_only_cross_attention': None,
         'mid_block_scale_factor': 1,
         'mid_block_type': 'UNetMidBlock2DCrossAttn',
         'norm_eps': 1e-05,
         'norm_num_groups': 32,
         'num_attention_heads': None,
         'num_class_embeds': None,
         'only_cross_attention': False,
         'out_channels': 4,
         'projection_class_embeddings_input_dim': 2816,
         'resnet_out_scale_factor': 1.0,
         'resnet_skip_time_act': False,
         'resnet_time_scale_shift': 'default',
         'sample_size': 128,
         'time_cond_proj_dim': None,
         'time_embedding_act_fn': None,
         'time_embedding_dim': None,
         'time_embedding_type': 'positional',
         'timestep_post_act': None,
         'transformer_layers_per_block': [1, 2, 10],
         'up_block_types': ['CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'],
         'upcast_attention': None,
         'use_linear_projection': True}),
    "sdxl_vae": ("AutoencoderKL",
        {'_class_name': 'AutoencoderKL',
         '_diffusers_version': '0.20.0.dev0',
         'act_fn': 'silu',
         'block_out_channels': [128, 256, 512, 512],
         'down_block_types': ['DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D',
                              'DownEncoderBlock2D'],
         'force_upcast': True,
         'in_channels': 3,
         'latent_channels': 4,
         'layers_per_block': 2,
         'norm_num_groups': 32,
         'out_channels': 3,
         'sample_size': 1024,
         'scaling_factor': 0.13025,
         'up_block_types': ['UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D'],
         'latents_mean': None,
         'latents_std': None,
         'shift_factor': None,
         'use_quant_conv': True,
         'use_post_quant_conv': True,
         'mid_block_add_attention': True}),
    "te2": ("CLIPTextModel",
        {'architectures': ['CLIPTextModelWithProjection'],
         'attention_dropout': 0.0,
         'bos_token_id': 0,
         'dropout': 0.0,
         'eos_token_id': 2,
         'hidden_act': 'gelu',
         'hidden_size': 1280,
         'initializer_factor': 1.0,
         'initializer_range': 0.02,
         'intermediate_size': 5120,
         'layer_norm_eps': 1e-05,
         'max_position_embeddings': 77,
         'model_type': 'clip_text_model',
         'num_attention_heads': 20,
         'num_hidden_layers': 32,
         'pad_token_id': 1,
         'projection_dim': 1280,
         'torch_dtype': 'float16',
         'transformers_version': '4.32.0.dev0',
         'vocab_size': 49408}),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_diffusers_configs_pass(name):
    from jaxdiff.models.clip import CLIPTextModel
    from jaxdiff.models.unet import UNet2DConditionModel
    from jaxdiff.models.vae import AutoencoderKL

    cls, config = REAL_CONFIGS[name]
    assert folder.check_fields(config, folder.CONFIG_DEFAULTS[cls], name, cls=cls).keys() <= config.keys()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fields jaxdiff does not read
        {"UNet2DConditionModel": UNet2DConditionModel, "AutoencoderKL": AutoencoderKL,
         "CLIPTextModel": CLIPTextModel}[cls].from_config(config)
