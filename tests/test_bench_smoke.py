"""The benchmark scripts of bench/ still run: gpu_suite.py --quick end to end on the CPU (tiny models,
64x64, 2 steps, one worker process per architecture as on a GPU), and the other two answer --help.
The benchmarks themselves are run by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One case of each architecture, one of them batched: each case compiles jaxdiff's whole pipeline
# (10-20 s on a 2-core CPU), so the four cases of --quick would take two minutes here.
CASES = ["sd15-b2", "sdxl-b1"]


def _env():
    # CPU only, and jaxdiff from this checkout even where it is not installed.
    return dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
                PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))


@pytest.mark.parametrize("script", ["unet_speed.py", "txt2img_speed.py", "gpu_suite.py"])
def test_help(script):
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", script), "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


@pytest.mark.slow
def test_gpu_suite_quick_on_cpu(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    out = tmp_path / "out"
    # fp32: XLA compiles bf16 programs about twice as slowly on a CPU.
    cmd = [sys.executable, os.path.join(REPO, "bench", "gpu_suite.py"), "--quick", "--jax-dtype", "fp32",
           "--cases", ",".join(CASES), "--out", str(out)]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=_env())
    log = (r.stdout[-4000:] + "\n" + r.stderr[-4000:])
    assert r.returncode == 0, log
    results = json.loads((out / "results.json").read_text())
    assert results["selected"] == CASES
    cases = {c["case"]: c for c in results["cases"]}
    assert sorted(cases) == sorted(CASES), log
    for name, case in cases.items():
        assert case["status"] == "ok" and not case["errors"], (name, case)
        assert case["jaxdiff_s_per_image"] > 0 and case["diffusers_s_per_image"] > 0, (name, case)
        assert case["unet_step_flops"] > 0, (name, case)
        # Tiny random models, both in fp32, same weights and noise: the same images.
        assert case["max_pixel_diff"] < 1e-3, (name, case)
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in CASES)
