"""Training data: deterministic resumable batches, multi-host slices, caption folders, TFDS, prefetching."""

import json
import logging
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from jaxdiff.data import shapes
from jaxdiff.train import caption_folder, data


def _source(n=10, size=2):
    """n tiny examples whose pixels and caption encode the index."""
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, size, size, 3), np.uint8)
    images[:, :, 0] = 255  # a left column, so flips are visible
    return data.ArraySource(images, [f"example {i}" for i in range(n)])


def _ids(batch):
    return [int(c.split()[1]) for c in batch["captions"]]


# --- batches ------------------------------------------------------------------------------------------------

def test_batch_at_is_deterministic_and_scaled():
    source = _source()
    a, b = data.batch_at(source, 3, 4, seed=1), data.batch_at(source, 3, 4, seed=1)
    assert a["captions"] == b["captions"] and np.array_equal(a["images"], b["images"])
    assert a["images"].dtype == np.float32 and a["images"].shape == (4, 2, 2, 3)
    assert a["images"].min() >= -1 and a["images"].max() == 1
    assert _ids(data.batch_at(source, 3, 4, seed=2)) != _ids(a)


def test_every_example_once_per_epoch_across_boundaries():
    n, gb = 10, 4  # n not divisible by the batch: steps 2, 4, 7 straddle epochs
    stream = sum((_ids(data.batch_at(_source(n), s, gb, seed=0)) for s in range(10)), [])
    epochs = [stream[e * n:(e + 1) * n] for e in range(4)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1]
    assert epochs == [list(np.random.default_rng([0, e]).permutation(n)) for e in range(4)]


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_together_read_the_global_batch(hosts):
    source = _source(13)
    for step in (0, 3):
        whole = data.batch_at(source, step, 8, seed=5, flip=True)
        parts = [data.batch_at(source, step, 8, seed=5, process_index=p, process_count=hosts, flip=True)
                 for p in range(hosts)]
        assert sum((p["captions"] for p in parts), []) == whole["captions"]
        assert np.array_equal(np.concatenate([p["images"] for p in parts]), whole["images"])
        assert len({tuple(p["captions"]) for p in parts}) == hosts
    with pytest.raises(ValueError, match="divisible"):
        data.batch_at(source, 0, 8, seed=5, process_count=3)


def test_flips_off_by_default_on_when_asked_and_deterministic():
    source = _source(16)
    plain = data.batch_at(source, 0, 16, seed=0)
    assert (plain["images"][:, :, 0] == 1).all()  # the white column stays on the left
    flipped = data.batch_at(source, 0, 16, seed=0, flip=True)
    left = (flipped["images"][:, :, 0] == 1).all(axis=(1, 2))
    right = (flipped["images"][:, :, -1] == 1).all(axis=(1, 2))
    assert left.any() and right.any() and (left ^ right).all()
    assert np.array_equal(np.where(right[:, None, None, None], flipped["images"][:, :, ::-1], flipped["images"]),
                          plain["images"])
    assert np.array_equal(data.batch_at(source, 0, 16, seed=0, flip=True)["images"], flipped["images"])


def test_resume_and_prefetcher_match_an_uninterrupted_run():
    source = _source(7)
    fn = lambda step: data.batch_at(source, step, 3, seed=9)  # noqa: E731
    with data.Prefetcher(fn, 0) as from_start, data.Prefetcher(fn, 5, depth=3) as resumed:
        first = [next(from_start) for _ in range(10)][5:]
        again = [next(resumed) for _ in range(5)]
    fresh = [(s, fn(s)) for s in range(5, 10)]
    for (s1, b1), (s2, b2), (s3, b3) in zip(first, again, fresh):
        assert s1 == s2 == s3 and b1["captions"] == b2["captions"] == b3["captions"]
        assert np.array_equal(b1["images"], b2["images"]) and np.array_equal(b1["images"], b3["images"])


