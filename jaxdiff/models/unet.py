"""diffusers `UNet2DConditionModel` (SD 1.x / 2.x / XL) in Flax linen, NHWC.

Built from a diffusers `unet/config.json` dict; submodules are named like the torch ones so that
`jaxdiff.weights.convert.load_state_dict` maps checkpoints onto the params. Config values this
port does not implement raise `ValueError` naming the field instead of being ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.config import with_defaults
from jaxdiff.models.blocks import BlockSpec, DownBlock2D, UNetMidBlock2D, UpBlock2D
from jaxdiff.models.layers import (ACTIVATIONS, RESNET_TIME_NORMS, TextTimeEmbedding, TimestepEmbedding, conv2d,
                                   get_activation, get_timestep_embedding, group_norm)

# `UNet2DConditionModel.__init__` defaults of diffusers 0.3x-0.4x.
DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1.0, dropout=0.0, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1,
    reverse_transformer_layers_per_block=None, encoder_hid_dim=None, encoder_hid_dim_type=None,
    attention_head_dim=8, num_attention_heads=None, dual_cross_attention=False, use_linear_projection=False,
    class_embed_type=None, addition_embed_type=None, addition_time_embed_dim=None, num_class_embeds=None,
    upcast_attention=False, resnet_time_scale_shift="default", resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0, time_embedding_type="positional", time_embedding_dim=None,
    time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3,
    conv_out_kernel=3, projection_class_embeddings_input_dim=None, attention_type="default",
    class_embeddings_concat=False, mid_block_only_cross_attention=None, cross_attention_norm=None,
    addition_embed_type_num_heads=64,
)
CONFIG_FIELDS = frozenset(DEFAULTS)  # the diffusers config keys this port reads (others are ignored)

# Accepted and, as in diffusers for the block types supported here, without effect: dropout (inference
# only), upcast_attention (attention logits and softmax are always float32 here), sample_size, and
# resnet_skip_time_act, resnet_out_scale_factor, cross_attention_norm, mid_block_only_cross_attention,
# which diffusers only passes to ResnetDownsample / SimpleCrossAttn blocks, rejected below.

_DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
_UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)


def _unsupported(field: str, value: Any, supported: str) -> ValueError:
    return ValueError(f"UNet2DConditionModel config {field}={value!r} is not supported by jaxdiff "
                      f"(supported: {supported})")


def _per_block(cfg: Mapping[str, Any], field: str, n: int) -> tuple:
    """An int-or-list config value as one entry per down block (diffusers broadcasts scalars)."""
    value = cfg[field]
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet2DConditionModel config {field}={value!r} must have one entry per down "
                             f"block ({n})")
        return tuple(value)
    return (value,) * n


def _transformer_layers(value: Any, num_layers: int, field: str) -> tuple[int, ...]:
    """One block's `transformer_layers_per_block` entry (int, or one int per resnet) per resnet."""
    if isinstance(value, (list, tuple)):
        if len(value) < num_layers:
            raise ValueError(f"UNet2DConditionModel config {field} entry {value!r} has fewer than "
                             f"{num_layers} entries")
        return tuple(int(v) for v in value[:num_layers])
    return (int(value),) * num_layers


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """A diffusers UNet2DConditionModel config, validated and resolved to per-block values."""

    in_channels: int
    out_channels: int
    center_input_sample: bool
    flip_sin_to_cos: bool
    freq_shift: float
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    mid_block_type: str | None
    layers_per_block: tuple[int, ...]
    num_attention_heads: tuple[int, ...]
    down_transformer_layers: tuple[tuple[int, ...], ...]
    mid_transformer_layers: tuple[int, ...]
    up_transformer_layers: tuple[tuple[int, ...], ...]
    cross_attention_dim: int
    use_linear_projection: bool
    downsample_padding: int
    mid_block_scale_factor: float
    act_fn: str
    norm_num_groups: int
    norm_eps: float
    time_embed_dim: int
    resnet_time_scale_shift: str
    timestep_post_act: str | None
    time_embedding_act_fn: str | None
    addition_embed_type: str | None
    addition_embed_type_num_heads: int
    addition_time_embed_dim: int | None
    projection_class_embeddings_input_dim: int | None
    conv_in_kernel: int
    conv_out_kernel: int

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> UNetConfig:
        cfg = with_defaults(config, DEFAULTS, "UNet2DConditionModel")

        # Features this port does not implement: fail loudly rather than compute something else.
        must_be = dict(class_embed_type=None, num_class_embeds=None, encoder_hid_dim=None,
                       encoder_hid_dim_type=None, time_cond_proj_dim=None, num_attention_heads=None,
                       dual_cross_attention=False, class_embeddings_concat=False, attention_type="default",
                       time_embedding_type="positional")
        for field, supported in must_be.items():
            if cfg[field] != supported:
                raise _unsupported(field, cfg[field], repr(supported))
        if cfg["resnet_time_scale_shift"] not in RESNET_TIME_NORMS:
            raise _unsupported("resnet_time_scale_shift", cfg["resnet_time_scale_shift"],
                               " or ".join(map(repr, RESNET_TIME_NORMS)))
        only_cross = cfg["only_cross_attention"]
        if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
            raise _unsupported("only_cross_attention", only_cross, "False")
        if cfg["addition_embed_type"] not in (None, "text", "text_time"):
            raise _unsupported("addition_embed_type", cfg["addition_embed_type"], "None, 'text' or 'text_time'")
        if cfg["addition_embed_type"] == "text_time":
            for field in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if cfg[field] is None:
                    raise ValueError(f"UNet2DConditionModel config {field} must be set when "
                                     "addition_embed_type='text_time'")
        if cfg["norm_num_groups"] is None:
            raise _unsupported("norm_num_groups", None, "an int")
        for field in ("act_fn", "timestep_post_act", "time_embedding_act_fn"):
            if cfg[field] is not None and cfg[field].lower() not in ACTIVATIONS:
                raise _unsupported(field, cfg[field], ", ".join(sorted(ACTIVATIONS)))

        # diffusers strips a "UNetRes" prefix from block type names.
        strip = lambda t: t[7:] if t.startswith("UNetRes") else t
        down_types = tuple(strip(t) for t in cfg["down_block_types"])
        up_types = tuple(strip(t) for t in cfg["up_block_types"])
        for field, types, supported in (("down_block_types", down_types, _DOWN_TYPES),
                                        ("up_block_types", up_types, _UP_TYPES)):
            for t in types:
                if t not in supported:
                    raise _unsupported(field, t, ", ".join(supported))
        if cfg["mid_block_type"] not in _MID_TYPES:
            raise _unsupported("mid_block_type", cfg["mid_block_type"], ", ".join(map(str, _MID_TYPES)))

        n = len(down_types)
        block_out_channels = tuple(int(c) for c in cfg["block_out_channels"])
        if len(up_types) != n or len(block_out_channels) != n:
            raise ValueError(f"UNet2DConditionModel config: down_block_types ({n}), up_block_types "
                             f"({len(up_types)}) and block_out_channels ({len(block_out_channels)}) must "
                             "have the same length")
        # diffusers' naming bug: `attention_head_dim` is the number of heads.
        heads = _per_block(cfg, "attention_head_dim", n)
        layers = tuple(int(v) for v in _per_block(cfg, "layers_per_block", n))
        cross_dims = set(_per_block(cfg, "cross_attention_dim", n))
        if len(cross_dims) != 1:
            # Would need one encoder_hidden_states per block; diffusers' forward cannot run it either.
            raise _unsupported("cross_attention_dim", cfg["cross_attention_dim"], "one value for all blocks")
        (cross_dim,) = cross_dims
        if cfg["addition_embed_type"] == "text" and cross_dim % cfg["addition_embed_type_num_heads"]:
            raise ValueError(f"UNet2DConditionModel config addition_embed_type_num_heads="
                             f"{cfg['addition_embed_type_num_heads']} must divide cross_attention_dim="
                             f"{cross_dim} (the pooled text states are split into heads)")

        tlpb = _per_block(cfg, "transformer_layers_per_block", n)
        reverse = cfg["reverse_transformer_layers_per_block"]
        if reverse is None:
            if any(isinstance(v, (list, tuple)) for v in tlpb):
                raise ValueError("UNet2DConditionModel config: reverse_transformer_layers_per_block must be "
                                 "set when transformer_layers_per_block has per-layer lists")
            reverse = tlpb[::-1]
        elif len(reverse) != n:
            raise ValueError(f"UNet2DConditionModel config reverse_transformer_layers_per_block={reverse!r} "
                             f"must have {n} entries")

        return cls(
            in_channels=int(cfg["in_channels"]), out_channels=int(cfg["out_channels"]),
            center_input_sample=bool(cfg["center_input_sample"]),
            flip_sin_to_cos=bool(cfg["flip_sin_to_cos"]), freq_shift=cfg["freq_shift"],
            block_out_channels=block_out_channels, down_block_types=down_types, up_block_types=up_types,
            mid_block_type=cfg["mid_block_type"], layers_per_block=layers,
            num_attention_heads=tuple(int(h) for h in heads),
            down_transformer_layers=tuple(_transformer_layers(v, layers[i], "transformer_layers_per_block")
                                          for i, v in enumerate(tlpb)),
            mid_transformer_layers=_transformer_layers(tlpb[-1], 1, "transformer_layers_per_block"),
            up_transformer_layers=tuple(
                _transformer_layers(v, layers[::-1][i] + 1, "reverse_transformer_layers_per_block")
                for i, v in enumerate(reverse)),
            cross_attention_dim=int(cross_dim),
            use_linear_projection=bool(cfg["use_linear_projection"]),
            downsample_padding=int(cfg["downsample_padding"]),
            mid_block_scale_factor=float(cfg["mid_block_scale_factor"]), act_fn=cfg["act_fn"],
            norm_num_groups=int(cfg["norm_num_groups"]), norm_eps=float(cfg["norm_eps"]),
            time_embed_dim=int(cfg["time_embedding_dim"] or block_out_channels[0] * 4),
            resnet_time_scale_shift=cfg["resnet_time_scale_shift"],
            timestep_post_act=cfg["timestep_post_act"], time_embedding_act_fn=cfg["time_embedding_act_fn"],
            addition_embed_type=cfg["addition_embed_type"],
            addition_embed_type_num_heads=int(cfg["addition_embed_type_num_heads"]),
            addition_time_embed_dim=cfg["addition_time_embed_dim"],
            projection_class_embeddings_input_dim=cfg["projection_class_embeddings_input_dim"],
            conv_in_kernel=int(cfg["conv_in_kernel"]), conv_out_kernel=int(cfg["conv_out_kernel"]),
        )

    def block_spec(self, heads: int | None = None, transformer_layers: tuple[int, ...] = (),
                   output_scale_factor: float = 1.0) -> BlockSpec:
        return BlockSpec(groups=self.norm_num_groups, eps=self.norm_eps, act_fn=self.act_fn,
                         output_scale_factor=output_scale_factor, num_attention_heads=heads,
                         transformer_layers=transformer_layers,
                         use_linear_projection=self.use_linear_projection,
                         time_embedding_norm=self.resnet_time_scale_shift)


