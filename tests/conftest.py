"""Shared fixtures: tiny diffusers-format pipelines built once per test session."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# jaxdiff.load() turns on jax's persistent compilation cache under ~/.cache unless this is set: tests
# would otherwise write there, and every later compile of that worker with them.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")


def pytest_collection_modifyitems(config, items):
    """Slow tests first (stable otherwise): with pytest-xdist (README: `-n 2`) the longest ones then
    start at once on separate workers instead of one of them running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory):
    """kind ("sd1" | "sd2" | "sdxl") -> path of a tiny random-weight pipeline folder."""
    from tests import tiny_pipelines

    built = {}

    def get(kind):
        if kind not in built:
            path = str(tmp_path_factory.mktemp(kind))
            tiny_pipelines.build(kind, path)
            built[kind] = path
        return built[kind]

    return get


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """A TFDS data dir holding the shapes build "tiny" (both splits), built once per test session."""
    from jaxdiff.train import data

    path = str(tmp_path_factory.mktemp("tfds"))
    data.tfds_source("shapes", "train", data_dir=path, config="tiny")
    return path


@pytest.fixture(scope="session")
def jaxdiff_pipeline(pipeline_dir):
    """kind -> a `jaxdiff.Pipeline` loaded from the tiny folder (loaded once)."""
    import jaxdiff

    loaded = {}

    def get(kind):
        if kind not in loaded:
            loaded[kind] = jaxdiff.load(pipeline_dir(kind))
        return loaded[kind]

    return get