def test_prefetcher_propagates_errors_and_closes_promptly():
    def fn(step):
        if step == 3:
            raise RuntimeError("bad step 3")
        return step

    prefetcher = data.Prefetcher(fn, 1)
    assert [next(prefetcher), next(prefetcher)] == [(1, 1), (2, 2)]
    with pytest.raises(RuntimeError, match="bad step 3"):
        next(prefetcher)

    release = threading.Event()
    slow = data.Prefetcher(lambda step: release.wait(10), 0, depth=4)
    start = time.monotonic()
    slow.close()
    assert time.monotonic() - start < 1
    release.set()
    with pytest.raises(StopIteration):
        next(slow)


# --- caption folders ----------------------------------------------------------------------------------------

def _png(path, size=(8, 8), colour=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_reads_metadata_and_txt_captions(tmp_path):
    _png(tmp_path / "sub" / "a.png", colour=(255, 0, 0))
    _png(tmp_path / "b.jpg", size=(16, 8))
    (tmp_path / "b.txt").write_text("a caption from txt\n")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/a.png", "text": "a red square"}))
    source = caption_folder.CaptionFolderSource(str(tmp_path), resolution=4)
    assert len(source) == 2 and source.skipped == []
    (b, cb), (a, ca) = source[0], source[1]  # sorted by path: b.jpg < sub/a.png
    assert (cb, ca) == ("a caption from txt", "a red square")
    assert a.shape == b.shape == (4, 4, 3) and a.dtype == np.uint8
    assert (a == [255, 0, 0]).all()


def test_folder_resizes_short_side_and_centre_crops(tmp_path):
    bands = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]  # four 20-wide columns of an 80x40 image
    pixels = np.repeat(np.array(bands, np.uint8)[None, :, None], 20, axis=2).reshape(1, 80, 3).repeat(40, 0)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("bands")
    image, _ = caption_folder.CaptionFolderSource(str(tmp_path), resolution=20)[0]
    assert image.shape == (20, 20, 3)  # resized to 40x20, then columns 10..30 kept: green then blue
    np.testing.assert_allclose(image[:, 3:7], np.broadcast_to(bands[1], (20, 4, 3)), atol=1)
    np.testing.assert_allclose(image[:, 13:17], np.broadcast_to(bands[2], (20, 4, 3)), atol=1)


