"""jaxdiff: Stable Diffusion in JAX/Flax, from a laptop CPU to a TPU pod.

    pipe = jaxdiff.load(path)                       # a diffusers pipeline folder
    images = pipe.generate("a red circle", seed=0)  # NumPy [B, H, W, 3] in [0, 1]
    jaxdiff.save(pipe, "out/model")                 # back to a diffusers folder

Importing jaxdiff never imports TensorFlow (only the training data pipeline does).
"""

from jaxdiff.pipeline import Pipeline, load
from jaxdiff.weights.convert import WeightError
from jaxdiff.weights.export import save

__version__ = "0.1.0"
__all__ = ["Pipeline", "WeightError", "load", "save"]
