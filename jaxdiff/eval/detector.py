"""jaxdiff's own detector for shapes images (/work/shared/specs/shapes-dataset.md).

    detect(image)              -> [Detection(colour, shape, centroid, bbox, area), ...]
    is_correct(image, caption) -> bool
    failure(detect(image), caption) -> None, or why it fails: "extra object", "relation reversed", ...
    score(images, captions)    -> {"overall": 0.93, "single": 0.98, "above": 0.9, ..., "n": 200,
                                   "failures": {"relation reversed": 9, ...},
                                   "by_background": {"gray": {"green": (5, 22), ...}, ...}}

It reads ground-truth images exactly and tolerates what a generator gets slightly wrong (noise, blur, colours
a little off): the background is the median border colour; each pixel is unmixed as a blend of the background
and each spec colour (see `colour_labels`); objects are 8-connected components of one colour with at least
`min_area` pixels (smaller ones are specks); the shape comes from the bounding box's fill ratio and how row
widths change from top to bottom (square: fill 1; circle: pi/4; apex-up triangle: about 1/2, widening
downwards); anything else is "unknown", which matches no caption.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage  # a dependency of jax, so always present

from jaxdiff.data import shapes

_OBJECT_NAMES = tuple(shapes.COLOURS)
_OBJECT_RGB = np.array([shapes.COLOURS[c] for c in _OBJECT_NAMES], np.float32)

TOLERANCE = 70.0  # max RGB distance (0..255) of a pixel from its blend of background and spec colour
MAX_ASPECT = 1.35  # all spec shapes have square bounding boxes; beyond this a blob is not a spec shape
# (fill ratio, taper) of the spec shapes; taper = (mean row width of top half - of bottom half) / width.
# A raster triangle of 11..21 pixels fills 0.55..0.59 of its box (blurred: to 0.72), more than the ideal 1/2.
_PROTOTYPES = {"square": (1.0, 0.0), "circle": (np.pi / 4, 0.0), "triangle": (0.58, -0.5)}
_MAX_PROTOTYPE_DISTANCE = 0.25  # beyond it (a diamond, an upside-down triangle) the shape is "unknown"


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object; centroid (x, y) and bbox (x0, y0, x1, y1, right/bottom exclusive) in pixels."""

    colour: str
    shape: str  # one of shapes.SHAPES, or "unknown"
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]
    area: int


def to_rgb255(image) -> np.ndarray:
    """float32 [H, W, 3] in 0..255 from uint8 or from floats in [0, 1]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32)
    return np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0


def background_colour(rgb: np.ndarray) -> np.ndarray:
    """The median border colour: objects cover well under half of the border."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    return np.median(border, axis=0)


def background_name(image) -> str:
    """The spec background ("black", "gray", "white") nearest to an image's background colour."""
    background = background_colour(to_rgb255(image))
    return min(shapes.BACKGROUNDS, key=lambda name: np.sum((background - shapes.BACKGROUNDS[name]) ** 2))


def colour_labels(rgb: np.ndarray, tolerance: float = TOLERANCE) -> np.ndarray:
    """int [H, W]: index into the spec's object colours of each pixel's colour, -1 for background or none.

    A pixel is unmixed as background + t * (colour - background) for each colour (blurred edges are such
    mixtures, and would otherwise pass for a third colour, e.g. yellow fading into black reads as orange); it
    takes the colour that explains it best if that colour covers at least half of it (t >= 1/2: the object's
    edge is where a blur puts it) and the rest is within `tolerance`.
    """
    background = background_colour(rgb)
    direction = _OBJECT_RGB - background  # [K, 3]
    offset = (rgb - background)[:, :, None, :]  # [H, W, 1, 3]
    t = np.clip((offset * direction).sum(-1) / (direction * direction).sum(-1).clip(1e-6), 0.0, 1.0)
    residual = np.linalg.norm(offset - t[..., None] * direction, axis=-1)  # [H, W, K]
    best = np.argmin(residual, axis=-1)
    t_best = np.take_along_axis(t, best[..., None], -1)[..., 0]
    ok = (t_best >= 0.5) & (np.min(residual, axis=-1) <= tolerance)
    return np.where(ok, best, -1)


