"""Building blocks shared by the VAE, the U-Net and the text encoder.

Every module mirrors a diffusers torch module and names its submodules exactly like it, so that
`jaxdiff.weights.convert` maps torch tensor names to Flax param paths mechanically
(`resnets.0.norm1.weight` <-> `resnets_0/norm1/scale`). Layout is NHWC throughout; `dtype` is the
compute dtype (params stay float32), and normalisation statistics and softmax run in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def multihead_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, *,
                        is_causal: bool = False) -> jax.Array:
    """Scaled dot-product attention over [B, T, num_heads * head_dim] projections.

    Goes through `jax.nn.dot_product_attention` so that each backend picks its fused kernel.
    """
    b, tq, inner = q.shape
    head_dim = inner // num_heads
    split = lambda x: x.reshape(x.shape[0], x.shape[1], num_heads, head_dim)
    out = jax.nn.dot_product_attention(split(q), split(k), split(v), is_causal=is_causal)
    return out.reshape(b, tq, inner)


# ----------------------------------------------------------------------------------------------
# Activations and primitive layers


def _mish(x: jax.Array) -> jax.Array:
    return x * jnp.tanh(jax.nn.softplus(x))


# diffusers.models.activations.ACT2CLS; torch's nn.GELU is the exact (erf) GELU.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "mish": _mish,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """diffusers `get_activation`: the activation called `name` (case-insensitive)."""
    try:
        return ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown activation function {name!r}; supported: {sorted(ACTIVATIONS)}") from None


def group_norm(num_groups: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
    # Two-pass variance (not E[x^2] - E[x]^2) to match torch's GroupNorm to float32 rounding;
    # flax reduces in float32 even when `dtype` is bf16.
    return nn.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def conv2d(features: int, kernel: int, dtype: Dtype, name: str, *, stride: int = 1,
           padding: int | None = None, use_bias: bool = True) -> nn.Conv:
    """torch `nn.Conv2d(kernel_size=kernel, stride, padding)` in NHWC; padding defaults to 'same'."""
    p = (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                   use_bias=use_bias, dtype=dtype, name=name)


# ----------------------------------------------------------------------------------------------
# Timestep embeddings (diffusers.models.embeddings)


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1.0, scale: float = 1.0,
                           max_period: int = 10000) -> jax.Array:
    """Sinusoidal embedding of [N] (possibly fractional) timesteps -> [N, embedding_dim] float32.

    Mirrors diffusers `get_timestep_embedding`: frequencies exp(-log(max_period) * i / (half_dim -
    downscale_freq_shift)), sin then cos (swapped when `flip_sin_to_cos`), zero-padded if odd.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {timesteps.shape}")
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half_dim, dtype=jnp.float32)
    exponent = exponent / (half_dim - downscale_freq_shift)
    emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = scale * emb
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half_dim:], emb[:, :half_dim]], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers `TimestepEmbedding`: linear_1 -> act -> linear_2 (-> post_act)."""

    time_embed_dim: int
    act_fn: str = "silu"
    post_act_fn: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array) -> jax.Array:
        sample = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(sample)
        sample = get_activation(self.act_fn)(sample)
        sample = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_2")(sample)
        if self.post_act_fn is not None:
            sample = get_activation(self.post_act_fn)(sample)
        return sample


class AttentionPooling(nn.Module):
    """diffusers `AttentionPooling` (from DeepFloyd IF): one query, the mean token plus a learned
    offset, attends over [that query; the tokens] -> [B, D]."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, _, d = x.shape
        offset = self.param("positional_embedding", nn.initializers.normal(d ** -0.5), (1, d), jnp.float32)
        query_token = x.mean(axis=1, keepdims=True) + offset.astype(x.dtype)
        x = jnp.concatenate([query_token, x], axis=1)
        heads = lambda y: y.reshape(b, y.shape[1], self.num_heads, d // self.num_heads)
        q = heads(nn.Dense(d, dtype=self.dtype, name="q_proj")(query_token))
        k = heads(nn.Dense(d, dtype=self.dtype, name="k_proj")(x))
        v = heads(nn.Dense(d, dtype=self.dtype, name="v_proj")(x))
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(d // self.num_heads)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, d)


class TextTimeEmbedding(nn.Module):
    """diffusers `TextTimeEmbedding` (`addition_embed_type="text"`): the text states pooled into one
    vector that is added to the timestep embedding, so every resnet block sees the whole prompt."""

    time_embed_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, text_states: jax.Array) -> jax.Array:
        x = layer_norm(1e-5, self.dtype, "norm1")(text_states)
        x = AttentionPooling(self.num_heads, self.dtype, name="pool")(x)
        x = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="proj")(x)
        return layer_norm(1e-5, self.dtype, "norm2")(x)


