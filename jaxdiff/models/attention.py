"""Attention layers of the U-Net and the VAE (diffusers.models.attention_processor / attention /
transformers.transformer_2d), and the one scaled dot-product attention every model calls, the text
encoder's included. NHWC or [B, T, C] in; softmax in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import Dtype, conv2d, group_norm, layer_norm


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