def classify_shape(mask: np.ndarray) -> str:
    """The spec shape nearest to a boolean object mask, or "unknown"."""
    # Rows and columns with a single pixel are left out of the box: a one-pixel spur of noise would stretch
    # it, and a spec shape loses at most its apex pixel.
    rows, cols = np.nonzero(mask.sum(axis=1) >= 2)[0], np.nonzero(mask.sum(axis=0) >= 2)[0]
    if len(rows) < 2 or len(cols) < 2:
        return "unknown"
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = box.shape
    if max(h, w) > MAX_ASPECT * min(h, w):
        return "unknown"
    fill = box.sum() / (h * w)
    widths = box.sum(axis=1)
    taper = (widths[: h // 2].mean() - widths[(h + 1) // 2 :].mean()) / w
    distance = {k: np.hypot(fill - f, taper - t) for k, (f, t) in _PROTOTYPES.items()}
    best = min(distance, key=distance.get)
    return best if distance[best] <= _MAX_PROTOTYPE_DISTANCE else "unknown"


def default_min_area(resolution: int) -> int:
    """A quarter of the smallest spec object's bounding box: noise specks stay far below it."""
    return max(4, shapes.size_range(resolution)[0] ** 2 // 4)


def detect(image, tolerance: float = TOLERANCE, min_area: int | None = None) -> list[Detection]:
    """The objects in a shapes image (uint8, or float in [0, 1]), ordered by their boxes' top, then left."""
    rgb = to_rgb255(image)
    min_area = default_min_area(min(rgb.shape[:2])) if min_area is None else min_area
    labels = colour_labels(rgb, tolerance)
    detections = []
    for index, name in enumerate(_OBJECT_NAMES):
        components, _ = ndimage.label(labels == index, structure=np.ones((3, 3)))
        for label, (ys, xs) in enumerate(ndimage.find_objects(components), start=1):
            mask = ndimage.binary_fill_holes(components[ys, xs] == label)  # noise pixels of another colour
            area = int(mask.sum())
            if area < min_area:
                continue
            rows, cols = np.nonzero(mask)
            centroid = (float(cols.mean() + xs.start + 0.5), float(rows.mean() + ys.start + 0.5))
            bbox = (xs.start, ys.start, xs.stop, ys.stop)
            detections.append(Detection(name, classify_shape(mask), centroid, bbox, area))
    return sorted(detections, key=lambda d: (d.bbox[1], d.bbox[0]))


def is_correct(image, caption: str) -> bool:
    """The spec's correctness of an image for a caption (see `matches`)."""
    return matches(detect(image), caption)


# Why an image fails its caption, checked in this order: the first that applies is the reason.
FAILURES = ("missing object", "extra object", "wrong object", "relation on the wrong axis",
            "relation reversed")


def failure(detections: list[Detection], caption: str) -> str | None:
    """Why the detections do not fit the caption (one of `FAILURES`), or None when they do: just the
    named objects (colour and shape) are there and, for two, their centroids' relation holds.

    A failed relation is "reversed" when the objects are the other way round by at least half the
    smaller one's size (the generator keeps a whole object size), else "on the wrong axis": they are
    not apart along the relation's axis (side by side for above/below, stacked for left/right).
    Raises ValueError if the caption is outside the grammar.
    """
    labels, relation = shapes.parse_caption(caption)
    if len(detections) != len(labels):
        return "missing object" if len(detections) < len(labels) else "extra object"
    matched = []
    for colour, shape in labels:
        hits = [d for d in detections if (d.colour, d.shape) == (colour, shape)]
        if len(hits) != 1:
            return "wrong object"
        matched.append(hits[0])
    if relation is None:
        return None
    a, b = matched[0].centroid, matched[1].centroid
    if shapes.relation_holds(a, b, relation):
        return None
    smaller = min(max(d.bbox[2] - d.bbox[0], d.bbox[3] - d.bbox[1]) for d in matched)
    reversed_by = -shapes.relation_gap(a, b, relation)
    return "relation reversed" if reversed_by >= smaller / 2 else "relation on the wrong axis"


def matches(detections: list[Detection], caption: str) -> bool:
    """The spec's correctness: `failure` finds nothing wrong."""
    return failure(detections, caption) is None


def caption_kind(caption: str) -> str:
    """"single" or the caption's relation."""
    return shapes.parse_caption(caption)[1] or "single"


def score(images, captions) -> dict:
    """Fraction correct: "overall", per kind present ("single" and each relation), "n" images,
    "failures": how many images failed for each reason of `FAILURES` that occurred, and
    "by_background": {background: {colour: (correct, images)}} over the images whose caption names that
    colour, by the background drawn. A caption says nothing of the background, yet a model can be
    much worse on one: the bundled one draws a green object on gray as a blob, and on black right."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    reasons = [failure(detect(im), c) for im, c in zip(images, captions)]
    correct = np.array([r is None for r in reasons], bool)
    kinds = np.array([caption_kind(c) for c in captions])
    result = {"overall": float(correct.mean()) if len(correct) else float("nan")}
    for kind in ("single",) + shapes.RELATIONS:
        if (kinds == kind).any():
            result[kind] = float(correct[kinds == kind].mean())
    result["n"] = len(correct)
    result["failures"] = {r: reasons.count(r) for r in FAILURES if r in reasons}
    cells: dict[str, dict[str, list[int]]] = {}
    for image, caption, ok in zip(images, captions, correct):
        row = cells.setdefault(background_name(image), {})
        for colour, _ in shapes.parse_caption(caption)[0]:
            row.setdefault(colour, [0, 0])
            row[colour][0] += int(ok)
            row[colour][1] += 1
    result["by_background"] = {bg: {c: tuple(row[c]) for c in shapes.COLOURS if c in row}
                               for bg in shapes.BACKGROUNDS if (row := cells.get(bg))}
    return result
