"""The shapes data set follows its spec (/work/shared/specs/shapes-dataset.md) and the detector reads it."""

import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from jaxdiff.data import shapes
from jaxdiff.eval import detector, prompt_adherence

R = 64
N = 2000  # ground-truth examples for the geometry and detector checks


@pytest.fixture(scope="module")
def validation():
    """(scenes, images, captions) of the first N validation examples."""
    scenes = [shapes.sample_scene(i, "validation") for i in range(N)]
    return scenes, [shapes.render(s) for s in scenes], [shapes.caption(s) for s in scenes]


@pytest.fixture(scope="module")
def detections(validation):
    """The detector's output on each ground-truth image (computed once: detection is the slow part)."""
    return [detector.detect(image) for image in validation[1]]


def pixel_objects(image):
    """(colour, mask) of each spec colour present in a ground-truth image."""
    return [(name, np.all(image == rgb, axis=-1)) for name, rgb in shapes.COLOURS.items()
            if np.all(image == rgb, axis=-1).any()]


def mask_box(mask):
    """(x0, y0, x1, y1) of a boolean mask, right/bottom exclusive."""
    rows, cols = np.nonzero(mask)
    return cols.min(), rows.min(), cols.max() + 1, rows.max() + 1


def boxes_apart(a, b, gap=shapes.GAP):
    """Whether two pixel boxes are at least `gap` pixels apart along x or y."""
    return b[0] - a[2] >= gap or a[0] - b[2] >= gap or b[1] - a[3] >= gap or a[1] - b[3] >= gap


def mask_centroid(mask):
    """(x, y) centre of mass of a mask, in the generator's continuous coordinates."""
    rows, cols = np.nonzero(mask)
    return cols.mean() + 0.5, rows.mean() + 0.5


# --- generator ---------------------------------------------------------------------------------------------

def test_sample_is_deterministic_and_splits_differ():
    for i in range(20):
        a, b = shapes.sample(i, "train"), shapes.sample(i, "train")
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1] == b[1]
    train = [shapes.sample(i, "train")[0] for i in range(20)]
    val = [shapes.sample(i, "validation")[0] for i in range(20)]
    assert not any(np.array_equal(t, v) for t, v in zip(train, val))


def test_shape_masks_are_exact():
    for size in range(*shapes.size_range(R)):
        for shape in shapes.SHAPES:
            obj = shapes.ShapeObject("red", shape, 20 + size / 2, 30 + size / 2, size)
            mask = shapes.shape_mask(obj, R)
            assert mask_box(mask) == (20, 30, 20 + size, 30 + size), (shape, size)
            box = mask[30 : 30 + size, 20 : 20 + size]
            widths = box.sum(axis=1)
            np.testing.assert_array_equal(box, box[:, ::-1])  # symmetric about the vertical axis
            if shape == "square":
                assert box.all()
            elif shape == "circle":
                assert abs(box.sum() - np.pi * size**2 / 4) < size  # a disc of diameter `size`
                np.testing.assert_array_equal(box, box.T)
                np.testing.assert_array_equal(box, box[::-1])
            else:  # apex up, base horizontal and full width
                assert np.all(np.diff(widths) >= 0) and widths[0] <= 2 and widths[-1] == size


def test_captions_follow_grammar_and_mix(validation):
    scenes, _, captions = validation
    kinds = []
    for scene, text in zip(scenes, captions):
        labels, relation = shapes.parse_caption(text)
        assert labels == [(o.colour, o.shape) for o in scene.objects] and relation == scene.relation
        assert shapes.format_caption(labels, relation) == text
        kinds.append(relation or "single")
        assert scene.background in shapes.BACKGROUNDS
    kinds = np.array(kinds)
    assert abs(np.mean(kinds == "single") - shapes.P_SINGLE) < 0.04
    for relation in shapes.RELATIONS:
        assert abs(np.mean(kinds == relation) - (1 - shapes.P_SINGLE) / 4) < 0.035
    rng = np.random.default_rng(0)
    for _ in range(200):
        shapes.parse_caption(shapes.random_caption(rng))


def test_scenes_follow_the_spec(validation):
    lo, hi = shapes.size_range(R)
    assert lo / R >= 1 / 6 and hi / R <= 1 / 3 and (lo - 1) / R < 1 / 6 and (hi + 1) / R > 1 / 3
    for scene in validation[0]:
        assert len({o.colour for o in scene.objects}) == len(scene.objects) in (1, 2)
        for o in scene.objects:
            assert lo <= o.size <= hi and all(0 <= v <= R for v in o.bbox)
        if scene.relation:
            a, b = scene.objects
            assert shapes.boxes_apart(a, b)
            assert shapes.relation_gap(a.centroid, b.centroid, scene.relation) >= max(a.size, b.size)


