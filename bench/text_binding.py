"""Does a text encoder say which named object goes where? A linear probe of its token states.

    python bench/text_binding.py [MODEL ...]     # diffusers folders or run dirs; "random": a fresh one

For every two-object caption of the shapes grammar (1080) the target is the layout with each colour
bound to its side: (u(colour 1) - u(colour 2)) times +1 / -1 / 0 for the relation's direction along x,
and the same along y (8 numbers; u a fixed random 4-vector per colour, as in bench/layout_probe.py).
A ridge regression from the states of one token position (or all of them) is fitted on 800 captions
and scored on the other 280: the fraction of the target's variance it leaves unexplained (1: the
position carries nothing of it). A U-Net can only draw a layout its cross-attention can read, and a
single attention read is close to a linear readout of one position.
"""

import itertools
import os
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # for configs/
from configs import shapes_unet  # noqa: E402
from jaxdiff import components, sample  # noqa: E402
from jaxdiff import text  # noqa: E402
from jaxdiff.data import shapes  # noqa: E402
from jaxdiff.train import loop  # noqa: E402
from layout_probe import relation_axis  # noqa: E402  (bench/ is this script's directory)

RIDGE = 1e-2  # per training example, on standardised features
N_TRAIN = 800


def captions_and_targets(seed: int = 1):
    colours = list(shapes.COLOURS)
    codes = np.random.default_rng(seed).normal(size=(len(colours), 4))
    captions, targets = [], []
    for c1, s1, relation, c2, s2 in itertools.product(colours, shapes.SHAPES, shapes.RELATIONS,
                                                       colours, shapes.SHAPES):
        if c1 == c2:
            continue
        captions.append(shapes.format_caption([(c1, s1), (c2, s2)], relation))
        axis, sign = relation_axis(relation)  # axis 1: along x, 0: along y
        target = np.zeros((2, codes.shape[1]))
        target[1 - axis] = sign * (codes[colours.index(c1)] - codes[colours.index(c2)])
        targets.append(target.ravel())  # the x part, then the y part
    return captions, np.asarray(targets)


def unexplained(features: np.ndarray, targets: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    x = (features - features[train].mean(0)) / (features[train].std(0) + 1e-6)
    a = x[train]
    w = np.linalg.solve(a.T @ a + RIDGE * len(train) * np.eye(a.shape[1]), a.T @ targets[train])
    return float(((targets[test] - x[test] @ w) ** 2).mean() / (targets[test] ** 2).mean())


def load(name: str | None):
    """(models, params, tokenizers): the bundled model for None, a fresh `configs/shapes_unet.py`
    pipeline for "random", else a diffusers folder or a run directory."""
    import jaxdiff

    if name == "random":
        config = shapes_unet.get_config()
        config.init.path = ""
        configs, params, tokenizers = loop.build_pipeline(config)
        return components.build_models(configs), params, tokenizers
    pipe = jaxdiff.load() if name is None else loop.load_pipeline(name)
    return pipe.models, pipe.params, pipe.tokenizers


def main():
    captions, targets = captions_and_targets()
    order = np.random.default_rng(0).permutation(len(captions))
    train, test = order[:N_TRAIN], order[N_TRAIN:]
    for name in sys.argv[1:] or [None]:
        models, params, tokenizers = load(name)
        ids = tuple(jnp.asarray(text.tokenize(t, captions)) for t in tokenizers)
        context = np.asarray(sample.encode_prompt(models, params["text_encoders"], ids).context)
        per_position = [unexplained(context[:, k], targets, train, test) for k in range(context.shape[1])]
        everything = unexplained(context.reshape(len(captions), -1), targets, train, test)
        print(f"{name or 'bundled model'}: unexplained {everything:.3f} from all {context.shape[1]} positions, "
              f"{min(per_position):.3f} from the best single one")
        print("  per position: " + " ".join(f"{v:.2f}" for v in per_position))


if __name__ == "__main__":
    main()
