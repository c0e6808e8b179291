"""Parameter pytrees without running a model: their shapes, and PyTorch-style random values.

Both the loader (which needs the shapes a checkpoint must fill) and training (which starts from
random values) reach this module; it imports nothing of jaxdiff's.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np


def param_shapes(module):
    """The params pytree of a linen module as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    return jax.eval_shape(module.init, jax.random.key(0), *module.dummy_inputs())["params"]


def random_params(shapes, seed: int):
    """Random params of the shapes (a pytree of `jax.ShapeDtypeStruct`s), as a PyTorch model of
    them would start.

    PyTorch's default initialisation, which diffusers models are trained from: kernels
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases 0, norm scales 1, embeddings N(0, 0.02) (as CLIP),
    attention pooling's query offset N(0, 1/dim) (as diffusers).
    Drawn with NumPy from the shapes alone, each leaf from a generator seeded by its path, because
    `module.init` would execute (and compile) every op of the forward pass just to create weights.
    """
    def draw(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        shape, kind = leaf.shape, name.rsplit("/", 1)[-1]
        if kind == "kernel":
            bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
            value = rng.uniform(-bound, bound, shape)
        elif kind == "embedding":
            value = rng.normal(0.0, 0.02, shape)
        elif kind == "positional_embedding":  # AttentionPooling's query offset, randn / sqrt(dim)
            value = rng.normal(0.0, shape[-1] ** -0.5, shape)
        elif kind == "scale":
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)