# ----------------------------------------------------------------------------------------------
# Convolutional blocks (diffusers.models.resnet / downsampling / upsampling)


RESNET_TIME_NORMS = ("default", "scale_shift")


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D`. How the time embedding enters (`time_embedding_norm`, the U-Net's
    `resnet_time_scale_shift`):
    - "default" (SD): added to conv1's output, before norm2;
    - "scale_shift" (FiLM, as in DDPM++/ADM): norm2's output times (1 + scale) plus shift. Unlike an
      addition before a norm, it can switch the conv1 path off (scale = -1) and put a clean constant
      in its place, which the zero padding of conv2 turns into a field that varies by position: at
      t = T, where the input is pure noise, that is what the layout is drawn from.

    `temb=None` (VAE) means no `time_emb_proj`. A 1x1 `conv_shortcut` exists iff channels change.
    """

    out_channels: int
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    time_embedding_norm: str = "default"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        act = get_activation(self.act_fn)
        h = act(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv2d(self.out_channels, 3, self.dtype, "conv1")(h)
        film = temb is not None and self.time_embedding_norm == "scale_shift"
        if temb is not None:
            t = nn.Dense(self.out_channels * (2 if film else 1), dtype=self.dtype,
                         name="time_emb_proj")(act(temb))[:, None, None, :]
            if not film:
                h = h + t
        groups_out = self.groups if self.groups_out is None else self.groups_out
        h = group_norm(groups_out, self.eps, self.dtype, "norm2")(h)
        if film:
            scale, shift = jnp.split(t, 2, axis=-1)
            h = h * (1 + scale) + shift
        h = act(h)
        h = conv2d(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv2d(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """diffusers `Downsample2D(use_conv=True)`: stride-2 3x3 `conv`.

    padding=0 means torch's asymmetric (0, 1, 0, 1) zero pad (right/bottom) then a VALID conv (VAE);
    otherwise a symmetric pad of `padding` (U-Net, padding=1).
    """

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv2d(self.out_channels, 3, self.dtype, "conv", stride=2, padding=self.padding)(x)


def _nearest_source_index(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output pixel of torch `F.interpolate(mode="nearest", size=out_size)`.

    torch computes floor(dst * (in / out)) in float32 (exact halving for out == 2 * in).
    """
    if out_size == 2 * in_size:
        return np.arange(out_size) // 2
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """NHWC nearest-neighbour resize with torch's index rule (see `_nearest_source_index`)."""
    for axis, out_size in ((1, size[0]), (2, size[1])):
        in_size = x.shape[axis]
        if out_size == 2 * in_size:
            x = jnp.repeat(x, 2, axis=axis)
        elif out_size != in_size:
            x = jnp.take(x, jnp.asarray(_nearest_source_index(in_size, out_size)), axis=axis)
    return x


class Upsample2D(nn.Module):
    """diffusers `Upsample2D(use_conv=True)`: nearest resize (2x, or to `output_size`) then 3x3 `conv`."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: Sequence[int] | None = None) -> jax.Array:
        size = (2 * x.shape[1], 2 * x.shape[2]) if output_size is None else tuple(output_size)
        x = resize_nearest(x, size)
        return conv2d(self.out_channels, 3, self.dtype, "conv")(x)


# ----------------------------------------------------------------------------------------------
# Attention (diffusers.models.attention_processor / attention / transformers.transformer_2d)


class Attention(nn.Module):
    """diffusers `Attention` with `AttnProcessor2_0`, the subset SD uses.

    Accepts [B, T, C] or NHWC input (flattened to H*W tokens, as diffusers does for 4-D input).
    Optional `group_norm` before the projections, `residual_connection` and division by
    `rescale_output_factor` afterwards (the VAE mid-block attention uses all three).
    """

    heads: int
    dim_head: int
    bias: bool = False  # bias of to_q/to_k/to_v; to_out.0 always has one
    norm_num_groups: int | None = None
    eps: float = 1e-5
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        residual = x
        if self.norm_num_groups is not None:
            # Same statistics as diffusers' norm over [B, C, H*W]: groups of channels, all positions.
            x = group_norm(self.norm_num_groups, self.eps, self.dtype, "group_norm")(x)
        shape = x.shape
        if x.ndim == 4:
            x = x.reshape(shape[0], shape[1] * shape[2], shape[3])
        context = x if context is None else context
        inner = self.heads * self.dim_head
        dense = lambda name, bias: nn.Dense(inner, use_bias=bias, dtype=self.dtype, name=name)
        q = dense("to_q", self.bias)(x)
        k = dense("to_k", self.bias)(context)
        v = dense("to_v", self.bias)(context)
        out = multihead_attention(q, k, v, self.heads)
        out = nn.Dense(shape[-1], dtype=self.dtype, name="to_out_0")(out)
        out = out.reshape(shape)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor


class GEGLU(nn.Module):
    """diffusers `GEGLU`: `proj` to 2 * dim_out, split into (hidden, gate), hidden * gelu(gate)."""

    dim_out: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(nn.Dense(2 * self.dim_out, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers `FeedForward(activation_fn="geglu")`: net.0 = GEGLU, net.1 = dropout, net.2 = Linear."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(x)


class BasicTransformerBlock(nn.Module):
    """diffusers `BasicTransformerBlock` (norm_type="layer_norm"): pre-norm self-attention, then
    cross-attention over `context` (self-attention again if it is None, as in diffusers), then a
    GEGLU feed-forward, each with a residual. `cross_attention=False` drops norm2/attn2 (diffusers'
    `cross_attention_dim=None`)."""

    dim: int
    num_attention_heads: int
    attention_head_dim: int
    cross_attention: bool = True
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        attn = lambda name: Attention(self.num_attention_heads, self.attention_head_dim, dtype=self.dtype,
                                      name=name)
        norm = lambda name: layer_norm(self.norm_eps, self.dtype, name)
        x = x + attn("attn1")(norm("norm1")(x))
        if self.cross_attention:
            x = x + attn("attn2")(norm("norm2")(x), context)
        return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
    """diffusers `Transformer2DModel` on continuous NHWC input: GroupNorm(eps 1e-6) `norm`,
    `proj_in` (1x1 conv before flattening, or Linear after it when `use_linear_projection`),
    `transformer_blocks`, `proj_out` likewise, plus the input as residual."""

    num_attention_heads: int
    attention_head_dim: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        b, h, w, c = x.shape
        inner = self.num_attention_heads * self.attention_head_dim
        residual = x
        x = group_norm(self.norm_num_groups, 1e-6, self.dtype, "norm")(x)
        if self.use_linear_projection:
            x = nn.Dense(inner, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))
        else:
            x = conv2d(inner, 1, self.dtype, "proj_in")(x).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            x = BasicTransformerBlock(inner, self.num_attention_heads, self.attention_head_dim,
                                      dtype=self.dtype, name=f"transformer_blocks_{i}")(x, context)
        if self.use_linear_projection:
            x = nn.Dense(c, dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)
        else:
            x = conv2d(c, 1, self.dtype, "proj_out")(x.reshape(b, h, w, inner))
        return x + residual


# ----------------------------------------------------------------------------------------------
# U-Net / VAE blocks (diffusers.models.unets.unet_2d_blocks)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """What the resnets and attentions of one diffusers block are built with.

    `num_attention_heads=None` gives the plain blocks (DownBlock2D, UpBlock2D, DownEncoderBlock2D,
    UpDecoderBlock2D); otherwise each resnet is followed by a Transformer2DModel with
    `transformer_layers[i]` BasicTransformerBlocks (the CrossAttn* blocks).
    """

    groups: int = 32
    eps: float = 1e-6
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    num_attention_heads: int | None = None
    transformer_layers: tuple[int, ...] = ()
    use_linear_projection: bool = False
    time_embedding_norm: str = "default"

    def resnet(self, out_channels: int, dtype: Dtype, name: str) -> ResnetBlock2D:
        return ResnetBlock2D(out_channels, groups=self.groups, eps=self.eps, act_fn=self.act_fn,
                             output_scale_factor=self.output_scale_factor,
                             time_embedding_norm=self.time_embedding_norm, dtype=dtype, name=name)

    def transformer(self, channels: int, i: int, dtype: Dtype, name: str) -> Transformer2DModel | None:
        if self.num_attention_heads is None:
            return None
        # diffusers passes `out_channels // num_attention_heads` as the head dim.
        return Transformer2DModel(self.num_attention_heads, channels // self.num_attention_heads,
                                  num_layers=self.transformer_layers[i], norm_num_groups=self.groups,
                                  use_linear_projection=self.use_linear_projection, dtype=dtype, name=name)


