"""jaxdiff.models.vae against diffusers' AutoencoderKL (tiny random-weight configs)."""

from __future__ import annotations

import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdiff.models.vae import AutoencoderKL
from jaxdiff.weights.convert import WeightError, load_state_dict
from tests.torch_utils import assert_close_rel, nchw_to_nhwc, nhwc_to_nchw, port, randomize_, state_dict_numpy

CONFIGS = {
    # SD-style: quant convs, mid-block attention, three levels.
    "sd": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
               down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
               layers_per_block=1, norm_num_groups=4, sample_size=32),
    # No quant_conv / post_quant_conv, no mid-block attention, two resnets per level.
    "bare": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 layers_per_block=2, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                 use_post_quant_conv=False, mid_block_add_attention=False),
}


@functools.cache
def _build(kind: str, seed: int = 0):
    """(torch model, its config.json dict, params) for CONFIGS[kind]."""
    torch.manual_seed(seed)
    torch_model = randomize_(diffusers.AutoencoderKL(**CONFIGS[kind]).eval(), 0.2, seed)
    config, _, params = port(torch_model, AutoencoderKL, "vae")
    return torch_model, config, params


@functools.cache
def _apply(kind: str, method: str, dtype=jnp.float32):
    """The jitted `encode` or `decode` of CONFIGS[kind] at `dtype`, shared between tests."""
    _, config, params = _build(kind)
    model = AutoencoderKL.from_config(config, dtype=dtype)
    fn = jax.jit(functools.partial(model.apply, method=method))
    return lambda x: fn({"params": params}, x)


def _images(batch: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (batch, height, width, 3)).astype(np.float32)


def _latents(kind: str, batch: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, height, width, CONFIGS[kind]["latent_channels"])).astype(np.float32)


@pytest.mark.parametrize("kind,height,width", [("sd", 20, 12), ("bare", 18, 14)])
def test_encode_matches_diffusers(kind, height, width):
    torch_model, _, _ = _build(kind)
    images = _images(2, height, width, seed=1)
    with torch.no_grad():
        dist = torch_model.encode(torch.from_numpy(nhwc_to_nchw(images))).latent_dist
    mean, logvar = _apply(kind, "encode")(images)
    assert_close_rel(mean, nchw_to_nhwc(dist.mean.numpy()), 1e-4, f"{kind} mean")
    assert_close_rel(logvar, nchw_to_nhwc(dist.logvar.numpy()), 1e-4, f"{kind} logvar")


@pytest.mark.parametrize("kind,height,width", [("sd", 5, 3), ("bare", 7, 6)])
def test_decode_matches_diffusers(kind, height, width):
    torch_model, _, _ = _build(kind)
    latents = _latents(kind, 2, height, width, seed=2)
    with torch.no_grad():
        expected = torch_model.decode(torch.from_numpy(nhwc_to_nchw(latents))).sample
    actual = _apply(kind, "decode")(latents)
    assert_close_rel(actual, nchw_to_nhwc(expected.numpy()), 1e-4, f"{kind} decode")


def test_bf16_compute_stays_close_to_fp32():
    images = _images(2, 20, 12, seed=1)
    latents = _latents("sd", 2, 5, 3, seed=2)  # same shapes as the parity tests: reuses their compiles
    for method, x in (("encode", images), ("decode", latents)):
        out32, out16 = _apply("sd", method)(x), _apply("sd", method, jnp.bfloat16)(x)
        out32, out16 = (out32[0], out16[0]) if method == "encode" else (out32, out16)
        assert out16.dtype == jnp.bfloat16
        assert_close_rel(out16, out32, 5e-2, f"bf16 {method}")


@pytest.mark.parametrize("field,value", [
    ("down_block_types", ("AttnDownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D")),
    ("up_block_types", ("UpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D")),
    ("act_fn", "tanh"),
])
def test_unsupported_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AutoencoderKL.from_config({**CONFIGS["sd"], field: value})


def test_load_state_dict_names_the_bad_tensor():
    torch_model, config, _ = _build("sd")
    model = AutoencoderKL.from_config(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
    good = state_dict_numpy(torch_model)
    name = "encoder.mid_block.attentions.0.group_norm.weight"
    with pytest.raises(WeightError, match=f"missing tensor '{name}'"):
        load_state_dict({k: v for k, v in good.items() if k != name}, shapes, what="vae")
    with pytest.raises(WeightError, match=f"tensor '{name}' has shape"):
        load_state_dict({**good, name: good[name][:-1]}, shapes, what="vae")
    # Without quant convs the same checkpoint has two tensors too many.
    bare = AutoencoderKL.from_config({**config, "use_quant_conv": False, "use_post_quant_conv": False})
    bare_shapes = jax.eval_shape(bare.init, jax.random.key(0), *bare.dummy_inputs())["params"]
    with pytest.raises(WeightError, match="unexpected tensor 'quant_conv.weight'"):
        load_state_dict(good, bare_shapes, what="vae")