def test_pixels_follow_the_spec(validation):
    lo, hi = shapes.size_range(R)
    for scene, image in zip(*validation[:2]):
        found = pixel_objects(image)
        background = np.all(image == shapes.BACKGROUNDS[scene.background], axis=-1)
        assert background.sum() + sum(m.sum() for _, m in found) == R * R  # flat fills, nothing else
        assert sorted(c for c, _ in found) == sorted(o.colour for o in scene.objects)
        masks = {c: m for c, m in found}
        for o in scene.objects:
            x0, y0, x1, y1 = mask_box(masks[o.colour])
            assert x1 - x0 == y1 - y0 == o.size and lo <= o.size <= hi  # inside the image by construction
            assert ndimage.label(masks[o.colour])[1] == 1
        if scene.relation:
            a, b = (masks[o.colour] for o in scene.objects)
            assert boxes_apart(mask_box(a), mask_box(b))
            margin = max(o.size for o in scene.objects) - 1  # raster centroids sit within half a pixel
            assert shapes.relation_gap(mask_centroid(a), mask_centroid(b), scene.relation) >= margin


# --- captions ---------------------------------------------------------------------------------------------

def test_parse_caption():
    assert shapes.parse_caption("a red circle") == ([("red", "circle")], None)
    assert shapes.parse_caption("  A Blue  square to the LEFT of a green triangle ") == (
        [("blue", "square"), ("green", "triangle")], "to the left of")
    for bad in ["", "red circle", "a red circle.", "a pink circle", "a red star", "an orange circle",
                "a red circle next to a blue square", "a red circle above a red square", "a red circle above",
                "a red circle above a blue square below a green circle", "the red circle", "a red  circles"]:
        with pytest.raises(ValueError):
            shapes.parse_caption(bad)


# --- detector ---------------------------------------------------------------------------------------------

def test_detector_is_exact_on_ground_truth(validation, detections):
    scenes, images, captions = validation
    for scene, found in zip(scenes, detections):
        truth = sorted((o.colour, o.shape) for o in scene.objects)
        assert sorted((d.colour, d.shape) for d in found) == truth
        for d in found:
            o = next(o for o in scene.objects if o.colour == d.colour)
            assert np.allclose(d.centroid, o.centroid, atol=0.5) and d.bbox == tuple(int(v) for v in o.bbox)
    assert all(detector.matches(found, text) for found, text in zip(detections, captions))
    result = detector.score(images[:200], captions[:200])  # score() detects again: a subset shows its output
    by_background = result.pop("by_background")
    assert result == {"overall": 1.0, "single": 1.0, **{r: 1.0 for r in shapes.RELATIONS}, "n": 200,
                      "failures": {}}
    expected = {}
    for scene in scenes[:200]:
        for o in scene.objects:
            expected.setdefault(scene.background, {}).setdefault(o.colour, 0)
            expected[scene.background][o.colour] += 1
    assert {bg: {c: n for c, (_, n) in row.items()} for bg, row in by_background.items()} == expected
    assert all(ok == n for row in by_background.values() for ok, n in row.values())


def test_score_counts_failures_by_background_and_colour(validation):
    """A wrong caption counts against its background's row, in the columns of the colours it names."""
    scenes, images, captions = validation
    rng = np.random.default_rng(1)
    texts = [wrong_captions(scene, rng)[0][0] if i % 2 else text
             for i, (scene, text) in enumerate(zip(scenes[:60], captions[:60]))]
    by_background = detector.score(images[:60], texts)["by_background"]
    for bg, row in by_background.items():
        for colour, (ok, n) in row.items():
            named = [i for i, (s, t) in enumerate(zip(scenes[:60], texts)) if s.background == bg
                     and colour in [c for c, _ in shapes.parse_caption(t)[0]]]
            assert (ok, n) == (sum(i % 2 == 0 for i in named), len(named)), (bg, colour)
    assert detector.background_name(np.full((8, 8, 3), 120, np.uint8)) == "gray"


def wrong_captions(scene, rng):
    """(caption, reason) pairs false for the scene: a colour, a shape or the relation changed, an
    object missing or extra; the reason is what `detector.failure` should say."""
    labels = [(o.colour, o.shape) for o in scene.objects]
    used = {c for c, _ in labels}
    i = rng.integers(len(labels))
    colour = rng.choice([c for c in shapes.COLOURS if c not in used])
    shape = rng.choice([s for s in shapes.SHAPES if s != labels[i][1]])
    other = (str(rng.choice([c for c in shapes.COLOURS if c not in used])), "circle")
    changed = [
        [(str(colour), s) if j == i else (c, s) for j, (c, s) in enumerate(labels)],
        [(c, str(shape)) if j == i else (c, s) for j, (c, s) in enumerate(labels)],
    ]
    out = [(shapes.format_caption(x, scene.relation), "wrong object") for x in changed]
    if scene.relation:
        out += [(shapes.format_caption(labels, shapes.OPPOSITE_RELATION[scene.relation]), "relation reversed"),
                (shapes.format_caption(labels[::-1], scene.relation), "relation reversed"),  # objects swapped
                (shapes.format_caption(labels[:1], None), "extra object"),
                (shapes.format_caption(labels[1:], None), "extra object")]
    else:
        out += [(shapes.format_caption(labels + [other], "above"), "missing object")]
    return out