class DownBlock2D(nn.Module):
    """diffusers `DownBlock2D` / `CrossAttnDownBlock2D` / `DownEncoderBlock2D` (see `BlockSpec`).

    Returns the output and the states the U-Net keeps as skips (each layer's output, then the
    downsampled one).
    """

    out_channels: int
    num_layers: int
    spec: BlockSpec
    add_downsample: bool = True
    downsample_padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None,
                 context: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        states = []
        for i in range(self.num_layers):
            x = self.spec.resnet(self.out_channels, self.dtype, f"resnets_{i}")(x, temb)
            attn = self.spec.transformer(self.out_channels, i, self.dtype, f"attentions_{i}")
            if attn is not None:
                x = attn(x, context)
            states.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, dtype=self.dtype,
                             name="downsamplers_0")(x)
            states.append(x)
        return x, tuple(states)


class UpBlock2D(nn.Module):
    """diffusers `UpBlock2D` / `CrossAttnUpBlock2D` / `UpDecoderBlock2D` (see `BlockSpec`).

    With `skips`, each resnet first concatenates the last remaining skip on channels (U-Net);
    without, it is the decoder block. The upsampler resizes to `upsample_size` when given.
    """

    out_channels: int
    num_layers: int
    spec: BlockSpec
    add_upsample: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skips: Sequence[jax.Array] | None = None, temb: jax.Array | None = None,
                 context: jax.Array | None = None, upsample_size: Sequence[int] | None = None) -> jax.Array:
        if skips is not None and len(skips) != self.num_layers:
            raise ValueError(f"{self.name}: expected {self.num_layers} skip states, got {len(skips)}")
        for i in range(self.num_layers):
            if skips is not None:
                x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = self.spec.resnet(self.out_channels, self.dtype, f"resnets_{i}")(x, temb)
            attn = self.spec.transformer(self.out_channels, i, self.dtype, f"attentions_{i}")
            if attn is not None:
                x = attn(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x, upsample_size)
        return x


