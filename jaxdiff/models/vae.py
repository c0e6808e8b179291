"""diffusers `AutoencoderKL` (the SD / SDXL VAE) in Flax linen, NHWC.

Built from a diffusers `vae/config.json` dict; submodules are named like the torch ones (`encoder/...`,
`decoder/...`, `quant_conv`, `post_quant_conv`) for `jaxdiff.weights.convert`.
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
from jaxdiff.models.layers import ACTIVATIONS, conv2d, group_norm

# `AutoencoderKL.__init__` defaults. scaling_factor, shift_factor, latents_mean/std and force_upcast
# are read by pipelines, not by the network; sample_size only sizes diffusers' tiling.
DEFAULTS: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1, act_fn="silu",
    latent_channels=4, norm_num_groups=32,
    sample_size=32, scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None,
    force_upcast=True, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
)

_EPS = 1e-6  # diffusers' Encoder/Decoder hard-code resnet and norm eps


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """A diffusers AutoencoderKL config, validated."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    act_fn: str
    latent_channels: int
    norm_num_groups: int
    use_quant_conv: bool
    use_post_quant_conv: bool
    mid_block_add_attention: bool

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> VAEConfig:
        cfg = with_defaults(config, DEFAULTS, "AutoencoderKL")
        n = len(cfg["block_out_channels"])
        for field, supported in (("down_block_types", "DownEncoderBlock2D"),
                                 ("up_block_types", "UpDecoderBlock2D")):
            for t in cfg[field]:
                if t != supported:
                    raise ValueError(f"AutoencoderKL config {field} entry {t!r} is not supported by jaxdiff "
                                     f"(supported: {supported})")
            if len(cfg[field]) != n:
                raise ValueError(f"AutoencoderKL config {field}={cfg[field]!r} must have one entry per "
                                 f"block_out_channels ({n})")
        if not isinstance(cfg["layers_per_block"], int):
            raise ValueError(f"AutoencoderKL config layers_per_block={cfg['layers_per_block']!r} "
                             "must be an int")
        if cfg["act_fn"].lower() not in ACTIVATIONS:
            raise ValueError(f"AutoencoderKL config act_fn={cfg['act_fn']!r} is not supported by jaxdiff "
                             f"(supported: {', '.join(sorted(ACTIVATIONS))})")
        return cls(
            in_channels=int(cfg["in_channels"]), out_channels=int(cfg["out_channels"]),
            block_out_channels=tuple(int(c) for c in cfg["block_out_channels"]),
            layers_per_block=cfg["layers_per_block"], act_fn=cfg["act_fn"],
            latent_channels=int(cfg["latent_channels"]), norm_num_groups=int(cfg["norm_num_groups"]),
            use_quant_conv=bool(cfg["use_quant_conv"]), use_post_quant_conv=bool(cfg["use_post_quant_conv"]),
            mid_block_add_attention=bool(cfg["mid_block_add_attention"]),
        )

    @property
    def block_spec(self) -> BlockSpec:
        return BlockSpec(groups=self.norm_num_groups, eps=_EPS, act_fn=self.act_fn)

    def mid_block(self, dtype: Any) -> UNetMidBlock2D:
        # Single-head attention (attention_head_dim = channels) unless mid_block_add_attention=False.
        head_dim = self.block_out_channels[-1] if self.mid_block_add_attention else None
        return UNetMidBlock2D(self.block_spec, num_layers=1, attention_head_dim=head_dim, dtype=dtype,
                              name="mid_block")

    def conv_out(self, x: jax.Array, features: int, dtype: Any) -> jax.Array:
        """conv_norm_out -> SiLU (hard-coded in diffusers, not act_fn) -> conv_out."""
        x = jax.nn.silu(group_norm(self.norm_num_groups, _EPS, dtype, "conv_norm_out")(x))
        return conv2d(features, 3, dtype, "conv_out")(x)


class Encoder(nn.Module):
    """diffusers `vae.Encoder` (double_z): conv_in, DownEncoderBlock2Ds (asymmetric-pad downsampling),
    resnet-attention-resnet mid block, norm/SiLU/conv_out to 2 * latent_channels."""

    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        channels = cfg.block_out_channels
        x = conv2d(channels[0], 3, self.dtype, "conv_in")(x)
        for i, out_channels in enumerate(channels):
            # downsample_padding=0: torch's asymmetric (0, 1, 0, 1) pad before the stride-2 conv.
            x, _ = DownBlock2D(out_channels, cfg.layers_per_block, cfg.block_spec,
                               add_downsample=i < len(channels) - 1, downsample_padding=0, dtype=self.dtype,
                               name=f"down_blocks_{i}")(x)
        x = cfg.mid_block(self.dtype)(x)
        return cfg.conv_out(x, 2 * cfg.latent_channels, self.dtype)


class Decoder(nn.Module):
    """diffusers `vae.Decoder` (norm_type="group"): conv_in, mid block, UpDecoderBlock2Ds with
    layers_per_block + 1 resnets and nearest-2x upsampling, norm/SiLU/conv_out."""

    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        channels = cfg.block_out_channels[::-1]
        x = conv2d(channels[0], 3, self.dtype, "conv_in")(z)
        x = cfg.mid_block(self.dtype)(x)
        for i, out_channels in enumerate(channels):
            x = UpBlock2D(out_channels, cfg.layers_per_block + 1, cfg.block_spec,
                          add_upsample=i < len(channels) - 1, dtype=self.dtype, name=f"up_blocks_{i}")(x)
        return cfg.conv_out(x, cfg.out_channels, self.dtype)


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL`: `encode` images (NHWC, [-1, 1]) to the posterior's (mean, logvar),
    `decode` latents to images. No scaling_factor / shift_factor and no clipping here: that is the
    pipeline's business. `__call__` encodes then decodes the mean, so `init` creates every param."""

    config: VAEConfig
    dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dtype: Any = jnp.float32) -> AutoencoderKL:
        return cls(VAEConfig.from_dict(config), dtype=dtype)

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        size = max(8, 2 ** (len(self.config.block_out_channels) - 1))
        return (jnp.zeros((batch, size, size, self.config.in_channels), jnp.float32),)

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, dtype=self.dtype)
        self.decoder = Decoder(cfg, dtype=self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = conv2d(2 * cfg.latent_channels, 1, self.dtype, "quant_conv")
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv2d(cfg.latent_channels, 1, self.dtype, "post_quant_conv")

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images -> (mean, logvar) of the latent posterior, after quant_conv, before scaling.

        logvar is clamped to [-30, 20] like diffusers' DiagonalGaussianDistribution.
        """
        h = self.encoder(images.astype(self.dtype))
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents -> raw decoder output (post_quant_conv applied; no clipping)."""
        z = latents.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images: jax.Array) -> jax.Array:
        mean, _ = self.encode(images)
        return self.decode(mean)
