"""Training on 8 devices equals 1 device on the same global batch: meshes (8,1), (4,2), (1,8), a batch
that needs padding, gradient accumulation, AdamW; and two processes train, checkpoint, and restore on 2."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tests.test_parallel import ROOT, free_port
from tests.test_train import _config


def _run(config_overrides, tfds, workdir):
    from configs import shapes_unet
    from jaxdiff.train import loop

    config = _config(shapes_unet, tfds, **config_overrides)
    state = loop.train(config, workdir)
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


OVERRIDES = {"train.steps": 3, "train.batch_size": 8, "train.optimizer": "sgd",
             "train.learning_rate": 0.05, "train.lr_schedule": "constant", "checkpoint.every": 3,
             "mesh.min_shard_size": 64}  # small enough that the tiny model's kernels really shard
ADAMW_LR = 1e-3
# name -> (overrides on 8 devices, overrides of the 1-device run it must equal). Each case is a whole
# training run on 8 simulated devices (1-2 minutes on 2 cores), so each also stands for a plain mesh:
# the (8,1) and (4,2) runs are the padded and the accumulating ones.
CASES = {
    # Data parallel, 6 rows padded to 8 with weight-0 rows.
    "8x1 batch 6": ({"mesh.data": 8, "train.batch_size": 6}, {"train.batch_size": 6}),
    # 2 micro-batches of 8 rows each over 4x2, against one 16-row step.
    "4x2 accumulate 2": ({"mesh.data": 4, "mesh.fsdp": 2, "train.batch_size": 16,
                          "train.grad_accum_steps": 2}, {"train.batch_size": 16}),
    # Fully sharded parameters and AdamW moments.
    "1x8 adamw": ({"mesh.data": 1, "mesh.fsdp": 8, "train.optimizer": "adamw",
                   "train.learning_rate": ADAMW_LR}, {"train.optimizer": "adamw", "train.learning_rate": ADAMW_LR}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_mesh_equals_one_device(name, tfds_dir, tmp_path):
    """One case per test, so that pytest-xdist spreads the cases over its workers."""
    reference = CASES[name][1]
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from tests.test_parallel_training import CASES, OVERRIDES, _run
        assert jax.device_count() == 8
        leaves = _run({{**OVERRIDES, **CASES[{name!r}][0]}}, {tfds_dir!r}, {str(tmp_path / "sharded")!r})
        np.savez({str(tmp_path / "params.npz")!r}, *leaves)
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env,
                   cwd=ROOT)
    single = _run({**OVERRIDES, **reference}, tfds_dir, str(tmp_path / "single"))
    loaded = np.load(tmp_path / "params.npz")
    assert len(loaded.files) == len(single)
    diffs = np.concatenate([np.abs(loaded[f"arr_{j}"] - b).ravel() for j, b in enumerate(single)])
    if reference.get("train.optimizer") == "adamw":
        # Adam divides by sqrt(second moment): a gradient that is only float round-off (a true zero)
        # has its sign, not its size, decide the update, so reduction order can flip a whole
        # lr-sized step. Bound: 2 * lr per step for those entries; everything else as SGD.
        assert diffs.max() <= 2 * ADAMW_LR * OVERRIDES["train.steps"], (name, diffs.max())
        assert np.mean(diffs <= 1e-5) >= 0.999, (name, np.mean(diffs <= 1e-5))
    else:
        assert diffs.max() <= 1e-5, (name, diffs.max())


@pytest.mark.slow
def test_two_processes_train_and_restore_on_two_devices(tfds_dir, tmp_path):
    """launch/local_multiprocess.sh: 2 processes x 4 devices train together and checkpoint; one process
    with 2 devices restores that checkpoint with the parameters of the same run done by 1 process x 8."""
    overrides = {**OVERRIDES, "train.steps": 4, "checkpoint.every": 2, "mesh.fsdp": 2,
                 "data.data_dir": tfds_dir}
    flags = ["--config", "configs/shapes_unet.py:tiny", *[f"--config.{k}={v}" for k, v in overrides.items()]]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    two = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", *flags, "--workdir",
                          str(tmp_path / "two_procs")], cwd=ROOT, capture_output=True, text=True,
                         env={**env, "PORT": str(free_port()), "DEVICES_PER_PROC": "4",
                              "LOGDIR": str(tmp_path / "logs")}, timeout=600)
    logs = "".join((tmp_path / "logs" / f"proc_{i}.log").read_text() for i in range(2))
    assert two.returncode == 0, two.stderr + logs
    one = subprocess.run([sys.executable, "main.py", "train", *flags, "--workdir", str(tmp_path / "one_proc")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert one.returncode == 0, one.stderr
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from jaxdiff.train import loop
        assert jax.device_count() == 2
        a, b = (loop.restore_pipeline({str(tmp_path)!r} + d, use_ema=False) for d in ("/two_procs", "/one_proc"))
        leaves = [(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params))]
        assert len(leaves) == len(jax.tree.leaves(a.params)) > 10
        print("devices", sorted({{len(x.sharding.device_set) for x in jax.tree.leaves(a.params)}}))
        print("worst", max(float(np.abs(x - y).max()) for x, y in leaves))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert out.returncode == 0, out.stderr
    assert "devices [2]" in out.stdout, out.stdout
    worst = float(out.stdout.split("worst")[1])
    assert worst <= 1e-5, worst
    # Both runs really trained 4 steps and process 0 alone wrote the metrics and run files.
    assert sorted(os.listdir(tmp_path / "two_procs" / "checkpoints")) == ["2", "4"]
    rows = np.genfromtxt(tmp_path / "two_procs" / "metrics.csv", delimiter=",", names=True)
    assert list(rows["step"]) == [1, 2, 3, 4]
