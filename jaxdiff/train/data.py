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
import json
import logging
import os
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from jaxdiff.data import shapes

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
ON_BAD_IMAGE = ("skip", "error")
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


class CaptionFolderSource:
    """Images under `root` with captions from metadata.jsonl or a same-stem .txt, as RGB squares.

    Construction scans and checks every example; a bad one (listed but missing, no caption, not an image)
    is logged and recorded in `skipped` as (path, reason) with on_bad_image="skip", or raises ValueError
    with "error". A file that passes PIL's verify() but fails to decode later raises when read.
    """

    def __init__(self, root: str, resolution: int, on_bad_image: str = "skip"):
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        if not os.path.isdir(root):
            raise ValueError(f"image folder {root!r} does not exist")
        self.root, self.resolution, self.on_bad_image = root, resolution, on_bad_image
        self.skipped: list[tuple[str, str]] = []
        captions = self._read_metadata()
        found = set(_find_images(root))
        for rel in sorted(set(captions) - found):
            if not os.path.isfile(os.path.join(root, rel)):
                self._bad(rel, f"listed in {METADATA_FILE} but missing")
                del captions[rel]
        self.examples: list[tuple[str, str]] = []  # (relative path, caption), sorted: same on every host
        for rel in sorted(found | set(captions)):
            caption = captions[rel] if rel in captions else _sidecar_caption(os.path.join(root, rel))
            problem = "no caption (not in metadata.jsonl, no .txt beside it)" if caption is None else (
                _image_problem(os.path.join(root, rel)))
            if problem:
                self._bad(rel, problem)
            else:
                self.examples.append((rel, caption))
        if not self.examples:
            raise ValueError(f"no usable examples in image folder {root!r}")

    def _bad(self, rel: str, reason: str) -> None:
        """Reports one bad example: raises, or logs it and records it in `skipped`."""
        path = os.path.join(self.root, rel)
        if self.on_bad_image == "error":
            raise ValueError(f"{path}: {reason}")
        log.warning("skipping %s: %s", path, reason)
        self.skipped.append((path, reason))

    def _read_metadata(self) -> dict[str, str]:
        """{relative path: caption} from root/metadata.jsonl ({} without one); bad lines are reported."""
        path = os.path.join(self.root, METADATA_FILE)
        if not os.path.isfile(path):
            return {}
        captions = {}
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{METADATA_FILE} line {number}"
                try:
                    entry = json.loads(line)
                    rel, text = os.path.normpath(entry["file_name"]), entry["text"]
                except (ValueError, KeyError, TypeError) as e:
                    self._bad(where, f"not a JSON object with file_name and text ({e!r})")
                    continue
                if rel in captions:
                    self._bad(rel, f"listed twice in {METADATA_FILE} (again on line {number})")
                    continue
                captions[rel] = str(text)
        return captions

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        rel, caption = self.examples[index]
        path = os.path.join(self.root, rel)
        try:
            with Image.open(path) as image:
                return square_image(image, self.resolution), caption
        except OSError as e:  # passed verify() at the scan but does not decode: name the file
            raise ValueError(f"{path}: cannot decode image ({e})") from e


def _find_images(root: str) -> Iterator[str]:
    """Relative paths of the files under root with an image extension."""
    for folder, _, files in os.walk(root):
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                yield os.path.relpath(os.path.join(folder, name), root)


def _sidecar_caption(image_path: str) -> str | None:
    """The text of the .txt with the image's stem, or None."""
    path = os.path.splitext(image_path)[0] + ".txt"
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def _image_problem(path: str) -> str | None:
    """Why PIL cannot open and verify the file, or None when it can."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, SyntaxError, struct.error...)
        return f"cannot be read as an image ({type(e).__name__}: {e})"
    return None


def square_image(image: Image.Image, resolution: int) -> np.ndarray:
    """uint8 [R, R, 3]: RGB, upright per EXIF, short side resized to R (Lanczos), centre-cropped."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != image.size:
        image = image.resize(size, Image.LANCZOS)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)))


def make_source(config):
    """The source that `config.data` names: "tfds" (name, split, data_dir, config), "shapes" (the shapes
    data set generated in memory: split, config) or "folder"."""
    if config.source == "folder":
        return CaptionFolderSource(config.folder, config.resolution, config.get("on_bad_image", "skip"))
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
