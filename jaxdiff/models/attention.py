"""Attention layers of the U-Net and the VAE (diffusers.models.attention_processor / attention /
transformers.transformer_2d), and the one scaled dot-product attention every model calls, the text
encoder's included. NHWC or [B, T, C] in; softmax in float32.

`multihead_attention` picks one of three implementations, statically (at trace time, from the
shapes, the dtype and `jax.default_backend()`), all equal within float32 round-off:

- "chunked" (the CPU's): a memory-efficient attention that never holds the whole score matrix
  (`chunked_attention`): a `lax.map` over steps of a few batch * heads slices times a chunk of
  queries, each with an exact float32 softmax over all keys or, for long key sequences, a `lax.scan`
  over chunks of keys with an online softmax (running max and sum in float32, flash style). The
  backward pass recomputes each step (`jax.checkpoint`), so gradients stay memory-efficient too. A
  small problem is a single step: a plain attention in [B * H, T, D] layout.
- "xla": `jax.nn.dot_product_attention(implementation="xla")`, the whole [B, H, Tq, Tk] score
  matrix at once: on GPUs for float32, and on TPUs.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash attention, on
  a GPU for bfloat16/float16 where its constraints hold (`_cudnn_applies`; should jax still refuse
  the call at trace time, the "xla" path).

The choice ("auto", the default) is `implementation_for`'s; it and the chunked path's step sizes
(`_plan`) come from bench/attention_speed.py (the numbers are in the comment above
`implementation_for`). Override it for tests or experiments with
`set_implementation("auto" | "xla" | "chunked" | "cudnn")` (returns the previous setting) or the
environment variable `JAXDIFF_ATTENTION` with the same values; `set_implementation` wins over the
variable. "cudnn" means cuDNN wherever it applies and "xla" elsewhere (float16 on a CPU, which has
no "xla" path, stays "chunked"). The setting is read when a function is traced: a function that
was already jitted keeps the choice it was traced with until it is traced again (a new `jax.jit`,
other shapes, or `jax.clear_caches()`).
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import Dtype, conv2d, group_norm, layer_norm

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn")
ENV_VAR = "JAXDIFF_ATTENTION"

# The chunked path's steps (`_plan`), measured with bench/attention_speed.py: see the comment above
# `implementation_for`.
_ONE_STEP_MAX = 1 << 20  # batch * heads * Tq * Tk up to which the chunked path is one step
_EXACT_MAX_KEYS = 1024  # keys up to which a step takes them all (exact softmax); above, online softmax
_Q_CHUNK = 512  # queries per step with an exact softmax
_Q_CHUNK_ONLINE = 2048  # queries per step with an online softmax
_KV_CHUNK = 512  # keys per chunk of the online softmax
_TILE = 1 << 19  # scores per step (group * q_chunk * keys or kv_chunk), at most: 2 MiB of float32
_MAX_GROUP = 8  # batch * heads slices per step, at most

_override: str | None = None


def set_implementation(name: str | None) -> str | None:
    """Forces `multihead_attention`'s implementation ("auto" | "xla" | "chunked" | "cudnn"), or with
    None goes back to `JAXDIFF_ATTENTION` / "auto". Returns the previous override. Takes effect for
    functions traced afterwards."""
    global _override
    if name is not None and name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    previous, _override = _override, name
    return previous


def get_implementation() -> str:
    """The setting in force: `set_implementation`'s, else `JAXDIFF_ATTENTION`'s, else "auto"."""
    if _override is not None:
        return _override
    name = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"{ENV_VAR}={name!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    return name


def _cudnn_applies(backend: str, dtype, head_dim: int) -> bool:
    """cuDNN flash attention's documented constraints (jax.nn.dot_product_attention with cuDNN 9):
    a GPU, float16 or bfloat16, head_dim a multiple of 8 and at most 128. (Hopper takes up to 256:
    SD1.5's head of 160 ran there, on an H200, but was not timed, so it stays on XLA, like the
    VAE's single head of 512.) A causal mask is supported."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return backend in ("gpu", "cuda") and half and head_dim % 8 == 0 and head_dim <= 128


# Measured with bench/attention_speed.py on 2026-12-04, on the project's 2-core CPU machine (`lscpu`:
# AMD EPYC, 2 CPUs, family 26, AVX-512; L2 2 x 2 MiB, L3 32 MiB; KVM), jax 0.10.2, torch 2.13 with 2
# threads, float32, one process, calls interleaved, medians of 5 (seconds; other work on the machine
# moved single figures by up to ~2x, ratios less):
#
#   B, Tq, Tk, heads x head_dim        torch SDPA   xla     xla, [B,H,T,D]   chunked   torch/chunked
#   2, 4096, 4096, 8 x 40 (64x64 lvl 0)   0.293      1.353   1.164            0.245     1.20
#   2, 1024, 1024, 8 x 80 (64x64 lvl 1)   0.0341     0.111   0.087            0.0288    1.18
#   2,  256,  256, 8 x 160 (lvl 2)        0.0071     0.0101  0.0057           0.0075    0.94 (*)
#   2, 1024, 1024, 8 x 40 (32x32 lvl 0)   0.0197     0.101   0.078            0.0248    0.79
#   2, 4096, 4096, 8 x 80                 0.517      1.722   1.473            0.381     1.36
#   2, 4096, 4096, 8 x 160                0.943      1.970   1.813            0.628     1.50
#   2, 4096,   77, 8 x 40 (cross-attn)    0.0096     0.0275  0.0116           0.0103    0.94
#   1, 4096, 4096, 1 x 512 (VAE mid)      0.183      0.156   0.143            0.104     1.77
#   2,   77,   77, 12 x 64 causal (text)  0.0004     0.0008  0.0006           0.0006    0.75 (**)
#
# "xla" never won, down to the text encoder's 77 tokens, so a CPU always takes the chunked path.
# Its steps: for Tk > 1024 an online softmax over 512-key chunks with 1024 (above) or 2048 queries
# per step (second run, 4096 tokens, head_dim 40/80/160 and the VAE: 0.217/0.346/0.579/0.095 s with
# 1024, 0.192/0.329/0.556/0.107 with 2048; an exact softmax over all 4096 keys, 512 queries a step:
# 0.193/0.425/0.631/0.096); up to 1024 keys one exact softmax, 512 queries a step, as many batch *
# heads slices as keep a step within _TILE scores (8 slices a step: as fast at 1024 x 40, 1.8x slower
# at 1024 x 80). (*) one step, now up to 2^20 scores, takes 0.0057 s. (**) sub-millisecond, all within
# noise. Layouts: einsum on [B, T, H, D] views ("bqhd,bkhd->bhqk") was no faster than transposing
# to [B, H, T, D] first. XLA flags tried (--xla_cpu_use_thunk_runtime=false,
# --xla_cpu_prefer_vector_width=512, --xla_cpu_use_xnnpack, --xla_cpu_use_onednn,
# --xla_cpu_enable_fast_math): none paid beyond the noise; none is set.
#
# On a GPU (an H200, jax 0.11.2, 2026-12-04; milliseconds, batch 2, 8 heads): bfloat16 at 4096 tokens
# x 40, xla 1.23, cudnn 0.31; at 1024 x 80, 0.18 against 0.13; cross-attention 4096 x 77, 0.14
# against 0.12; the text encoder's causal 77 tokens, 0.11 against 0.12-0.14 (launch-bound); a whole SD1.5
# U-Net at 64x64 latents, batch 2, bfloat16: 15.2 with xla, 11.1 with cudnn. In float32 the chunked
# path is slower than xla there (2.17 against 1.46 at 4096 x 40), so a GPU takes xla for float32.


def implementation_for(q_len: int, kv_len: int, head_dim: int, dtype, *, backend: str | None = None,
                       setting: str | None = None) -> str:
    """The implementation `multihead_attention` uses for these shapes: "xla", "chunked" or "cudnn".

    `setting` defaults to `get_implementation()`, `backend` to `jax.default_backend()`.
    """
    setting = get_implementation() if setting is None else setting
    backend = jax.default_backend() if backend is None else backend
    if setting in ("xla", "chunked"):
        return setting
    if _cudnn_applies(backend, dtype, head_dim):
        return "cudnn"
    if backend == "cpu" and (setting == "auto" or jnp.dtype(dtype) == jnp.float16):
        # Faster than the xla path at every size measured (see above _ONE_STEP_MAX); and for float16
        # the only one: the xla path asks for an F16_F16_F32 dot, which XLA's CPU backend lacks.
        return "chunked"
    return "xla"


def multihead_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, *,
                        is_causal: bool = False) -> jax.Array:
    """Scaled dot-product attention over [B, T, num_heads * head_dim] projections (queries [B, Tq, .],
    keys and values [B, Tk, .]); the implementation is `implementation_for`'s (module docstring).
    `is_causal`: query i sees keys 0..i."""
    b, tq, inner = q.shape
    head_dim = inner // num_heads
    split = lambda x: x.reshape(x.shape[0], x.shape[1], num_heads, head_dim)
    q4, k4, v4 = split(q), split(k), split(v)
    impl = implementation_for(tq, k.shape[1], head_dim, q.dtype)
    if impl == "cudnn":
        try:
            out = jax.nn.dot_product_attention(q4, k4, v4, is_causal=is_causal, implementation="cudnn")
        except (NotImplementedError, RuntimeError, ValueError):  # refused at trace time (GPU, cuDNN, shapes)
            impl = "xla"
    if impl == "chunked":
        out = chunked_attention(q4, k4, v4, is_causal=is_causal)
    elif impl == "xla":
        out = jax.nn.dot_product_attention(q4, k4, v4, is_causal=is_causal, implementation="xla")
    return out.reshape(b, tq, inner)


