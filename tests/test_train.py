"""Training: a tiny config learns, resuming is bit-identical, bad config keys are named."""

import os

import jax
import numpy as np
import pytest

import main
from configs import shapes_unet, shapes_vae
from jaxdiff.train import loop


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """The `tiny` TFDS shapes config, built once into a temporary data dir."""
    from jaxdiff.train import data

    path = str(tmp_path_factory.mktemp("tfds"))
    data.tfds_source("shapes", "train", data_dir=path, config="tiny")
    return path


def _config(module, tfds_dir, **overrides):
    config = module.get_config("tiny")
    config.data.data_dir = tfds_dir
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _losses(workdir):
    rows = np.genfromtxt(os.path.join(workdir, "metrics.csv"), delimiter=",", names=True)
    return rows["loss"]


@pytest.mark.parametrize("module, lr", [(shapes_vae, 3e-3), (shapes_unet, 3e-3)])
def test_tiny_config_loss_falls(module, lr, tfds_dir, tmp_path):
    config = _config(module, tfds_dir, **{"train.steps": 30, "train.learning_rate": lr,
                                          "train.lr_schedule": "constant", "checkpoint.every": 30})
    loop.train(config, str(tmp_path))
    losses = _losses(str(tmp_path))
    assert len(losses) == 30 and np.all(np.isfinite(losses))
    assert losses[-5:].mean() < 0.8 * losses[:5].mean(), losses


def test_resume_is_bit_identical(tfds_dir, tmp_path):
    config = _config(shapes_unet, tfds_dir, **{"train.steps": 6, "checkpoint.every": 2})
    straight = loop.train(config, str(tmp_path / "straight"))
    loop.train(config, str(tmp_path / "resumed"), until_step=3)  # "killed" after step 3
    assert loop.Checkpointer(str(tmp_path / "resumed" / "checkpoints"), 1, 1).latest_step() == 3
    resumed = loop.train(config, str(tmp_path / "resumed"))
    assert int(resumed.step) == int(straight.step) == 6
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unknown_config_key_is_named(tmp_path, capsys):
    rc = main.main(["train", "--config", "configs/shapes_vae.py:tiny", "--workdir", str(tmp_path),
                    "--config.train.stepz=3"])
    assert rc == 2
    assert "stepz" in capsys.readouterr().err


def test_unknown_mode_is_named(tfds_dir, tmp_path):
    config = _config(shapes_vae, tfds_dir, mode="gan")
    with pytest.raises(ValueError, match="unknown training mode 'gan'"):
        loop.train(config, str(tmp_path))