def _bad_folder(root):
    """One good example and three bad ones: listed but missing, corrupt, without caption."""
    _png(root / "good.png")
    (root / "corrupt.png").write_bytes(b"this is not a png at all")
    _png(root / "nocaption.png")
    lines = [{"file_name": "good.png", "text": "ok"}, {"file_name": "missing.png", "text": "gone"},
             {"file_name": "corrupt.png", "text": "broken"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_folder_skips_bad_examples_by_name(tmp_path, caplog):
    _bad_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="jaxdiff.train.data"):
        source = caption_folder.CaptionFolderSource(str(tmp_path), resolution=4, on_bad_image="skip")
    assert [rel for rel, _ in source.examples] == ["good.png"]
    skipped = {path.rsplit("/", 1)[-1]: reason for path, reason in source.skipped}
    assert set(skipped) == {"missing.png", "corrupt.png", "nocaption.png"}
    assert "missing" in skipped["missing.png"] and "caption" in skipped["nocaption.png"]
    assert "image" in skipped["corrupt.png"]
    for name in skipped:
        assert any(name in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("bad", ["missing.png", "corrupt.png", "nocaption.png"])
def test_folder_errors_name_the_file(tmp_path, bad):
    _png(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("ok")
    if bad == "missing.png":
        (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": bad, "text": "gone"}))
    elif bad == "corrupt.png":
        (tmp_path / bad).write_bytes(b"\x89PNG garbage")
        (tmp_path / "corrupt.txt").write_text("broken")
    else:
        _png(tmp_path / bad)
    with pytest.raises(ValueError, match=bad):
        caption_folder.CaptionFolderSource(str(tmp_path), resolution=4, on_bad_image="error")


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        caption_folder.CaptionFolderSource(str(tmp_path), resolution=4)


def test_make_source(tmp_path):
    import ml_collections

    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("x")
    config = ml_collections.ConfigDict({"source": "folder", "folder": str(tmp_path), "resolution": 4,
                                        "on_bad_image": "error"})
    assert len(data.make_source(config)) == 1
    config.source = "hdf5"
    with pytest.raises(ValueError, match="hdf5"):
        data.make_source(config)


# --- TFDS ---------------------------------------------------------------------------------------------------

def test_tfds_source_reads_the_generated_split(tmp_path):
    from jaxdiff.data import tfds_shapes

    config = tfds_shapes.ShapesConfig(name="tiny_train", num_train=32, num_validation=4)
    source = data.tfds_source("shapes", "train", str(tmp_path), config)
    read = sorted((source[i][1], source[i][0].tobytes()) for i in range(len(source)))
    expected = sorted((c, im.tobytes()) for im, c in (shapes.sample(i, "train") for i in range(32)))
    assert len(source) == 32 and read == expected


def test_generated_source_equals_the_tfds_build(tfds_dir):
    """data.source="shapes" gives the examples of the TFDS build of the same name (in index order; TFDS
    stores them shuffled by a hash of the key)."""
    import ml_collections

    config = ml_collections.ConfigDict({"source": "shapes", "config": "tiny", "split": "validation",
                                        "resolution": 64})
    generated = data.make_source(config)
    built = data.make_source(ml_collections.ConfigDict(
        dict(config.to_dict(), source="tfds", name="shapes", data_dir=tfds_dir)))
    assert len(generated) == len(built) == shapes.BUILDS["tiny"][2]
    assert generated.captions == [shapes.sample(i, "validation")[1] for i in range(len(generated))]
    assert sorted(zip(generated.captions, map(bytes, generated.arrays))) == sorted(
        zip(built.captions, map(bytes, built.arrays)))
    config.resolution = 32
    with pytest.raises(ValueError, match="data.resolution is 32"):
        data.make_source(config)


@pytest.mark.parametrize("build, split, named", [("res32", "train", "res32"), ("tiny", "test", "test")])
def test_generated_source_names_an_unknown_build_or_split(build, split, named):
    with pytest.raises(ValueError, match=named):
        data.generated_source(build, split)


def test_import_does_not_pull_tensorflow():
    code = "import sys, jaxdiff.train.data; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tokenize_is_thread_safe():
    """The prefetcher tokenizes in several threads; the ids must always come out padded."""
    from concurrent.futures import ThreadPoolExecutor

    from jaxdiff import text
    from tests.tiny_pipelines import make_tokenizer

    tok = make_tokenizer()
    prompts = [["a red circle"] * 8, ["a blue square to the left of a green triangle"] * 8]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: text.tokenize(tok, prompts[i % 2]), range(400)))
    assert all(r.shape == (8, 77) for r in results)


def test_caption_ids_match_tokenize_and_tokenize_each_caption_once():
    """The training pipeline's cached ids equal `tokenize`'s, from several threads, with the tokenizer
    called only for captions it has not seen (and every time once the cache is full)."""
    from concurrent.futures import ThreadPoolExecutor

    from jaxdiff import text
    from tests.tiny_pipelines import make_tokenizer

    tok = make_tokenizer()
    captions = ["a red circle", "a blue square to the left of a green triangle", "a green square"]
    batches = [[captions[(i + j) % 3] for j in range(5)] for i in range(40)]
    calls = []

    class Counting:
        model_max_length = tok.model_max_length

        def __call__(self, prompts, **kw):
            calls.append(list(prompts))
            return tok(prompts, **kw)

    cached = text.CaptionIds(Counting())
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(cached, batches))
    for batch, ids in zip(batches, results):
        np.testing.assert_array_equal(ids, text.tokenize(tok, batch))
    # `tokenize` calls the tokenizer twice (padded, then unpadded for its truncation warning) per miss;
    # two threads may miss the same caption at once, so at most 4 threads' worth of calls.
    assert {c for call in calls for c in call} == set(captions)
    assert len(calls) <= 2 * 4 * len(captions)
    full = text.CaptionIds(tok, max_entries=2)
    np.testing.assert_array_equal(full(captions), text.tokenize(tok, captions))
    assert full._ids == {}  # three new captions do not fit in two entries: none kept
