"""The contrastive objective that pretrains the text encoder (jaxdiff.models.contrastive)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models.contrastive import ContrastiveHeads, contrastive_loss


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_loss_is_clips_symmetric_cross_entropy():
    rng = np.random.default_rng(0)
    images, texts = _unit(rng.normal(size=(5, 8))), _unit(rng.normal(size=(5, 8)))
    got = contrastive_loss(jnp.asarray(images), jnp.asarray(texts), 3.0, jnp.ones(5, bool))
    logits = 3.0 * images @ texts.T
    log_softmax = lambda z, axis: z - np.log(np.exp(z).sum(axis=axis, keepdims=True))
    want = -(np.diag(log_softmax(logits, 1)) + np.diag(log_softmax(logits, 0))) / 2
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    # matched pairs score low, shuffled ones high
    assert float(contrastive_loss(jnp.asarray(images), jnp.asarray(images), 30.0, jnp.ones(5, bool)).mean()) < 0.01


def test_padding_rows_are_nobodys_negative():
    rng = np.random.default_rng(1)
    images, texts = _unit(rng.normal(size=(6, 8))), _unit(rng.normal(size=(6, 8)))
    alone = contrastive_loss(jnp.asarray(images[:4]), jnp.asarray(texts[:4]), 5.0, jnp.ones(4, bool))
    valid = jnp.asarray([True] * 4 + [False] * 2)
    padded = contrastive_loss(jnp.asarray(images), jnp.asarray(texts), 5.0, valid)
    np.testing.assert_allclose(np.asarray(padded[:4]), np.asarray(alone), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(padded[4:]), 0.0)
    grad = jax.grad(lambda t: contrastive_loss(jnp.asarray(images), t, 5.0, valid).sum())(jnp.asarray(texts))
    assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad[4:]) == 0.0)


def test_image_tower_sees_where_things_are():
    """The tower flattens its last feature map instead of pooling it: a mirrored image embeds elsewhere."""
    heads = ContrastiveHeads.from_config({"channels": (8, 16), "norm_num_groups": 4, "projection_dim": 16})
    image = np.zeros((1, 32, 32, 3), np.float32)
    image[:, 8:16, 2:10] = 1.0  # a block on the left
    pooled = jnp.zeros((2, 12))
    params = heads.init(jax.random.key(0), jnp.asarray(image), pooled[:1])["params"]
    emb, _, _ = heads.apply({"params": params}, jnp.asarray(np.concatenate([image, image[:, :, ::-1]])), pooled)
    assert float(jnp.abs(emb[0] - emb[1]).max()) > 1e-3


def test_unknown_heads_field_is_named():
    with pytest.raises(ValueError, match="chanels"):
        ContrastiveHeads.from_config({"chanels": (8, 16)})