# ----------------------------------------------------------------------------------------------
# The memory-efficient path

_MASKED = -0.7 * float(np.finfo(np.float32).max)  # as jax.nn.dot_product_attention masks


def _plan(bh: int, q_len: int, kv_len: int) -> tuple[int, int, int | None]:
    """(group, q_chunk, kv_chunk) for `chunked_attention` on bh = batch * heads slices: each step
    takes `group` slices times `q_chunk` queries against all keys (kv_chunk None) or, in an online
    softmax, against `kv_chunk` keys at a time; as many slices as fit in `_TILE` scores."""
    if bh * q_len * kv_len <= _ONE_STEP_MAX:
        return bh, q_len, None
    kv_chunk = None if kv_len <= _EXACT_MAX_KEYS else _KV_CHUNK
    q_chunk = min(q_len, _Q_CHUNK if kv_chunk is None else _Q_CHUNK_ONLINE)
    per_slice = q_chunk * (kv_len if kv_chunk is None else kv_chunk)
    group = max(d for d in range(1, min(bh, _MAX_GROUP) + 1) if bh % d == 0 and (d == 1 or d * per_slice <= _TILE))
    return group, q_chunk, kv_chunk


def _scores(q: jax.Array, k: jax.Array, q_start, k_start, is_causal: bool) -> jax.Array:
    """float32 [g, cq, ck] dot products (unscaled) of [g, cq, D] queries with [g, ck, D] keys."""
    s = jnp.einsum("gqd,gkd->gqk", q, k, preferred_element_type=jnp.float32)
    if is_causal:
        qi = q_start + jnp.arange(q.shape[1])[:, None]
        ki = k_start + jnp.arange(k.shape[1])[None, :]
        s = jnp.where(ki <= qi, s, _MASKED)
    return s


