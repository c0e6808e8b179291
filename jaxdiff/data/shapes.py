"""The procedural "shapes" data set (/work/shared/specs/shapes-dataset.md), in pure NumPy.

    image, text = sample(7, "train")        # uint8 [64, 64, 3], "a red circle to the left of a blue square"
    scene = random_scene(np.random.default_rng(0)); render(scene); caption(scene)

Geometry: an object of integer `size` s occupies the pixel-aligned box [cx - s/2, cx + s/2) x
[cy - s/2, cy + s/2) in continuous coordinates (pixel (row i, col j) has its centre at (j + 0.5, i + 0.5)),
so its rendered bounding box is exactly s x s pixels. Mix: 30% single objects, 70% pairs with the four
relations equally likely; colours, shapes and backgrounds uniform; the two objects of a pair differ in
colour. This module must not import TensorFlow or torch (the TFDS builder lives in `tfds_shapes`).
"""

from __future__ import annotations

import dataclasses
import re
import zlib

import numpy as np

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 215, 30),
    "purple": (150, 50, 190),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("to the left of", "to the right of", "above", "below")
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128), "white": (255, 255, 255)}

P_SINGLE = 0.3  # the rest are pairs, the relation drawn uniformly
GAP = 2  # pixels of background kept between two objects' bounding boxes
DATASET_SEED = 20240601  # mixed into every example's seed so the data set is a fixed, named stream
_MAX_PLACEMENT_TRIES = 1000

# Named builds of the data set: (resolution, train examples, validation examples). The TFDS builder's
# configs and the in-memory source (`jaxdiff.train.data.generated_source`) both read this table, so the
# same name gives the same examples either way.
BUILDS = {"res64": (64, 50_000, 1_000), "res128": (128, 50_000, 1_000), "tiny": (64, 256, 64)}

# (axis, sign): the relation "1 REL 2" holds when sign * (c1[axis] - c2[axis]) > 0; axis 0 = x, 1 = y.
_RELATION_AXES = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1), "below": (1, 1)}
OPPOSITE_RELATION = {"to the left of": "to the right of", "to the right of": "to the left of",
                     "above": "below", "below": "above"}


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One flat-filled object; (cx, cy) is the centre of its size x size bounding box, in pixels."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: int

    @property
    def centroid(self) -> tuple[float, float]:
        """Centre of mass (x, y) of the ideal shape: a triangle's lies 2/3 of the way down from its apex."""
        if self.shape == "triangle":
            return self.cx, self.cy - self.size / 2 + 2 * self.size / 3
        return self.cx, self.cy

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1), right/bottom exclusive."""
        h = self.size / 2
        return self.cx - h, self.cy - h, self.cx + h, self.cy + h


@dataclasses.dataclass(frozen=True)
class Scene:
    """A background, one or two objects and, for two, the relation that the caption names."""

    background: str
    objects: tuple[ShapeObject, ...]
    relation: str | None = None


def size_range(resolution: int) -> tuple[int, int]:
    """Smallest and largest object size (pixels) whose bounding box lies in [side/6, side/3]."""
    return -(-resolution // 6), resolution // 3


def relation_gap(a: tuple[float, float], b: tuple[float, float], relation: str) -> float:
    """How far point `a` is `relation` point `b` along the relation's axis (negative: the opposite way)."""
    axis, sign = _RELATION_AXES[relation]
    return sign * (a[axis] - b[axis])


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str) -> bool:
    """The spec's meaning of "a {relation} b" for points (x grows rightwards, y downwards)."""
    return relation_gap(a, b, relation) > 0


def relation_margin(a: ShapeObject, b: ShapeObject) -> float:
    """The clearance the generator keeps between centroids: one (the larger) object size."""
    return float(max(a.size, b.size))


def boxes_apart(a: ShapeObject, b: ShapeObject, gap: int = GAP) -> bool:
    """Whether the bounding boxes are separated by at least `gap` pixels along x or y."""
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return bx0 - ax1 >= gap or ax0 - bx1 >= gap or by0 - ay1 >= gap or ay0 - by1 >= gap


def _draw_labels(rng: np.random.Generator) -> tuple[list[tuple[str, str]], str | None]:
    """Draws what a caption names: (colour, shape) per object and the relation (None for one object)."""
    single = rng.random() < P_SINGLE
    colours = rng.choice(list(COLOURS), size=1 if single else 2, replace=False)
    labels = [(str(c), str(rng.choice(SHAPES))) for c in colours]
    return labels, None if single else str(rng.choice(RELATIONS))


def _place(rng: np.random.Generator, colour: str, shape: str, resolution: int) -> ShapeObject:
    """An object of random size at a random position fully inside the image."""
    lo, hi = size_range(resolution)
    size = int(rng.integers(lo, hi + 1))
    x0, y0 = rng.integers(0, resolution - size + 1, size=2)
    return ShapeObject(colour, shape, float(x0 + size / 2), float(y0 + size / 2), size)


