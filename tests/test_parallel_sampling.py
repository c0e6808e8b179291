"""Sampling over 8 devices equals sampling on 1 (only float reduction order may differ)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.test_parallel import ROOT

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a cat", "a photo"]  # odd: padded to 8


def _generate(pipe, sampler):
    return pipe.generate(PROMPTS, negative_prompts="a yellow circle", height=32, width=48, steps=3,
                         guidance_scale=4.0, sampler=sampler, seed=11)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])
def test_eight_devices_equal_one(sampler, pipeline_dir, jaxdiff_pipeline, tmp_path):
    out = tmp_path / "images.npy"
    script = textwrap.dedent(f"""
        import jax, numpy as np, jaxdiff
        from tests.test_parallel_sampling import _generate
        assert jax.device_count() == 8, jax.devices()
        pipe = jaxdiff.load({pipeline_dir("sd1")!r})
        assert pipe.mesh.size == 8
        np.save({str(out)!r}, _generate(pipe, {sampler!r}))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env,
                   cwd=ROOT)
    sharded = np.load(out)
    single = _generate(jaxdiff_pipeline("sd1"), sampler)
    assert sharded.shape == single.shape == (5, 32, 48, 3)
    np.testing.assert_allclose(sharded, single, atol=1e-4, rtol=0)
