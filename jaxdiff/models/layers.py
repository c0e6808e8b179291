"""Primitive layers of the VAE and the U-Net: activations, norms, convs, timestep embeddings,
resnets and resamplers (`attention` and `blocks` build on them).

Every module mirrors a diffusers torch module and names its submodules exactly like it, so that
`jaxdiff.weights.convert` maps torch tensor names to Flax param paths mechanically
(`resnets.0.norm1.weight` <-> `resnets_0/norm1/scale`). Layout is NHWC throughout; `dtype` is the
compute dtype (params stay float32), and normalisation statistics and softmax run in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


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
