"""TFDS builder `shapes`: the spec data set generated locally from `jaxdiff.data.shapes.sample`, no download.

    import tensorflow_datasets as tfds
    from jaxdiff.data import tfds_shapes  # registers "shapes"
    ds = tfds.load("shapes", split="train", data_dir=...)                  # configs: shapes.BUILDS
    builder = tfds_shapes.Shapes(data_dir=..., config=tfds_shapes.ShapesConfig(
        name="res64_small", num_train=1_000, num_validation=100))          # any custom size

Example i of split s is exactly `shapes.sample(i, s, resolution)`, so a build is reproducible and can be
checked against the generator. This is the only jaxdiff module that imports TensorFlow.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from jaxdiff.data import shapes


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Resolution and split sizes of a build."""

    resolution: int = 64
    num_train: int = 50_000
    num_validation: int = 1_000


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Images of one or two coloured shapes on a plain background, with captions (shapes-dataset spec)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        ShapesConfig(name=name, resolution=r, num_train=train, num_validation=validation,
                     description=f"{r}x{r}, {train} train / {validation} validation.")
        for name, (r, train, validation) in shapes.BUILDS.items()
    ]
    DEFAULT_CONFIG_NAME = "res64"

    def _info(self) -> tfds.core.DatasetInfo:
        """Features: image (uint8 [R, R, 3], stored as lossless PNG) and caption (text)."""
        r = self.builder_config.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(r, r, 3)), "caption": tfds.features.Text()}
            ),
        )

    def _split_generators(self, dl_manager):
        """train and validation, each drawn from its own seed stream."""
        del dl_manager  # nothing to download
        sizes = {"train": self.builder_config.num_train, "validation": self.builder_config.num_validation}
        return {split: self._generate_examples(split, n) for split, n in sizes.items()}

    def _generate_examples(self, split: str, num_examples: int):
        """Yields (index, example) with example = shapes.sample(index, split)."""
        for index in range(num_examples):
            image, caption = shapes.sample(index, split, self.builder_config.resolution)
            yield index, {"image": image, "caption": caption}
