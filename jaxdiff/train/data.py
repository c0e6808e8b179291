"""Training data: random-access sources and batches that are a pure function of (seed, step).

    source = make_source(config.data)                # tfds "shapes", the same generated in memory, or a folder
    batch = batch_at(source, step, 256, seed=0)      # {"images": f32 [256, H, W, 3] in [-1, 1], "captions"}
    # (a source of cached latents gives {"posterior": ...} instead of "images")
    with Prefetcher(lambda s: batch_at(source, s, 256, 0), start_step) as batches:
        for step, batch in batches: ...

Nothing here keeps iterator state: resuming at step N reads exactly the batches an uninterrupted run
would have read, on any number of hosts. TensorFlow is imported only inside `tfds_source`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
from typing import Callable, Sequence

import numpy as np

from jaxdiff.data import shapes
from jaxdiff.train import caption_folder

FIELDS = ("images", "posterior")  # what a source's arrays are; batch_at returns them under this key


# --- sources ------------------------------------------------------------------------------------------------

class ArraySource:
    """Examples held in memory: N arrays and N captions. `field` names what the arrays are: "images"
    (uint8 [N, H, W, 3]) or "posterior" (float32 VAE posterior mean and std, see `train.cache_latents`)."""

    def __init__(self, arrays: np.ndarray, captions: Sequence[str], field: str = "images"):
        arrays = np.asarray(arrays)
        if field == "images" and (arrays.dtype != np.uint8 or arrays.ndim != 4 or arrays.shape[-1] != 3):
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {arrays.dtype} {arrays.shape}")
        if field not in FIELDS:
            raise ValueError(f"unknown field {field!r}; choose one of {FIELDS}")
        if len(captions) != len(arrays):
            raise ValueError(f"{len(arrays)} {field} but {len(captions)} captions")
        self.arrays, self.captions, self.field = arrays, [str(c) for c in captions], field

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        return self.arrays[index], self.captions[index]


def tfds_source(name: str = "shapes", split: str = "train", data_dir: str | None = None,
                config=None) -> ArraySource:
    """A TFDS split read into memory, built locally first if needed (features "image" and "caption")."""
    import tensorflow_datasets as tfds

    if name == "shapes":
        from jaxdiff.data import tfds_shapes  # noqa: F401  (registers the builder)

    kwargs = {} if config is None else {"config": config}
    builder = tfds.builder(name, data_dir=data_dir, **kwargs)
    builder.download_and_prepare()  # a no-op once built; shapes is generated, never downloaded
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))  # the whole split as one batch
    return ArraySource(data["image"], [c.decode("utf-8") for c in data["caption"]])


def generated_source(build: str = "res64", split: str = "train") -> ArraySource:
    """The shapes data set generated in memory: example i is `shapes.sample(i, split)`. The TFDS build of the
    same name holds the same examples (stored in another order, shuffled by TFDS), without TensorFlow or a
    data dir: for hosts where TensorFlow is not installed or not wanted (an accelerator host, a TPU pod).
    50k 64x64 examples take about 11 s on one core."""
    if build not in shapes.BUILDS:
        raise ValueError(f"unknown shapes build {build!r} (data.config); choose one of {sorted(shapes.BUILDS)}")
    resolution, *sizes = shapes.BUILDS[build]
    size = dict(zip(("train", "validation"), sizes)).get(split)
    if size is None:
        raise ValueError(f"unknown shapes split {split!r} (data.split); choose 'train' or 'validation'")
    images, captions = zip(*(shapes.sample(i, split, resolution) for i in range(size)))
    return ArraySource(np.stack(images), captions)


def make_source(config):
    """The source that `config.data` names: "tfds" (name, split, data_dir, config), "shapes" (the shapes
    data set generated in memory: split, config) or "folder"."""
    if config.source == "folder":
        return caption_folder.CaptionFolderSource(config.folder, config.resolution, config.get("on_bad_image", "skip"))
    if config.source == "tfds":
        # "" means TFDS's own default (~/tensorflow_datasets), not the working directory.
        source = tfds_source(config.name, config.split, config.get("data_dir") or None,
                             config.get("config") or None)
    elif config.source == "shapes":
        source = generated_source(config.get("config") or "res64", config.split)
    else:
        raise ValueError(f"unknown data.source {config.source!r}: expected 'tfds', 'shapes' or 'folder'")
    if source[0][0].shape[0] != config.resolution:
        raise ValueError(f"{config.source} images are {source[0][0].shape[:2]}, but data.resolution "
                         f"is {config.resolution} (pick the build with data.config)")
    return source


# --- batches ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(permutation of range(n), flip flags [n]) of one epoch, both from default_rng([seed, epoch])."""
    rng = np.random.default_rng([seed, epoch])
    order, flips = rng.permutation(n), rng.random(n) < 0.5
    order.flags.writeable = flips.flags.writeable = False  # cached and shared between threads
    return order, flips


def stream_examples(positions: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(example index, flip flag) at each position of the infinite stream of shuffled epochs."""
    indices, flips = np.empty(len(positions), np.int64), np.empty(len(positions), bool)
    for epoch in np.unique(positions // n):  # a batch spans at most a few epochs
        at = positions // n == epoch
        order, flip = epoch_order(seed, int(epoch), n)
        indices[at], flips[at] = order[positions[at] % n], flip[positions[at] % n]
    return indices, flips


def batch_at(source, step: int, global_batch: int, seed: int, process_index: int = 0,
             process_count: int = 1, flip: bool = False) -> dict:
    """This host's slice of global step `step`: stream positions [step*GB, (step+1)*GB), contiguous per host."""
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    if len(source) == 0:
        raise ValueError("the data source is empty")
    b = global_batch // process_count
    start = step * global_batch + process_index * b
    indices, flips = stream_examples(np.arange(start, start + b, dtype=np.int64), len(source), seed)
    field = getattr(source, "field", "images")
    if flip and field != "images":
        raise ValueError(f"cannot flip {field}: only images (a flipped image's latents are not the "
                         "flipped latents)")
    arrays, captions = [], []
    for index, flipped in zip(indices, flips & flip):
        array, caption = source[int(index)]
        arrays.append(array[:, ::-1] if flipped else array)
        captions.append(caption)
    stacked = np.stack(arrays)
    return {field: stacked.astype(np.float32) / 127.5 - 1.0 if field == "images" else stacked,
            "captions": captions}


# --- prefetching --------------------------------------------------------------------------------------------

class Prefetcher:
    """Yields (step, fn(step)) for step = start_step, start_step + 1, ..., computed ahead in threads."""

    def __init__(self, fn: Callable[[int], object], start_step: int, depth: int = 2, workers: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._fn, self._next_step = fn, start_step
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="prefetch")
        self._pending: collections.deque = collections.deque()
        for _ in range(depth):
            self._submit()

    def _submit(self) -> None:
        self._pending.append((self._next_step, self._pool.submit(self._fn, self._next_step)))
        self._next_step += 1

    def __iter__(self):
        return self

    def __next__(self):
        if not self._pending:
            raise StopIteration  # closed
        step, future = self._pending.popleft()
        self._submit()  # keeps `depth` batches in the works while the consumer trains on this one
        try:
            return step, future.result()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Drops queued work and returns at once; a call already running finishes in its thread."""
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
