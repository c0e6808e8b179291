"""Importing jaxdiff to generate must stay light: no TensorFlow, no torch."""

import subprocess
import sys


def test_import_does_not_pull_tensorflow_or_torch():
    code = ("import sys, jaxdiff, jaxdiff.pipeline; "
            "bad = [m for m in ('tensorflow', 'torch', 'diffusers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
