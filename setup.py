"""jaxdiff: Stable Diffusion in JAX/Flax."""

from setuptools import find_packages, setup

TRAIN = ["tensorflow-cpu==2.21.0", "tensorflow-datasets==4.9.10", "importlib_resources>=6"]

setup(
    name="jaxdiff",
    version="0.1.0",
    description="Stable Diffusion (SD1.x, SD2.x, SDXL) sampling and training in JAX/Flax",
    packages=find_packages(include=["jaxdiff", "jaxdiff.*"]),
    # The bundled default model: a diffusers folder inside the package.
    package_data={"jaxdiff": ["assets/shapes_model/*.json", "assets/shapes_model/*/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "transformers>=5.0",  # tokenizers and configs only: the models are jaxdiff's own
        "ml-collections>=1.0",
        "numpy>=1.26",
        "pillow>=10",
        "tqdm>=4.60",
    ],
    extras_require={
        # Training data pipelines only; sampling never imports TensorFlow.
        "train": TRAIN,
        # diffusers and torch only check parity in the tests; torch is pinned (an unpinned one
        # pulls a multi-GB CUDA build).
        "test": TRAIN + ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "diffusers==0.42.1",
                         "safetensors>=0.4"],
    },
)
