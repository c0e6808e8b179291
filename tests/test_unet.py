"""jaxdiff.models.unet against diffusers' UNet2DConditionModel (tiny random-weight configs)."""

from __future__ import annotations

import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdiff.models.unet import UNet2DConditionModel
from jaxdiff.weights.convert import WeightError, load_state_dict, to_state_dict
from tests.torch_utils import assert_close_rel, nchw_to_nhwc, nhwc_to_nchw, port, randomize_, state_dict_numpy

_SMALL = dict(in_channels=4, out_channels=4, norm_num_groups=8, sample_size=8)

CONFIGS = {
    # SD 1.x: conv proj_in/out, one head count for all blocks.
    "sd1": dict(_SMALL, block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=4,
                cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SD 2.x: linear proj_in/out, heads per block.
    "sd2": dict(_SMALL, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
                cross_attention_dim=24, use_linear_projection=True, upcast_attention=True,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # SDXL: text_time add-embedding, several transformer layers, layers per block as a list.
    "sdxl": dict(_SMALL, block_out_channels=(32, 64), layers_per_block=(1, 2), attention_head_dim=(2, 4),
                 cross_attention_dim=32, use_linear_projection=True, transformer_layers_per_block=(1, 2),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
    # The prompt pooled into the timestep embedding (addition_embed_type="text", DeepFloyd IF's
    # attention pooling): every resnet block sees the whole prompt, and takes it (with the time) as
    # FiLM scale and shift.
    "pooled": dict(_SMALL, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4,
                   cross_attention_dim=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text",
                   addition_embed_type_num_heads=4, resnet_time_scale_shift="scale_shift"),
    # Less common knobs: three levels, per-layer transformer depths, UNetMidBlock2D, mish, custom
    # time embedding, odd conv kernels (conv_out wider than the 11x7 test input, as in
    # configs/shapes_unet.py:wide_out), no flip / shifted frequencies, centred input.
    "knobs": dict(_SMALL, block_out_channels=(16, 32, 32), layers_per_block=1, attention_head_dim=2,
                  cross_attention_dim=16, act_fn="mish", norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  transformer_layers_per_block=((1,), (2,), (1,)),
                  reverse_transformer_layers_per_block=((1, 1), (2, 1), (1, 2)),
                  mid_block_type="UNetMidBlock2D", mid_block_scale_factor=1.5, time_embedding_dim=40,
                  timestep_post_act="gelu", time_embedding_act_fn="silu", conv_in_kernel=1, conv_out_kernel=9,
                  center_input_sample=True, downsample_padding=0),
}


@functools.cache
def _build(kind: str, seed: int = 0):
    """(torch model, its config.json dict, jaxdiff model, params) for CONFIGS[kind]."""
    torch.manual_seed(seed)
    torch_model = randomize_(diffusers.UNet2DConditionModel(**CONFIGS[kind]).eval(), 0.2, seed)
    return (torch_model, *port(torch_model, UNet2DConditionModel, "unet"))


@functools.cache
def _apply(kind: str, dtype=jnp.float32):
    """The jitted forward of CONFIGS[kind] at `dtype`, kept so tests share compilations."""
    _, config, _, params = _build(kind)
    model = UNet2DConditionModel.from_config(config, dtype=dtype)
    apply = jax.jit(model.apply)
    return lambda *args: apply({"params": params}, *args)


def _inputs(config: dict, batch: int, height: int, width: int, seed: int):
    """NHWC sample, per-item fractional timesteps, text states and (SDXL) added conditions."""
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, height, width, config["in_channels"]), np.float32)
    timesteps = np.array([999.0, 13.7, 500.25, 0.0][:batch], np.float32)
    context = rng.standard_normal((batch, 7, config["cross_attention_dim"]), np.float32)
    added = None
    if config.get("addition_embed_type") == "text_time":
        text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        time_ids = np.array([[64, 96, 0, 8, 64, 96], [128, 128, 16, 0, 96, 64]][:batch], np.float32)
        added = {"text_embeds": rng.standard_normal((batch, text_dim), np.float32), "time_ids": time_ids}
    return sample, timesteps, context, added


def _torch_forward(torch_model, sample, timesteps, context, added) -> np.ndarray:
    added_kwargs = None if added is None else {k: torch.from_numpy(v) for k, v in added.items()}
    with torch.no_grad():
        out = torch_model(torch.from_numpy(nhwc_to_nchw(sample)), torch.from_numpy(timesteps),
                          encoder_hidden_states=torch.from_numpy(context),
                          added_cond_kwargs=added_kwargs).sample
    return nchw_to_nhwc(out.numpy())


@pytest.mark.parametrize("kind,height,width,scalar_t", [
    ("sd1", 16, 16, True),  # one scalar timestep for the batch, broadcast as diffusers does
    ("sd1", 13, 9, False),  # odd sides: up blocks resize to the skip's size (diffusers' upsample_size)
    ("sd2", 12, 20, False),
    ("sdxl", 10, 14, False),
    ("pooled", 12, 8, False),
    ("knobs", 11, 7, False),
])
def test_matches_diffusers(kind, height, width, scalar_t):
    torch_model, config, _, _ = _build(kind)
    sample, timesteps, context, added = _inputs(config, 2, height, width, seed=1)
    if scalar_t:
        timesteps = np.float32(250.0)
        expected = _torch_forward(torch_model, sample, np.full((2,), timesteps), context, added)
    else:
        expected = _torch_forward(torch_model, sample, timesteps, context, added)
    actual = _apply(kind)(sample, timesteps, context, added)
    assert actual.shape == (2, height, width, config["out_channels"])
    assert_close_rel(actual, expected, 1e-4, f"{kind} {height}x{width}")


def test_bf16_compute_stays_close_to_fp32():
    _, config, _, params = _build("sdxl")
    args = _inputs(config, 2, 10, 14, seed=1)  # as in test_matches_diffusers: reuses its compile
    bf16 = _apply("sdxl", jnp.bfloat16)(*args)
    assert bf16.dtype == jnp.bfloat16
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))
    assert_close_rel(bf16, _apply("sdxl")(*args), 5e-2, "bf16 vs fp32")


