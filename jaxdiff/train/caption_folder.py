"""A folder of captioned images as a training source: `metadata.jsonl` ({"file_name", "text"} per
line) or a `.txt` caption beside each image. Everything is checked when the folder is scanned, from
headers alone (paths that leave the folder, captions that are not UTF-8, images too large to resize),
so a bad file is skipped or named (`on_bad_image`) before training starts, never mid-run.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
# An image is refused (skipped or an error, as data.on_bad_image says) from its header alone when it, or
# its resize to the training resolution (short side to R, so the long side to R x aspect), would hold
# more pixels than this: 64 megapixels are 192 MB of RGB. A 1 x 1,000,000 PNG resized to 64 would be 12 GB.
MAX_PIXELS = 64 * 1024 * 1024
ON_BAD_IMAGE = ("skip", "error")


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