def _place_pair(
    rng: np.random.Generator, labels: list[tuple[str, str]], relation: str, resolution: int
) -> tuple[ShapeObject, ShapeObject]:
    """Two non-overlapping objects such that `relation` holds with a margin of one object size."""
    for _ in range(_MAX_PLACEMENT_TRIES):
        a, b = (_place(rng, c, s, resolution) for c, s in labels)
        if not relation_holds(a.centroid, b.centroid, relation):
            # Swapping which object is drawn where mostly flips the relation: it doubles the acceptance.
            a, b = (dataclasses.replace(at, colour=o.colour, shape=o.shape) for at, o in ((b, a), (a, b)))
        clear = relation_gap(a.centroid, b.centroid, relation) >= relation_margin(a, b)
        if clear and boxes_apart(a, b):
            return a, b
    raise RuntimeError(f"could not place {labels} {relation!r} at resolution {resolution}")


def random_scene(rng: np.random.Generator, resolution: int = 64) -> Scene:
    """A random scene of the spec: background, 1 or 2 objects, relation (see the module docstring)."""
    background = str(rng.choice(list(BACKGROUNDS)))
    labels, relation = _draw_labels(rng)
    if relation is None:
        objects = (_place(rng, *labels[0], resolution),)
    else:
        objects = _place_pair(rng, labels, relation, resolution)
    return Scene(background, tuple(objects), relation)


def shape_mask(obj: ShapeObject, resolution: int = 64) -> np.ndarray:
    """Boolean [H, W] mask of the pixels the object covers (pixel centres inside; no anti-aliasing)."""
    px = np.arange(resolution)[None, :] + 0.5 - obj.cx  # offsets of pixel centres from the box centre
    py = np.arange(resolution)[:, None] + 0.5 - obj.cy
    half = obj.size / 2
    in_rows = np.abs(py) < half
    if obj.shape == "square":
        return in_rows & (np.abs(px) < half)
    if obj.shape == "circle":
        return px**2 + py**2 <= half**2
    if obj.shape == "triangle":
        # Each row spans the triangle's width at the row's lower edge: the apex row is never empty, the
        # base row is exactly `size` wide, so the bounding box is size x size like the other shapes.
        depth = py + 0.5 + half  # distance from the apex (top of the box) to the row's lower edge
        return in_rows & (np.abs(px) <= depth / 2)
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, resolution: int = 64) -> np.ndarray:
    """The scene as uint8 [H, W, 3]: flat fills of the exact spec colours on the background."""
    image = np.empty((resolution, resolution, 3), np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        image[shape_mask(obj, resolution)] = COLOURS[obj.colour]
    return image


def format_caption(labels: list[tuple[str, str]], relation: str | None) -> str:
    """`a {colour} {shape}` or `a {c1} {s1} {relation} a {c2} {s2}`."""
    parts = [f"a {c} {s}" for c, s in labels]
    return parts[0] if relation is None else f"{parts[0]} {relation} {parts[1]}"


def caption(scene: Scene) -> str:
    """The scene's caption (it never mentions the background)."""
    return format_caption([(o.colour, o.shape) for o in scene.objects], scene.relation)


def random_caption(rng: np.random.Generator) -> str:
    """A caption of the spec's grammar with the data set's mix (for evaluation prompts)."""
    return format_caption(*_draw_labels(rng))


_OBJECT = rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_CAPTION_RE = re.compile(rf"{_OBJECT}(?: ({'|'.join(RELATIONS)}) {_OBJECT})?")


def parse_caption(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """([(colour, shape), ...], relation or None); case and runs of whitespace are ignored.

    Raises ValueError on text outside the grammar, including two objects of the same colour (which the
    data set never shows).
    """
    m = _CAPTION_RE.fullmatch(" ".join(text.lower().split()))
    if m is None:
        raise ValueError(f"not a shapes caption: {text!r}")
    c1, s1, relation, c2, s2 = m.groups()
    if relation is None:
        return [(c1, s1)], None
    if c1 == c2:
        raise ValueError(f"two objects of the same colour: {text!r}")
    return [(c1, s1), (c2, s2)], relation


def reverse_relation(text: str) -> str | None:
    """The caption with the opposite relation ("above" <-> "below", left <-> right), the objects
    unchanged; None for a one-object caption."""
    labels, relation = parse_caption(text)
    return None if relation is None else format_caption(labels, OPPOSITE_RELATION[relation])


def split_seed(split: str) -> int:
    """A stable integer per split name (crc32), so splits draw from disjoint seed streams."""
    return zlib.crc32(split.encode())


def sample_scene(index: int, split: str, resolution: int = 64) -> Scene:
    """The scene of example `index` of `split`, the same on every call and machine."""
    return random_scene(np.random.default_rng([DATASET_SEED, split_seed(split), index]), resolution)


def sample(index: int, split: str, resolution: int = 64) -> tuple[np.ndarray, str]:
    """Example `index` of `split`: (uint8 [H, W, 3], caption)."""
    scene = sample_scene(index, split, resolution)
    return render(scene, resolution), caption(scene)
