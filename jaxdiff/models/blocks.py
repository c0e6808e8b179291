"""The down, up and mid blocks of the U-Net and the VAE (diffusers.models.unets.unet_2d_blocks):
resnets, optional attention, then a resampler, named as diffusers names them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.attention import Attention, Transformer2DModel
from jaxdiff.models.layers import Downsample2D, Dtype, ResnetBlock2D, Upsample2D


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
