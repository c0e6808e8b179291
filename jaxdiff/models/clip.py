"""CLIP text encoder, mirroring transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`.

Submodules carry the torch module names (`text_model/encoder/layers_3/self_attn/q_proj`, ...) so
that `jaxdiff.weights.convert.load_state_dict` maps a hub checkpoint onto the params by its generic
rule. Stable Diffusion pipelines pass no attention mask, so there is none here: every layer sees
the whole (causally masked) sequence, padding included, exactly as in the pipelines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxdiff.models.attention import multihead_attention
from jaxdiff.models.config import check_fields

# transformers' `ACT2FN` entries that CLIP text configs use.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' `CLIPTextConfig` that the forward pass reads (same defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    @classmethod
    def from_dict(cls, config: Mapping) -> CLIPTextConfig:
        """Reads a `text_encoder/config.json` dict; keys this model does not use are ignored."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        cfg = cls(**check_fields(config, defaults, "CLIPTextModel config", cls="CLIPTextModel"))
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by "
                             f"num_attention_heads {cfg.num_attention_heads}")
        return cfg


@struct.dataclass
class CLIPTextOutput:
    """transformers' `BaseModelOutputWithPooling` (+ `text_embeds`), as a pytree."""

    last_hidden_state: jax.Array            # [B, T, D], after final_layer_norm
    pooler_output: jax.Array                # [B, D], last_hidden_state at the EOS token
    hidden_states: tuple[jax.Array, ...]    # embeddings output, then each layer's output
    text_embeds: jax.Array | None = None    # [B, projection_dim] when with_projection


def _layer_norm(cfg: CLIPTextConfig, dtype, name: str):
    """torch `nn.LayerNorm`, computed in float32 and returned in the compute dtype."""
    # Two-pass variance like torch; the one-pass E[x^2]-E[x]^2 loses digits on the residual stream.
    norm = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=jnp.float32,
                        use_fast_variance=False, name=name)
    return lambda x: norm(x.astype(jnp.float32)).astype(dtype)


class CLIPTextEmbeddings(nn.Module):
    """Mirrors `CLIPTextEmbeddings`: token embedding + learned positions 0..T-1."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        seq_len = input_ids.shape[-1]
        if seq_len > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=self.dtype,
                                         param_dtype=jnp.float32, name=name)
        tokens = embed(cfg.vocab_size, "token_embedding")(input_ids)
        positions = embed(cfg.max_position_embeddings, "position_embedding")(jnp.arange(seq_len))
        return tokens + positions[None]


class CLIPAttention(nn.Module):
    """Mirrors `CLIPAttention` with the text model's causal mask (scale head_dim**-0.5)."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda name: nn.Dense(self.config.hidden_size, dtype=self.dtype,
                                      param_dtype=jnp.float32, name=name)
        q, k, v = dense("q_proj")(x), dense("k_proj")(x), dense("v_proj")(x)
        out = multihead_attention(q, k, v, self.config.num_attention_heads, is_causal=True)
        return dense("out_proj")(out)


class CLIPMLP(nn.Module):
    """Mirrors `CLIPMLP`: fc1 -> hidden_act -> fc2."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = nn.Dense(cfg.intermediate_size, dtype=self.dtype, param_dtype=jnp.float32, name="fc1")(x)
        x = ACTIVATIONS[cfg.hidden_act](x)
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Mirrors `CLIPEncoderLayer`: pre-LN self-attention and MLP, each with a residual."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt = self.config, self.dtype
        x = x + CLIPAttention(cfg, dt, name="self_attn")(_layer_norm(cfg, dt, "layer_norm1")(x))
        return x + CLIPMLP(cfg, dt, name="mlp")(_layer_norm(cfg, dt, "layer_norm2")(x))


class CLIPEncoder(nn.Module):
    """Mirrors `CLIPEncoder`; returns every layer's output (the `hidden_states[1:]` of transformers)."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        outputs = []
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x)
            outputs.append(x)
        return tuple(outputs)


def pool_eos(last_hidden_state: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """The hidden state at each sequence's EOS token, chosen as transformers' `CLIPTextModel` does."""
    if eos_token_id == 2:
        # Configs from before transformers PR #24773 carry eos_token_id=2; the EOS is then found as
        # the largest id in the sequence (CLIP's EOS, 49407, is the last id of its vocabulary).
        index = jnp.argmax(input_ids, axis=-1)
    else:
        # The first EOS: padding may reuse the EOS id, and argmax picks the first maximum.
        index = jnp.argmax(input_ids == eos_token_id, axis=-1)
    return jnp.take_along_axis(last_hidden_state, index[:, None, None], axis=1)[:, 0]


class CLIPTextTransformer(nn.Module):
    """The `text_model` submodule of transformers' CLIP text models (named `CLIPTextModel` there)."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array):
        cfg = self.config
        x = CLIPTextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
        layer_outputs = CLIPEncoder(cfg, self.dtype, name="encoder")(x)
        last = _layer_norm(cfg, self.dtype, "final_layer_norm")(layer_outputs[-1] if layer_outputs else x)
        return last, pool_eos(last, input_ids, cfg.eos_token_id), (x, *layer_outputs)


class CLIPTextModel(nn.Module):
    """transformers' `CLIPTextModel`, or `CLIPTextModelWithProjection` when `with_projection`.

    `dtype` is the compute dtype; params are float32, layer norms and softmax run in float32.
    """

    config: CLIPTextConfig
    with_projection: bool = False
    dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_config(cls, config: Mapping, dtype=jnp.float32, *,
                    with_projection: bool | None = None) -> CLIPTextModel:
        """Builds from a `text_encoder/config.json` dict. `with_projection` defaults to whether
        `architectures` names `CLIPTextModelWithProjection` (SDXL's second text encoder)."""
        if with_projection is None:
            with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or ())
        return cls(CLIPTextConfig.from_dict(config), with_projection=with_projection, dtype=dtype)

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        """Positional args for `init` / `jax.eval_shape(self.init, key, *dummy_inputs())`."""
        return (jnp.zeros((batch, self.config.max_position_embeddings), jnp.int32),)

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        last, pooled, hidden_states = CLIPTextTransformer(self.config, self.dtype, name="text_model")(input_ids)
        text_embeds = None
        if self.with_projection:
            text_embeds = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                                   param_dtype=jnp.float32, name="text_projection")(pooled)
        return CLIPTextOutput(last, pooled, hidden_states, text_embeds)


_TEXT_MODEL_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm.")


def canonical_state_dict(tensors: Mapping) -> dict:
    """Puts a CLIP text state dict under the hub checkpoints' `text_model.` prefix.

    Hub checkpoints (and `CLIPTextModelWithProjection` in any transformers version) name tensors
    `text_model.encoder...`, but transformers >= 5 saves a plain `CLIPTextModel` without that
    prefix (`encoder...`). The params here follow the hub names, so this accepts both.
    """
    return {("text_model." + k if k.startswith(_TEXT_MODEL_CHILDREN) else k): v
            for k, v in tensors.items()}
