"""jaxdiff.models.attention: the chunked (memory-efficient) path against the plain XLA path, values
and gradients; the automatic choice and its overrides; a U-Net forward on the chunked path against
diffusers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import attention
from jaxdiff.models.attention import implementation_for, multihead_attention

# Jitted whole: one compile per case instead of one per op.
chunked_attention = jax.jit(attention.chunked_attention,
                            static_argnames=("is_causal", "q_chunk", "kv_chunk", "group"))


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """Float32 dots in float32 on every backend (a GPU's default is TF32, 1e-3 apart)."""
    with jax.default_matmul_precision("float32"):
        yield


@pytest.fixture
def restore_setting():
    previous = attention.set_implementation(None)
    yield
    attention.set_implementation(previous)


def _qkv(b, tq, tk, h, d, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((b, t, h, d)), dtype) for t in (tq, tk, tk))


@functools.partial(jax.jit, static_argnames="is_causal")
def _plain(q, k, v, is_causal=False):
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")


def _rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape and np.isfinite(actual).all()
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


# (batch, query tokens, key tokens, heads, head_dim, causal, q_chunk, kv_chunk, group): chunk sizes
# that divide and that do not, more chunks than tokens, one token, groups of batch * heads slices,
# cross-attention, the text encoder's causal mask; None: the plan's (_plan), kv_chunk 0: all keys.
CASES = [
    (2, 64, 64, 2, 8, False, 16, 0, 1),
    (1, 100, 100, 3, 40, False, 32, 0, 3),  # 3 full query chunks + 4 left over
    (2, 100, 100, 2, 16, False, 32, 24, 2),  # online softmax: 4 key chunks + 4 left over
    (1, 1, 1, 2, 8, False, 16, 16, 1),  # T = 1
    (3, 5, 5, 1, 8, False, 2, 2, 3),
    (2, 130, 77, 2, 24, False, 64, 32, 2),  # cross-attention over 77 tokens
    (2, 77, 77, 4, 16, True, 16, 0, 4),  # the text encoder's causal mask
    (1, 77, 77, 2, 64, True, 32, 10, 1),
    (2, 77, 77, 3, 16, True, None, None, None),  # one step
    (1, 300, 300, 1, 160, False, 128, 128, None),
    (1, 1100, 1100, 1, 8, True, None, None, None),  # the plan: online softmax over 512-key chunks
]


@pytest.mark.parametrize("b,tq,tk,h,d,causal,q_chunk,kv_chunk,group", CASES)
def test_chunked_equals_plain(b, tq, tk, h, d, causal, q_chunk, kv_chunk, group):
    q, k, v = _qkv(b, tq, tk, h, d, seed=tq + d)
    out = chunked_attention(q, k, v, is_causal=causal, q_chunk=q_chunk, kv_chunk=kv_chunk, group=group)
    assert out.shape == q.shape[:3] + (d,) and out.dtype == jnp.float32
    assert _rel_err(out, _plain(q, k, v, causal)) <= 1e-5


def test_plan():
    """SD1.5's attention calls on a CPU (batch 2, 8 heads): 64x64 latents' 4096 tokens in steps of
    an online softmax, 32x32's 1024 in steps of an exact one, 16x16's 256 and the text encoder's 77
    in one step."""
    plan = attention._plan
    assert plan(16, 4096, 4096) == (1, attention._Q_CHUNK_ONLINE, attention._KV_CHUNK)
    assert plan(16, 1024, 1024) == (1, attention._Q_CHUNK, None)
    assert plan(16, 256, 256) == (16, 256, None)
    assert plan(24, 77, 77) == (24, 77, None)
    for bh, tq, tk in [(16, 4096, 4096), (16, 1024, 1024), (16, 4096, 77), (1, 4096, 4096), (5, 333, 4000),
                       (16, 256, 256), (7, 1, 5000)]:
        group, q_chunk, kv_chunk = plan(bh, tq, tk)
        assert bh % group == 0 and q_chunk <= tq and (kv_chunk is None or kv_chunk < tk)
        if bh * tq * tk <= attention._ONE_STEP_MAX:
            assert (group, q_chunk, kv_chunk) == (bh, tq, None)
        else:
            assert group == 1 or group * q_chunk * (kv_chunk or tk) <= attention._TILE


@pytest.mark.parametrize("kv_chunk", [0, 16])
def test_chunked_bf16_stays_close(kv_chunk):
    q, k, v = _qkv(2, 70, 70, 2, 40, jnp.bfloat16, seed=1)
    out = chunked_attention(q, k, v, q_chunk=32, kv_chunk=kv_chunk, group=2)
    assert out.dtype == jnp.bfloat16
    plain = _plain(q, k, v)
    exact = _plain(*(x.astype(jnp.float32) for x in (q, k, v)))
    assert _rel_err(out, plain) <= 2e-2
    assert _rel_err(out, exact) <= 2e-2


@pytest.mark.parametrize("causal,kv_chunk", [(False, 0), (True, 8)])
def test_chunked_gradient_equals_plain(causal, kv_chunk):
    q, k, v = _qkv(2, 37, 37, 2, 8, seed=3)
    w = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)
    loss = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v) * w))
    chunked = lambda q, k, v: chunked_attention(q, k, v, is_causal=causal, q_chunk=16, kv_chunk=kv_chunk, group=2)
    grads = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.jit(jax.grad(loss(lambda q, k, v: _plain(q, k, v, causal)), argnums=(0, 1, 2)))(q, k, v)
    for name, g, e in zip("qkv", grads, expected):
        assert _rel_err(g, e) <= 1e-5, name