class UNet2DConditionModel(nn.Module):
    """diffusers `UNet2DConditionModel.forward` for sample, timestep, encoder_hidden_states and, for
    SDXL (`addition_embed_type="text_time"`), added_cond_kwargs {"text_embeds", "time_ids"}.
    `addition_embed_type="text"` adds the attention-pooled text states to the timestep embedding.

    Inputs and output are NHWC; the output is in the compute `dtype`.
    """

    config: UNetConfig
    dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dtype: Any = jnp.float32) -> UNet2DConditionModel:
        return cls(UNetConfig.from_dict(config), dtype=dtype)

    def dummy_inputs(self, batch: int = 1) -> tuple:
        """(sample, timesteps, encoder_hidden_states, added_cond) to `init` the params with."""
        cfg = self.config
        size = max(8, 2 ** (len(cfg.block_out_channels) - 1))
        sample = jnp.zeros((batch, size, size, cfg.in_channels), jnp.float32)
        timesteps = jnp.ones((batch,), jnp.float32)
        context = jnp.zeros((batch, 4, cfg.cross_attention_dim), jnp.float32)
        added_cond = None
        if cfg.addition_embed_type == "text_time":
            text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            if text_dim <= 0:
                raise ValueError(
                    "UNet2DConditionModel config projection_class_embeddings_input_dim="
                    f"{cfg.projection_class_embeddings_input_dim} leaves no room for text_embeds next to "
                    f"6 time ids of addition_time_embed_dim={cfg.addition_time_embed_dim}")
            added_cond = {"text_embeds": jnp.zeros((batch, text_dim), jnp.float32),
                          "time_ids": jnp.zeros((batch, 6), jnp.float32)}
        return sample, timesteps, context, added_cond

    def _time_embedding(self, timesteps: jax.Array, batch: int, added_cond: Mapping[str, jax.Array] | None,
                        context: jax.Array):
        cfg = self.config
        # Timesteps stay float32 (fractional values are legal); a scalar or [1] is broadcast.
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
        t_emb = get_timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = TimestepEmbedding(cfg.time_embed_dim, act_fn=cfg.act_fn, post_act_fn=cfg.timestep_post_act,
                                dtype=self.dtype, name="time_embedding")(t_emb)
        if cfg.addition_embed_type == "text_time":
            if added_cond is None or "text_embeds" not in added_cond or "time_ids" not in added_cond:
                raise ValueError("addition_embed_type='text_time' needs added_cond with 'text_embeds' and "
                                 "'time_ids'")
            text_embeds = jnp.asarray(added_cond["text_embeds"], jnp.float32)
            time_ids = jnp.asarray(added_cond["time_ids"], jnp.float32)
            # Each micro-conditioning id is embedded like a timestep, then all are flattened per item.
            time_embeds = get_timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                                 cfg.flip_sin_to_cos, cfg.freq_shift)
            add = jnp.concatenate([text_embeds, time_embeds.reshape(text_embeds.shape[0], -1)], axis=-1)
            # diffusers builds add_embedding with TimestepEmbedding's default act ("silu"), not act_fn.
            emb = emb + TimestepEmbedding(cfg.time_embed_dim, dtype=self.dtype, name="add_embedding")(add)
        elif cfg.addition_embed_type == "text":
            emb = emb + TextTimeEmbedding(cfg.time_embed_dim, cfg.addition_embed_type_num_heads,
                                          dtype=self.dtype, name="add_embedding")(context)
        if cfg.time_embedding_act_fn is not None:
            emb = get_activation(cfg.time_embedding_act_fn)(emb)
        return emb

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 added_cond: Mapping[str, jax.Array] | None = None) -> jax.Array:
        cfg = self.config
        n = len(cfg.block_out_channels)
        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        context = encoder_hidden_states.astype(self.dtype)
        emb = self._time_embedding(timesteps, x.shape[0], added_cond, context)

        x = conv2d(cfg.block_out_channels[0], cfg.conv_in_kernel, self.dtype, "conv_in")(x)
        skips = [x]
        for i, block_type in enumerate(cfg.down_block_types):
            cross = block_type == "CrossAttnDownBlock2D"
            spec = cfg.block_spec(cfg.num_attention_heads[i] if cross else None,
                                  cfg.down_transformer_layers[i])
            x, states = DownBlock2D(cfg.block_out_channels[i], cfg.layers_per_block[i], spec,
                                    add_downsample=i < n - 1, downsample_padding=cfg.downsample_padding,
                                    dtype=self.dtype, name=f"down_blocks_{i}")(x, emb, context)
            skips.extend(states)

        if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
            spec = cfg.block_spec(cfg.num_attention_heads[-1], cfg.mid_transformer_layers,
                                  output_scale_factor=cfg.mid_block_scale_factor)
            x = UNetMidBlock2D(spec, num_layers=1, dtype=self.dtype, name="mid_block")(x, emb, context)
        elif cfg.mid_block_type == "UNetMidBlock2D":
            # diffusers builds it with num_layers=0 and no attention: a single resnet.
            spec = cfg.block_spec(output_scale_factor=cfg.mid_block_scale_factor)
            x = UNetMidBlock2D(spec, num_layers=0, dtype=self.dtype, name="mid_block")(x, emb)

        reversed_channels = cfg.block_out_channels[::-1]
        reversed_heads = cfg.num_attention_heads[::-1]
        reversed_layers = cfg.layers_per_block[::-1]
        for i, block_type in enumerate(cfg.up_block_types):
            num_layers = reversed_layers[i] + 1
            res, skips = skips[-num_layers:], skips[:-num_layers]
            is_final = i == n - 1
            # diffusers passes the next skip's size only when a side is not divisible by the overall
            # up factor; otherwise that size is exactly 2x, so always passing it is equivalent.
            upsample_size = None if is_final else skips[-1].shape[1:3]
            cross = block_type == "CrossAttnUpBlock2D"
            spec = cfg.block_spec(reversed_heads[i] if cross else None, cfg.up_transformer_layers[i])
            x = UpBlock2D(reversed_channels[i], num_layers, spec, add_upsample=not is_final, dtype=self.dtype,
                          name=f"up_blocks_{i}")(x, res, emb, context, upsample_size)

        x = group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, "conv_norm_out")(x)
        x = get_activation(cfg.act_fn)(x)
        return conv2d(cfg.out_channels, cfg.conv_out_kernel, self.dtype, "conv_out")(x)