def test_detector_rejects_wrong_captions_and_says_why(validation, detections):
    rng = np.random.default_rng(0)
    for scene, found in zip(validation[0], detections):
        assert detector.matches(found, shapes.caption(scene))
        assert detector.failure(found, shapes.caption(scene)) is None
        for text, reason in wrong_captions(scene, rng):
            assert not detector.matches(found, text), (shapes.caption(scene), text)
            assert detector.failure(found, text) == reason, (shapes.caption(scene), text)


def test_relation_on_the_wrong_axis_is_told_from_a_reversed_one():
    # Side by side on one row: "above" has no vertical gap to hold; "to the right of" is reversed.
    scene = shapes.Scene("white", (shapes.ShapeObject("red", "square", 16, 32, 14),
                                   shapes.ShapeObject("blue", "circle", 48, 32, 14)), "to the left of")
    found = detector.detect(shapes.render(scene, R))
    assert detector.failure(found, "a red square to the left of a blue circle") is None
    assert detector.failure(found, "a red square above a blue circle") == "relation on the wrong axis"
    assert detector.failure(found, "a blue circle below a red square") == "relation on the wrong axis"
    assert detector.failure(found, "a red square to the right of a blue circle") == "relation reversed"
    images = np.stack([shapes.render(scene, R)] * 3)
    captions = ["a red square to the left of a blue circle", "a red square above a blue circle",
                "a red square to the right of a blue circle"]
    result = detector.score(images, captions)
    assert result["failures"] == {"relation on the wrong axis": 1, "relation reversed": 1}
    assert "relation reversed 1" in prompt_adherence.format_scores(result)


@pytest.mark.parametrize("corrupt", ["noise", "blur", "blur+noise"])
def test_detector_tolerates_noise_and_blur(validation, corrupt):
    rng = np.random.default_rng(1)
    images = np.stack(validation[1][:300]).astype(np.float32) / 255
    if "blur" in corrupt:
        images = ndimage.gaussian_filter(images, sigma=(0, 0.7, 0.7, 0))
    if "noise" in corrupt:
        images = np.clip(images + rng.normal(0, 0.05, images.shape), 0, 1)
    assert detector.score(images, validation[2][:300])["overall"] >= 0.99


def test_detector_rejects_what_is_not_a_spec_shape():
    def image_with(*masks):
        img = np.zeros((R, R, 3), np.uint8)
        for colour, mask in masks:
            img[mask] = shapes.COLOURS[colour]
        return img

    triangle = shapes.shape_mask(shapes.ShapeObject("red", "triangle", 20.5, 20.5, 17), R)
    circle = shapes.shape_mask(shapes.ShapeObject("blue", "circle", 48, 48, 16), R)
    upside_down = image_with(("red", triangle[::-1]))
    assert [d.shape for d in detector.detect(upside_down)] == ["unknown"]
    rectangle = np.zeros((R, R), bool)
    rectangle[10:20, 10:40] = True
    assert [d.shape for d in detector.detect(image_with(("red", rectangle)))] == ["unknown"]
    two = image_with(("red", triangle), ("blue", circle))
    assert detector.is_correct(two, "a red triangle above a blue circle")
    assert not detector.is_correct(two, "a red triangle")  # an extra object
    speck = two.copy()
    speck[2:4, 60:62] = shapes.COLOURS["green"]  # a 4-pixel speck is not an object
    assert detector.is_correct(speck, "a red triangle to the left of a blue circle")
    assert detector.is_correct(two.astype(np.float32) / 255, "a blue circle below a red triangle")


# --- packaging ----------------------------------------------------------------------------------------------

def test_generator_and_detector_do_not_import_tensorflow():
    code = ("import sys, jaxdiff.data.shapes, jaxdiff.eval.detector; "
            "bad = [m for m in ('tensorflow', 'torch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tfds_builder_matches_the_generator(tmp_path):
    import tensorflow_datasets as tfds

    from jaxdiff.data import tfds_shapes

    config = tfds_shapes.ShapesConfig(name="custom_small", num_train=64, num_validation=16)
    builder = tfds_shapes.Shapes(data_dir=str(tmp_path), config=config)
    builder.download_and_prepare()
    assert builder.info.splits["train"].num_examples == 64
    for split, n in [("train", 64), ("validation", 16)]:
        # TFDS stores examples in an order of its own: compare as multisets of (caption, pixels).
        read = sorted((ex["caption"].decode(), ex["image"].tobytes())
                      for ex in tfds.as_numpy(builder.as_dataset(split=split)))
        expected = sorted((c, im.tobytes()) for im, c in (shapes.sample(i, split) for i in range(n)))
        assert read == expected


def test_reverse_relation():
    assert (shapes.reverse_relation("a red circle to the left of a blue square")
            == "a red circle to the right of a blue square")
    assert shapes.reverse_relation("a red circle below a blue square") == "a red circle above a blue square"
    assert shapes.reverse_relation("a red circle") is None