@pytest.mark.parametrize("kind", ["sdxl", "pooled"])
def test_dummy_inputs_init_matches_torch_parameter_count(kind):
    torch_model, _, model, _ = _build(kind)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs(batch=2))["params"]
    n_jax = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert n_jax == sum(p.numel() for p in torch_model.parameters())


@pytest.mark.parametrize("field,value", [
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("encoder_hid_dim_type", "text_proj"),
    ("time_cond_proj_dim", 32),
    ("attention_type", "gated"),
    ("dual_cross_attention", True),
    ("only_cross_attention", True),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("resnet_time_scale_shift", "spatial"),
    ("addition_embed_type", "image"),
    ("addition_embed_type_num_heads", 5),  # with "text": must divide cross_attention_dim
    ("time_embedding_type", "fourier"),
    ("down_block_types", ("AttnDownBlock2D", "DownBlock2D")),
    ("up_block_types", ("UpBlock2D", "SimpleCrossAttnUpBlock2D")),
    ("act_fn", "tanh"),
])
def test_unsupported_config_raises_naming_the_field(field, value):
    config = {**CONFIGS["pooled" if field == "addition_embed_type_num_heads" else "sd1"], field: value}
    with pytest.raises(ValueError, match=field):
        UNet2DConditionModel.from_config(config)


def test_load_state_dict_rejects_missing_extra_and_misshaped_tensors():
    torch_model, _, model, _ = _build("sd1")
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
    good = state_dict_numpy(torch_model)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"

    missing = {k: v for k, v in good.items() if k != name}
    with pytest.raises(WeightError, match=f"missing tensor '{name}'"):
        load_state_dict(missing, shapes, what="unet")

    extra = {**good, "down_blocks.0.resnets.0.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(WeightError, match="down_blocks.0.resnets.0.extra.weight"):
        load_state_dict(extra, shapes, what="unet")

    misshaped = {**good, name: good[name][:, :-1]}
    with pytest.raises(WeightError, match=f"tensor '{name}' has shape"):
        load_state_dict(misshaped, shapes, what="unet")


@pytest.mark.parametrize("kind", ["sdxl", "pooled"])
def test_state_dict_round_trip(kind):
    """Params -> torch names and layouts (what export writes) give back the torch model's tensors."""
    torch_model, _, _, params = _build(kind)
    expected = state_dict_numpy(torch_model)
    actual = to_state_dict(params)
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)