def test_multihead_attention_follows_the_setting(restore_setting, monkeypatch):
    monkeypatch.setattr(attention, "_ONE_STEP_MAX", 0)  # several steps: a scan
    monkeypatch.setattr(attention, "_Q_CHUNK", 16)
    b, t, h, d = 2, 40, 4, 8
    q, k, v = (x.reshape(b, t, h * d) for x in _qkv(b, t, t, h, d, seed=5))
    outs, jaxprs = {}, {}
    for name in ("xla", "chunked", "auto", "cudnn"):
        attention.set_implementation(name)
        fn = lambda q, k, v: multihead_attention(q, k, v, h, is_causal=True)
        jaxprs[name] = str(jax.make_jaxpr(fn)(q, k, v))
        outs[name] = jax.jit(fn)(q, k, v)
    assert "scan" in jaxprs["chunked"] and "scan" not in jaxprs["xla"]
    for name in ("chunked", "auto", "cudnn"):
        assert _rel_err(outs[name], outs["xla"]) <= 1e-5, name


def test_auto_choice(restore_setting, monkeypatch):
    f32, bf16 = jnp.float32, jnp.bfloat16
    pick = lambda tq, tk, d, dtype, backend, setting="auto": implementation_for(tq, tk, d, dtype, backend=backend,
                                                                                 setting=setting)
    # CPU: the chunked path at every size (it is one step for small ones): SD1.5 at 64x64 and 32x32
    # latents, the VAE's 4096 tokens, cross-attention, the text encoder.
    for tq, tk, d in [(4096, 4096, 40), (4096, 4096, 512), (1024, 1024, 80), (4096, 77, 40), (77, 77, 64)]:
        assert pick(tq, tk, d, f32, "cpu") == "chunked"
        assert pick(tq, tk, d, bf16, "cpu") == "chunked"
    # GPU: cuDNN for half precision where its constraints hold, XLA otherwise.
    assert pick(4096, 4096, 40, bf16, "gpu") == "cudnn"
    assert pick(77, 77, 64, jnp.float16, "gpu") == "cudnn"
    assert pick(4096, 4096, 40, f32, "gpu") == "xla"
    assert pick(1024, 1024, 128, bf16, "gpu") == "cudnn"
    assert pick(256, 256, 160, bf16, "gpu") == "xla"
    assert pick(4096, 4096, 512, bf16, "gpu") == "xla"  # the VAE's head is too long for cuDNN
    assert pick(4096, 4096, 36, bf16, "gpu") == "xla"  # not a multiple of 8
    assert pick(4096, 4096, 40, bf16, "tpu") == "xla"
    # Overrides.
    assert pick(77, 77, 64, f32, "cpu", "chunked") == "chunked"
    assert pick(4096, 4096, 40, f32, "cpu", "xla") == "xla"
    assert pick(4096, 4096, 40, f32, "cpu", "cudnn") == "xla"
    assert pick(77, 77, 64, jnp.float16, "cpu", "cudnn") == "chunked"  # no float16 xla path on a CPU
    assert pick(4096, 4096, 40, bf16, "gpu", "cudnn") == "cudnn"
    # The process-wide setting: set_implementation over JAXDIFF_ATTENTION over "auto".
    monkeypatch.setenv(attention.ENV_VAR, "xla")
    assert attention.get_implementation() == "xla"
    assert implementation_for(4096, 4096, 40, f32, backend="cpu") == "xla"
    assert attention.set_implementation("chunked") is None
    assert implementation_for(4096, 4096, 40, bf16, backend="gpu") == "chunked"
    assert attention.set_implementation(None) == "chunked"
    monkeypatch.delenv(attention.ENV_VAR)
    assert attention.get_implementation() == "auto"
    with pytest.raises(ValueError, match="flash"):
        attention.set_implementation("flash")
    monkeypatch.setenv(attention.ENV_VAR, "flash")
    with pytest.raises(ValueError, match=attention.ENV_VAR):
        attention.get_implementation()


def test_unet_on_the_chunked_path_matches_diffusers(restore_setting, monkeypatch):
    """The sd1 parity case of test_unet.py with every attention on the chunked path, in steps small
    enough that the 16x16 level (256 tokens) takes several query chunks (and a rest) with an online
    softmax over key chunks (and a rest), the 8x8 one (64) two query chunks against all keys, and
    cross-attention an exact softmax over its 7 tokens; 2 of the 2 x 4 batch * heads slices a step."""
    from tests.test_unet import _build, _inputs, _torch_forward
    from tests.torch_utils import assert_close_rel

    from jaxdiff.models.unet import UNet2DConditionModel

    torch_model, config, _, params = _build("sd1")
    sample, timesteps, context, added = _inputs(config, 2, 16, 16, seed=1)
    expected = _torch_forward(torch_model, sample, timesteps, context, added)
    for name, value in [("_ONE_STEP_MAX", 0), ("_Q_CHUNK", 48), ("_Q_CHUNK_ONLINE", 48), ("_KV_CHUNK", 40),
                        ("_EXACT_MAX_KEYS", 64), ("_MAX_GROUP", 2)]:
        monkeypatch.setattr(attention, name, value)
    attention.set_implementation("chunked")
    model = UNet2DConditionModel.from_config(config)
    apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    assert "scan" in str(jax.make_jaxpr(apply)(params, sample, timesteps, context, added))
    actual = apply(params, sample, timesteps, context, added)
    assert_close_rel(actual, expected, 1e-4, "sd1 16x16, chunked attention")
