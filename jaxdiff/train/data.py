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
import threading
import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from jaxdiff.data import shapes

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
# An image is refused (skipped or an error, as data.on_bad_image says) from its header alone when it, or
# its resize to the training resolution (short side to R, so the long side to R x aspect), would hold
# more pixels than this: 64 megapixels are 192 MB of RGB. A 1 x 1,000,000 PNG resized to 64 would be 12 GB.
MAX_PIXELS = 64 * 1024 * 1024
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

    Construction scans and checks every example; a bad one (listed but missing, a path that leaves the
    folder, no caption, a caption that is not UTF-8, not an image, too many pixels) is logged and
    recorded in `skipped` as (path, reason) with on_bad_image="skip", or raises ValueError with "error".

    A file that passes the scan (PIL's verify() reads no pixels) but fails to decode when read (a
    truncated or damaged block) raises a ValueError naming it with "error"; with "skip" it is named in
    one warning and the next example that decodes (by index, wrapping around) takes its place, so
    every batch is still a function of (seed, step) alone.
    """

    def __init__(self, root: str, resolution: int, on_bad_image: str = "skip"):
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        if not os.path.isdir(root):
            raise ValueError(f"image folder {root!r} does not exist")
        self.root, self.resolution, self.on_bad_image = root, resolution, on_bad_image
        self._real_root = os.path.realpath(root)
        self.skipped: list[tuple[str, str]] = []
        self._undecodable: set[int] = set()  # indices already reported as failing to decode
        self._lock = threading.Lock()
        captions = self._read_metadata()
        found = set(_find_images(root))
        for rel in sorted(set(captions) - found):
            if not os.path.isfile(os.path.join(root, rel)):
                self._bad(rel, f"listed in {METADATA_FILE} but missing")
                del captions[rel]
        self.examples: list[tuple[str, str]] = []  # (relative path, caption), sorted: same on every host
        for rel in sorted(found | set(captions)):
            path = os.path.join(root, rel)
            problem = self._outside(rel)
            if problem is None:
                if rel in captions:
                    caption = captions[rel]
                else:
                    caption, problem = self._sidecar_caption(path)
                    if problem is None and caption is None:
                        problem = "no caption (not in metadata.jsonl, no .txt beside it)"
            if problem is None:
                problem = _image_problem(path, resolution)
            if problem:
                self._bad(rel, problem)
            else:
                self.examples.append((rel, caption))
        if not self.examples:
            raise ValueError(f"no usable examples in image folder {root!r}")

    def _outside(self, rel: str) -> str | None:
        """Why `rel` is not a file inside the folder (an absolute path, `..`, or a symbolic link that
        resolves outside it), or None."""
        real = os.path.realpath(os.path.join(self.root, rel))
        if os.path.isabs(rel) or rel == os.pardir or rel.startswith(os.pardir + os.sep) or \
                os.path.commonpath([self._real_root, real]) != self._real_root:
            return f"resolves to {real}, outside the data folder {self._real_root}"
        return None

    def _sidecar_caption(self, image_path: str) -> tuple[str | None, str | None]:
        """(the text of the .txt with the image's stem or None, a problem with it or None)."""
        path = os.path.splitext(image_path)[0] + ".txt"
        if not os.path.isfile(path):
            return None, None
        outside = self._outside(os.path.relpath(path, self.root))
        if outside:
            return None, f"its caption file {path} {outside}"
        with open(path, "rb") as f:
            raw = f.read()
        text, problem = _utf8(raw)
        if problem:
            return None, f"its caption file {path} {problem}"
        return text.strip(), None

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
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                where = f"{METADATA_FILE} line {number}"
                line, problem = _utf8(raw, lines=False)
                if problem:
                    self._bad(where, problem)
                    continue
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    name, text = entry["file_name"], entry["text"]
                    if not isinstance(name, str) or not name:
                        raise TypeError(f"file_name {name!r} is not a path")
                    rel = os.path.normpath(name)
                except (ValueError, KeyError, TypeError) as e:
                    self._bad(where, f"not a JSON object with file_name and text ({e!r})")
                    continue
                text = str(text)
                outside = self._outside(rel)
                if outside:
                    self._bad(where, f"file_name {name!r} {outside}")
                    continue
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:  # a lone surrogate escaped in the JSON
                    self._bad(where, f"the text of {name!r} is not valid Unicode ({e.reason})")
                    continue
                if rel in captions:
                    self._bad(rel, f"listed twice in {METADATA_FILE} (again on line {number})")
                    continue
                captions[rel] = str(text)
        return captions

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        """Example `index` as (uint8 [R, R, 3], caption). An image that does not decode raises a
        ValueError naming it ("error"), or is replaced by the next one that does ("skip")."""
        n = len(self.examples)
        for offset in range(n):
            i = (index + offset) % n
            rel, caption = self.examples[i]
            path = os.path.join(self.root, rel)
            try:
                return self._read(path), caption
            except MemoryError:
                raise
            except Exception as e:  # passed the scan but does not decode: name the file
                reason = f"cannot decode image ({type(e).__name__}: {e})"
                if self.on_bad_image == "error":
                    raise ValueError(f"{path}: {reason}") from None
                with self._lock:
                    new = i not in self._undecodable
                    self._undecodable.add(i)
                    if new:
                        self.skipped.append((path, reason))
                if new:
                    log.warning("skipping %s: %s; the next example takes its place", path, reason)
        raise ValueError(f"no image of folder {self.root!r} can be decoded")

    def _read(self, path: str) -> np.ndarray:
        with Image.open(path) as image:
            problem = _size_problem(image.size, self.resolution)  # (the file may have changed since)
            if problem:
                raise ValueError(problem)
            return square_image(image, self.resolution)


def _find_images(root: str) -> Iterator[str]:
    """Relative paths of the files under root with an image extension."""
    for folder, _, files in os.walk(root):
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                yield os.path.relpath(os.path.join(folder, name), root)


_NEWLINE = b"\n"


def _utf8(raw: bytes, lines: bool = True) -> tuple[str | None, str | None]:
    """(raw decoded as UTF-8, None), or (None, why not: the first bad byte, and its line if `lines`)."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        line = f"line {raw.count(_NEWLINE, 0, e.start) + 1}: " if lines else ""
        return None, f"is not UTF-8 text ({line}byte 0x{raw[e.start]:02x} at offset {e.start} is {e.reason})"


def _size_problem(size: tuple[int, int], resolution: int) -> str | None:
    """Why an image of `size` (w, h) is refused before decoding it: more pixels than MAX_PIXELS, in
    the file or after its resize to `resolution` (short side), or no pixels at all; else None."""
    w, h = size
    if w < 1 or h < 1:
        return f"has no pixels ({w} x {h})"
    if w * h > MAX_PIXELS:
        return f"is {w} x {h} pixels, over the limit of {MAX_PIXELS // 2**20} megapixels"
    scale = resolution / min(w, h)
    resized = max(resolution, round(w * scale)) * max(resolution, round(h * scale))
    if resized > MAX_PIXELS:
        return (f"is {w} x {h} pixels: an aspect ratio of {max(w, h) / min(w, h):.0f}:1, whose resize to "
                f"{resolution} on its short side would be {resized / 2**20:.0f} megapixels (limit "
                f"{MAX_PIXELS // 2**20})")
    return None


def _image_problem(path: str, resolution: int) -> str | None:
    """Why the file is refused: PIL cannot open and verify it, or its header's size is too large
    (`_size_problem`); None when neither. No pixel is decoded."""
    try:
        with warnings.catch_warnings():  # (PIL warns above its own cap; the size check below names it)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            problem = _size_problem(image.size, resolution)
            if problem:
                return problem
            image.verify()
    except Image.DecompressionBombError as e:  # (PIL's own cap, above MAX_PIXELS: refused in open)
        return f"has too many pixels ({e})"
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