def _weighted(p: jax.Array, v: jax.Array) -> jax.Array:
    """float32 sum of [g, ck, D] values weighted by float32 [g, cq, ck] p (taken in v's dtype)."""
    return jnp.einsum("gqk,gkd->gqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def _attend_exact(q: jax.Array, k: jax.Array, v: jax.Array, q_start, is_causal: bool, scale: float) -> jax.Array:
    """[g, cq, D] queries against all [g, S, D] keys; the softmax normalised after the weighted sum.
    (The scale > 0 is applied after the max, in float32: max(scale * s) = scale * max(s).)"""
    s = _scores(q, k, q_start, 0, is_causal)
    p = jnp.exp((s - jnp.max(s, axis=-1, keepdims=True)) * scale)
    return _weighted(p, v) / jnp.sum(p, axis=-1, keepdims=True)


def _attend_online(q: jax.Array, k_full, v_full, k_rest, v_rest, q_start, is_causal: bool, scale: float,
                   kv_chunk: int) -> jax.Array:
    """[g, cq, D] queries against keys in chunks ([m, g, kv_chunk, D] full ones, then the [g, r, D]
    rest or None), online softmax: running max and sum in float32."""

    def update(carry, kv):
        m, l, o = carry
        kc, vc, k_start = kv
        s = _scores(q, kc, q_start, k_start, is_causal)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp((s - m_new[..., None]) * scale)
        a = jnp.exp((m - m_new) * scale)
        return (m_new, l * a + jnp.sum(p, axis=-1), o * a[..., None] + _weighted(p, vc)), None

    g, cq, _ = q.shape
    carry = (jnp.full((g, cq), _MASKED, jnp.float32), jnp.zeros((g, cq), jnp.float32),
             jnp.zeros((g, cq, v_full.shape[-1]), jnp.float32))
    # Key chunk 0 first: under a causal mask every query sees a key in it, so m is a real score after it.
    starts = jnp.arange(k_full.shape[0]) * kv_chunk
    carry, _ = jax.lax.scan(update, carry, (k_full, v_full, starts))
    if k_rest is not None:
        carry, _ = update(carry, (k_rest, v_rest, k_full.shape[0] * kv_chunk))
    _, l, o = carry
    return o / l[..., None]


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False,
                      q_chunk: int | None = None, kv_chunk: int | None = None,
                      group: int | None = None) -> jax.Array:
    """Memory-efficient scaled dot-product attention of [B, Tq, H, D] queries and [B, Tk, H, D] keys
    and values (jax.nn.dot_product_attention's layout); equal to it within float32 round-off.

    The B * H slices are taken `group` at a time, the queries `q_chunk` at a time (the last chunk
    shorter when it does not divide Tq), in one `lax.map` over (group, chunk) pairs; each step
    attends to all keys with one exact softmax or, with `kv_chunk`, to chunks of that many keys
    with an online softmax (`lax.scan`; kv_chunk=0: all keys at once). Arguments left None come from
    `_plan`; a problem small enough is one step, a plain attention in [B * H, T, D] layout. Scores
    and softmax statistics are float32 whatever the input dtype, and the scale is applied to them
    in float32; the weighted sum takes the probabilities in the values' dtype, as the XLA path
    does. The backward pass recomputes each step (`jax.checkpoint`) rather than storing its
    probabilities, so gradients are memory-efficient too.
    """
    b, tq, h, d = q.shape
    tk, bh, dtype = k.shape[1], b * h, q.dtype
    plan = _plan(bh, tq, tk)
    group = plan[0] if group is None else group
    q_chunk = min(plan[1] if q_chunk is None else q_chunk, tq)
    kv_chunk = plan[2] if kv_chunk is None else kv_chunk
    if not kv_chunk or kv_chunk >= tk:
        kv_chunk = None
    if bh % group:
        raise ValueError(f"group={group} must divide batch * heads = {bh}")
    # [B, T, H, D] -> [G, group, T, D], G = B * H / group: one transpose up front, and each step's
    # matmuls are plain batched matmuls over the group.
    n_groups = bh // group
    to_groups = lambda x: x.transpose(0, 2, 1, 3).reshape(n_groups, group, x.shape[1], d)
    q, k, v, scale = to_groups(q), to_groups(k), to_groups(v), d ** -0.5

    if kv_chunk is None:
        keys = (k, v)
        attend = lambda qc, keys, start: _attend_exact(qc, *keys, start, is_causal, scale)
    else:
        m = tk // kv_chunk
        split = lambda x: x[:, :, :m * kv_chunk].reshape(n_groups, group, m, kv_chunk, d).transpose(0, 2, 1, 3, 4)
        rest = (lambda x: x[:, :, m * kv_chunk:]) if tk % kv_chunk else (lambda x: None)
        keys = (split(k), split(v), rest(k), rest(v))  # [G, m, group, kv_chunk, D], [G, group, r, D]
        attend = lambda qc, keys, start: _attend_online(qc, *keys, start, is_causal, scale, kv_chunk)

    n, r = tq // q_chunk, tq % q_chunk
    if n_groups * (n + (r > 0)) == 1:  # one step: nothing to map, nothing to save by recomputing
        out = attend(q[0], jax.tree.map(lambda x: x[0], keys), 0)[None]
    else:
        attend = jax.checkpoint(attend)  # the backward recomputes a step instead of storing its scores
        group_keys = lambda i: jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), keys)
        outs = []
        if n:
            qs = q[:, :, :n * q_chunk].reshape(n_groups, group, n, q_chunk, d).transpose(0, 2, 1, 3, 4)
            step = lambda a: attend(a[0], group_keys(a[1] // n), (a[1] % n) * q_chunk)
            o = jax.lax.map(step, (qs.reshape(n_groups * n, group, q_chunk, d), jnp.arange(n_groups * n)))
            outs.append(o.reshape(n_groups, n, group, q_chunk, d).transpose(0, 2, 1, 3, 4)
                        .reshape(n_groups, group, n * q_chunk, d))
        if r:
            step = lambda a: attend(a[0], group_keys(a[1]), n * q_chunk)
            outs.append(jax.lax.map(step, (q[:, :, n * q_chunk:], jnp.arange(n_groups))))
        out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return out.reshape(b, h, tq, d).transpose(0, 2, 1, 3).astype(dtype)


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