class UNetMidBlock2D(nn.Module):
    """diffusers `UNetMidBlock2DCrossAttn` (spec.num_attention_heads set) or `UNetMidBlock2D`.

    resnets_0, then `num_layers` x (attentions_i, resnets_{i+1}). For UNetMidBlock2D the attention
    is a spatial self-attention with `attention_head_dim` channels per head, group_norm, residual and
    rescale (VAE), or absent when `attention_head_dim` is None (`add_attention=False`).
    """

    spec: BlockSpec
    num_layers: int = 1
    attention_head_dim: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None,
                 context: jax.Array | None = None) -> jax.Array:
        channels = x.shape[-1]
        x = self.spec.resnet(channels, self.dtype, "resnets_0")(x, temb)
        for i in range(self.num_layers):
            name = f"attentions_{i}"
            attn = self.spec.transformer(channels, i, self.dtype, name)
            if attn is not None:
                x = attn(x, context)
            elif self.attention_head_dim is not None:
                x = Attention(channels // self.attention_head_dim, self.attention_head_dim, bias=True,
                              norm_num_groups=self.spec.groups, eps=self.spec.eps, residual_connection=True,
                              rescale_output_factor=self.spec.output_scale_factor, dtype=self.dtype,
                              name=name)(x)
            x = self.spec.resnet(channels, self.dtype, f"resnets_{i + 1}")(x, temb)
        return x
