"""jaxdiff's train step on 8 devices, meshes (8,1), (4,2), (1,8), equals 1 device on the same batches."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tests.test_train import _config, tfds_dir  # noqa: F401  (the module-scoped TFDS fixture)

MESHES = [(8, 1), (4, 2), (1, 8)]


def _run(config_overrides, tfds, workdir):
    from configs import shapes_unet
    from jaxdiff.train import loop

    config = _config(shapes_unet, tfds, **config_overrides)
    state = loop.train(config, workdir)
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


OVERRIDES = {"train.steps": 3, "train.batch_size": 8, "train.optimizer": "sgd",
             "train.learning_rate": 0.05, "train.lr_schedule": "constant", "checkpoint.every": 3,
             "mesh.min_shard_size": 64}  # small enough that the tiny model's kernels really shard


@pytest.mark.slow
def test_meshes_equal_one_device(tfds_dir, tmp_path):
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from tests.test_parallel_training import OVERRIDES, _run
        assert jax.device_count() == 8
        for data, fsdp in {MESHES!r}:
            leaves = _run({{**OVERRIDES, "mesh.data": data, "mesh.fsdp": fsdp}}, {tfds_dir!r},
                          {str(tmp_path)!r} + f"/run_{{data}}x{{fsdp}}")
            np.savez({str(tmp_path)!r} + f"/params_{{data}}x{{fsdp}}.npz", *leaves)
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(__file__)))
    single = _run(OVERRIDES, tfds_dir, str(tmp_path / "run_1"))
    for data, fsdp in MESHES:
        sharded = np.load(tmp_path / f"params_{data}x{fsdp}.npz")
        sharded = [sharded[f"arr_{i}"] for i in range(len(single))]
        worst = max(float(np.abs(a - b).max()) for a, b in zip(sharded, single))
        assert worst <= 1e-5, (data, fsdp, worst)
