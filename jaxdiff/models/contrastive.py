"""CLIP's contrastive objective for pretraining a text encoder on a data set's own image-caption pairs.

Stable Diffusion conditions on a CLIP text encoder that was trained contrastively against images
before any U-Net saw it. A text encoder trained only through the U-Net's loss learns what that loss
rewards first, which objects a caption names, and can lose the rest: on the shapes data the jointly
trained encoder of the bundled model ends up reading "a red circle to the left of a blue square" and
"a red circle to the right of a blue square" alike, and no U-Net can draw a relation its conditioning
does not carry. The contrastive loss rewards exactly that difference as soon as a batch holds two
captions with the same words and different layouts, so the encoder learns which object goes where.

`ContrastiveHeads` holds what the objective needs beside the text encoder itself: an image tower, the
text projection and the learned temperature. They are training-only (a diffusers pipeline has no slot
for them); the text encoder stays a plain `CLIPTextModel`.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DEFAULTS = dict(patch_size=4, channels=(64, 128, 128), norm_num_groups=8, projection_dim=128,
                logit_scale_init=math.log(1 / 0.07))  # CLIP's initial temperature, 0.07


class ContrastiveHeads(nn.Module):
    """(images [B, H, W, 3] in [-1, 1], pooled text states [B, D]) -> (unit image embeddings,
    unit text embeddings, logit scale)."""

    patch_size: int = DEFAULTS["patch_size"]
    channels: Sequence[int] = DEFAULTS["channels"]
    norm_num_groups: int = DEFAULTS["norm_num_groups"]
    projection_dim: int = DEFAULTS["projection_dim"]
    logit_scale_init: float = DEFAULTS["logit_scale_init"]

    @classmethod
    def from_config(cls, config: Mapping) -> ContrastiveHeads:
        unknown = set(config) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown model.contrastive fields {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        return cls(**{k: tuple(v) if k == "channels" else v for k, v in config.items()})

    @nn.compact
    def __call__(self, images: jax.Array, pooled_text: jax.Array):
        p = self.patch_size
        x = nn.Conv(self.channels[0], (p, p), strides=p, padding="VALID", name="patchify")(images)
        x = nn.gelu(nn.GroupNorm(self.norm_num_groups, name="patchify_norm")(x))
        for i, ch in enumerate(self.channels[1:]):
            x = nn.Conv(ch, (3, 3), strides=2, name=f"down_{i}")(x)
            x = nn.gelu(nn.GroupNorm(self.norm_num_groups, name=f"down_{i}_norm")(x))
        # Flattened, not pooled: where each object is, is what the captions' relations are about.
        image = nn.Dense(self.projection_dim, name="image_projection")(x.reshape(x.shape[0], -1))
        text = nn.Dense(self.projection_dim, use_bias=False, name="text_projection")(pooled_text)
        unit = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
        # Learned as an offset from its initial value (params start at 0, see pipeline.init_params).
        scale = jnp.exp(self.logit_scale_init + self.param("logit_scale", nn.initializers.zeros, ()))
        return unit(image.astype(jnp.float32)), unit(text.astype(jnp.float32)), scale

    def param_shapes(self, resolution: int, text_width: int) -> dict:
        """The params pytree as `jax.ShapeDtypeStruct`s, for images of `resolution`."""
        images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
        pooled = jax.ShapeDtypeStruct((1, text_width), jnp.float32)
        return jax.eval_shape(self.init, jax.random.key(0), images, pooled)["params"]


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, scale, valid: jax.Array) -> jax.Array:
    """CLIP's symmetric cross-entropy, per example [B]: row i's image against every caption of the
    batch, and its caption against every image. Rows where `valid` is False (padding) are nobody's
    negative, and their own loss is 0."""
    logits = scale * image_emb @ text_emb.T  # [images, captions]
    # A large finite value, not -inf: a padding row is all masked, and its softmax must stay finite.
    logits = jnp.where(valid[:, None] & valid[None, :], logits, -1e9)
    image_to_text = -jnp.diagonal(jax.nn.log_softmax(logits, axis=1))
    text_to_image = -jnp.diagonal(jax.nn.log_softmax(logits, axis=0))
    return jnp.where(valid, (image_to_text + text_to_image) / 2, 0.0)
