"""Training on bad input (project issue 30): one clear line naming what is wrong, never a traceback,
never silently wrong results, never lost data.

- config fields a run cannot use are named before anything runs;
- a run whose loss or state turns non-finite stops naming the step, its last finite checkpoint kept;
- run files are written whole (a kill at start-up never leaves a 0-byte pipeline.json), and damaged
  ones of older versions are rewritten while no checkpoint needs them;
- a checkpoint that does not restore is named and the one before it used (train and export);
- metrics.csv keeps one row per step across resumes;
- caption folders: paths leaving the folder, non-UTF-8 captions, images that fail to decode or are
  too large to resize are refused by name (skipped with a warning, or an error);
- kill -9 at seeded random moments, then a re-run: the same params, bit for bit, as a run never killed.
"""

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import main
from configs import shapes_unet
from jaxdiff.train import caption_folder, checkpoint as checkpoint_lib, data, loop, run_dir, step as step_lib
from tests.test_parallel import ROOT as REPO

TINY = ["--config", "configs/shapes_unet.py:tiny", "--config.data.source=shapes", "--config.train.steps=6",
        "--config.checkpoint.every=2"]


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


# --- 1. config fields -----------------------------------------------------------------------------------

CONFIG_CASES = [  # (--config.KEY=VALUE, what the one error line must say)
    ("train.learning_rate=nan", "train.learning_rate must be finite"),
    ("train.learning_rate=inf", "train.learning_rate must be finite"),
    ("train.learning_rate=-1e-4", "train.learning_rate must be > 0"),
    ("train.learning_rate=0", "train.learning_rate must be > 0"),
    ("train.optimizer=adam", "unknown train.optimizer 'adam'; choose one of adamw, sgd"),
    ("train.lr_schedule=linear", "unknown train.lr_schedule 'linear'; choose one of cosine, constant"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("train.steps=-5", "train.steps must be >= 1"),
    ("train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
    ("train.ema_decay=1.5", "train.ema_decay must be <= 1"),
    ("train.ema_decay=-0.1", "train.ema_decay must be >= 0"),
    ("train.ema_decay=nan", "train.ema_decay must be finite"),
    ("train.grad_clip=inf", "train.grad_clip must be finite"),
    ("train.grad_clip=0", "train.grad_clip must be > 0"),
    ("train.weight_decay=nan", "train.weight_decay must be finite"),
    ("train.adam_b1=nan", "train.adam_b1 must be finite"),
    ("train.adam_b2=inf", "train.adam_b2 must be finite"),
    ("train.adam_b2=1.0", "train.adam_b2 must be < 1"),
    ("train.caption_dropout=2", "train.caption_dropout must be <= 1"),
    ("train.timestep_sampling=cosine", "unknown train.timestep_sampling 'cosine'"),
    ("checkpoint.every=0", "checkpoint.every must be >= 1"),
    ("checkpoint.keep=0", "checkpoint.keep must be >= 1"),
    ("log_every=0", "log_every must be >= 1"),
    ("mode=gan", "unknown training mode 'gan'"),
]


@pytest.mark.parametrize("override, message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_field_is_one_line_before_anything_runs(override, message, tmp_path, capsys):
    workdir = tmp_path / "run"
    rc = main.main(["train", "--workdir", str(workdir), *TINY, f"--config.{override}"])
    errors = _error_lines(capsys.readouterr().err)
    assert rc == 2 and len(errors) == 1 and message in errors[0], errors
    assert not workdir.exists()  # nothing was built or written


def test_check_config_accepts_every_shipped_config():
    from configs import shapes_clip, shapes_vae

    for module in (shapes_vae, shapes_unet, shapes_clip):
        for variant in (None,) + tuple(module.VARIANTS):
            step_lib.check_config(module.get_config(variant))


def test_make_optimizer_names_an_unknown_optimizer():
    """(It was AdamW for any name but "sgd".)"""
    config = shapes_unet.get_config("tiny")
    config.train.optimizer = "SGD"
    with pytest.raises(ValueError, match="unknown train.optimizer 'SGD'"):
        step_lib.make_optimizer(config)


def test_until_step_below_one_is_named(tmp_path, capsys):
    assert main.main(["train", "--workdir", str(tmp_path / "run"), *TINY, "--until-step", "0"]) == 2
    assert "--until-step must be >= 1" in _error_lines(capsys.readouterr().err)[0]


# --- 2. non-finite state ----------------------------------------------------------------------------------

def test_state_is_finite_sees_every_part_of_the_state():
    config = shapes_unet.get_config("tiny")
    params = {"unet": {"w": jnp.ones((3, 2))}, "vae": {"w": jnp.ones(2)}, "text_encoders": ({"w": jnp.ones(1)},)}
    state = step_lib.create_state(params, config, step_lib.make_optimizer(config))
    check = jax.jit(step_lib.state_is_finite)
    assert bool(check(state, jnp.float32(1.0)))
    assert not bool(check(state, jnp.float32(np.nan)))
    assert not bool(check(state, jnp.float32(np.inf)))
    for part in ("params", "ema"):
        bad = {**getattr(state, part), "unet": {"w": jnp.ones((3, 2)).at[1, 0].set(np.nan)}}
        assert not bool(check(state.replace(**{part: bad})))
    bad_opt = jax.tree.map(lambda x: x * np.inf if jnp.issubdtype(x.dtype, jnp.floating) and x.size else x,
                           state.opt_state)
    assert not bool(check(state.replace(opt_state=bad_opt)))


# --- 3. run files -------------------------------------------------------------------------------------------

def _run_files(workdir):
    from jaxdiff import components, text
    from configs.shapes_components import SCHEDULER, TINY_TEXT, TINY_UNET, TINY_VAE

    config = shapes_unet.get_config("tiny")
    configs = components.PipelineConfigs("StableDiffusionPipeline", dict(TINY_UNET), dict(TINY_VAE),
                                         (dict(TINY_TEXT),), dict(SCHEDULER))
    tokenizer = text.build_tokenizer(config.model.tokenizer_words, config.model.max_length)
    run_dir.write_run_files(str(workdir), config, configs, [tokenizer])
    return configs


def test_run_files_are_written_whole_and_leftovers_removed(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / ".jaxdiff-tmp-pipeline.json.abc").write_text("{")  # a start killed mid-write
    (workdir / ".jaxdiff-tmp-tokenizer.xyz").mkdir()
    configs = _run_files(workdir)
    assert sorted(os.listdir(workdir)) == ["config.json", "pipeline.json", "tokenizer"]
    _, read, tokenizers = run_dir.read_run(str(workdir))
    as_json = lambda c: json.dumps(dataclasses.asdict(c), sort_keys=True)  # noqa: E731
    assert as_json(read) == as_json(configs) and len(tokenizers) == 1
    _run_files(workdir)  # written again over the old ones (a run with no checkpoint yet)
    assert sorted(os.listdir(workdir)) == ["config.json", "pipeline.json", "tokenizer"]


DAMAGED_RUN_FILES = [  # (file, bytes written over it, what the message says)
    ("pipeline.json", b"", "pipeline.json is empty (a run killed while starting?)"),
    ("pipeline.json", b'{"pipeline_class": "StableDiff', "pipeline.json is corrupt"),
    ("pipeline.json", b"[1, 2]", "pipeline.json is corrupt: a JSON list"),
    ("pipeline.json", b'{"unet": {}}', "pipeline.json is corrupt: not the configs of a pipeline"),
    ("pipeline.json", b"\xff\xfe{}", "pipeline.json is corrupt"),
    ("config.json", b"", "config.json is empty"),
    ("tokenizer", None, "tokenizer cannot be read as a tokenizer"),
]


@pytest.mark.parametrize("name, content, message", DAMAGED_RUN_FILES)
def test_damaged_run_files_are_named_or_rewritten(name, content, message, tmp_path, caplog, capsys):
    workdir = tmp_path / "run"
    _run_files(workdir)
    if content is None:
        shutil.rmtree(workdir / name)
    else:
        (workdir / name).write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        run_dir.read_run(str(workdir))
    # export: one line, exit 2
    assert main.main(["export", str(workdir), str(tmp_path / "out")]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and message in errors[0]
    # train, no checkpoint yet: a warning, and the files are written afresh
    with caplog.at_level(logging.WARNING):
        assert run_dir.existing_run_configs(str(workdir)) is None
    assert any(message in r.getMessage() and "written afresh" in r.getMessage() for r in caplog.records)
    # train, with checkpoints that need them: an error naming the file and the way out
    (workdir / "checkpoints" / "2").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"{re.escape(message)}.*steps 2.*delete the folder"):
        run_dir.existing_run_configs(str(workdir))


# --- 4. corrupt checkpoints ---------------------------------------------------------------------------------

def _truncate_data(step_dir):
    for folder, _, files in os.walk(step_dir):
        if os.path.basename(folder) == "d":
            for name in files:
                with open(os.path.join(folder, name), "r+b") as f:
                    f.truncate(3)


def _empty_metadata(step_dir):
    open(os.path.join(step_dir, "default", "_METADATA"), "w").close()


def _no_item(step_dir):
    shutil.rmtree(os.path.join(step_dir, "default"))


def _garbled_manifest(step_dir):
    with open(os.path.join(step_dir, "default", "manifest.ocdbt"), "wb") as f:
        f.write(b"\0" * 7)


CORRUPTIONS = [_truncate_data, _empty_metadata, _no_item, _garbled_manifest]


def _small_state(value):
    return {"w": jnp.full((64, 32), value, jnp.float32), "b": jnp.arange(300, dtype=jnp.float32) * value}


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_corrupt_newest_checkpoint_falls_back_to_the_one_before(corrupt, tmp_path, caplog):
    directory = str(tmp_path / "checkpoints")
    ckpt = checkpoint_lib.Checkpointer(directory, every=1, keep=3, async_save=False)
    for step in (1, 2, 3):
        ckpt.save(step, _small_state(float(step)))
    ckpt.close()
    corrupt(os.path.join(directory, "3"))

    ckpt = checkpoint_lib.Checkpointer(directory, every=1, keep=3, async_save=False)
    with caplog.at_level(logging.WARNING, logger="jaxdiff.train.checkpoint"):
        state = ckpt.restore_latest(_small_state(0.0))
    np.testing.assert_array_equal(state["w"], _small_state(2.0)["w"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "checkpoint step 3" in warnings[0] and "trying step 2" in warnings[0]
    assert "\n" not in warnings[0] and len(warnings[0]) < 500
    assert sorted(os.listdir(directory)) == ["1", "2", "3"]  # without set_aside nothing moves
    ckpt.close()

    ckpt = checkpoint_lib.Checkpointer(directory, every=1, keep=3, async_save=False)
    state = ckpt.restore_latest(_small_state(0.0), set_aside=True)  # a resuming run: 3 is written again
    np.testing.assert_array_equal(state["b"], _small_state(2.0)["b"])
    assert checkpoint_lib.saved_steps(directory) == [1, 2]
    assert os.listdir(tmp_path / checkpoint_lib.CORRUPT_DIR) == ["3"]  # kept, never deleted
    ckpt.save(3, _small_state(3.0))
    ckpt.close()
    ckpt = checkpoint_lib.Checkpointer(directory, every=1, keep=3, async_save=False)
    np.testing.assert_array_equal(ckpt.restore_latest(_small_state(0.0))["w"], _small_state(3.0)["w"])
    ckpt.close()


def test_no_checkpoint_restores_is_one_clear_error_and_nothing_moves(tmp_path):
    directory = str(tmp_path / "checkpoints")
    ckpt = checkpoint_lib.Checkpointer(directory, every=1, keep=3, async_save=False)
    for step in (1, 2):
        ckpt.save(step, _small_state(float(step)))
    ckpt.close()
    _truncate_data(os.path.join(directory, "1"))
    _empty_metadata(os.path.join(directory, "2"))
    ckpt = checkpoint_lib.Checkpointer(directory, every=1, keep=3, async_save=False)
    with pytest.raises(ValueError, match=r"no checkpoint in .* can be restored: step 2: .*; step 1: ") as e:
        ckpt.restore_latest(_small_state(0.0), set_aside=True)
    ckpt.close()
    assert "\n" not in str(e.value)
    assert checkpoint_lib.saved_steps(directory) == [1, 2]
    assert not (tmp_path / checkpoint_lib.CORRUPT_DIR).exists()


# --- 5. metrics.csv -------------------------------------------------------------------------------------------

def test_metrics_keep_one_row_per_step_across_resumes(tmp_path):
    path = str(tmp_path / "metrics.csv")
    log = run_dir.MetricsLog(path)
    for step in range(1, 8):
        log.write(step, {"loss": step / 10, "grad_norm": 1.0})
    with open(path, "a") as f:
        f.write("8,0.8")  # a kill while row 8 was written
    log = run_dir.MetricsLog(path)
    log.keep_until(4)  # resumed from the checkpoint of step 4
    for step in range(5, 9):
        log.write(step, {"loss": step / 10, "grad_norm": 1.0})
    rows = np.genfromtxt(path, delimiter=",", names=True)
    assert list(rows["step"]) == list(range(1, 9))
    np.testing.assert_allclose(rows["loss"], np.arange(1, 9) / 10)
    run_dir.MetricsLog(path).keep_until(0)  # resumed with no checkpoint: every row is written again
    assert not os.path.exists(path)
    with open(path, "w") as f:
        f.write("step,lo")  # a kill while the header was written
    log = run_dir.MetricsLog(path)
    log.keep_until(0)
    log.write(1, {"loss": 0.5})
    assert open(path).read().splitlines() == ["step,loss", "1,0.5"]


# --- 6. caption folders -------------------------------------------------------------------------------------

def _png(path, size=(8, 8), colour=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _noise(path, fmt):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, fmt)


def _truncated_jpeg(root):
    _noise(root / "bad.jpg", "JPEG")
    raw = (root / "bad.jpg").read_bytes()
    (root / "bad.jpg").write_bytes(raw[:len(raw) * 3 // 4])  # opens and verifies; .load() fails
    (root / "bad.txt").write_text("half a picture")
    return "bad.jpg"


def _broken_png_block(root):
    """A PNG whose IDAT data is damaged but whose checksums agree: verify() passes, decoding fails."""
    _noise(root / "bad.png", "PNG")
    raw = (root / "bad.png").read_bytes()
    i = raw.index(b"IDAT")
    n = int.from_bytes(raw[i - 4:i], "big")
    block = bytearray(raw[i + 4:i + 4 + n])
    block[n // 2:n // 2 + 50] = bytes(50)
    crc = (zlib.crc32(b"IDAT" + bytes(block)) & 0xFFFFFFFF).to_bytes(4, "big")
    (root / "bad.png").write_bytes(raw[:i + 4] + bytes(block) + crc + raw[i + 8 + n:])
    (root / "bad.txt").write_text("a damaged block")
    return "bad.png"


def _metadata(root, *entries):
    lines = [e if isinstance(e, bytes) else json.dumps(e).encode() for e in entries]
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")


def _escapes_with_dotdot(root):
    _png(root.parent / "outside.png")
    _metadata(root, {"file_name": "good.png", "text": "ok"}, {"file_name": "../outside.png", "text": "x"})
    return "metadata.jsonl line 2"


def _absolute_path(root):
    _metadata(root, {"file_name": "good.png", "text": "ok"}, {"file_name": "/etc/passwd", "text": "x"})
    return "metadata.jsonl line 2"


def _symlink_out(root):
    _png(root.parent / "secret.png")
    os.symlink(root.parent / "secret.png", root / "linked.png")
    (root / "linked.txt").write_text("x")
    return "linked.png"


def _symlinked_caption_out(root):
    (root.parent / "secret.txt").write_text("root:x:0:0")
    _png(root / "img.png")
    os.symlink(root.parent / "secret.txt", root / "img.txt")
    return "img.png"


def _metadata_not_utf8(root):
    _metadata(root, {"file_name": "good.png", "text": "ok"}, b'{"file_name": "other.png", "text": "caf\xe9"}')
    return "metadata.jsonl line 2"


def _sidecar_not_utf8(root):
    _png(root / "img.png")
    (root / "img.txt").write_bytes(b"a red circle\nand \xff\xfe more")
    return "img.txt"


def _too_many_pixels(root):
    Image.new("L", (9000, 8000)).save(root / "huge.png")  # 72 megapixels: refused from the header
    (root / "huge.txt").write_text("x")
    return "huge.png"


def _extreme_aspect(root):
    Image.new("L", (1, 1_000_000)).save(root / "thread.png")  # resized to 64 wide: 64 x 64,000,000
    (root / "thread.txt").write_text("x")
    return "thread.png"


FOLDER_CASES = [  # (builds the bad part beside a good example, what names it); each also breaks the scan
    (_escapes_with_dotdot, "outside the data folder"),
    (_absolute_path, "outside the data folder"),
    (_symlink_out, "outside the data folder"),
    (_symlinked_caption_out, "outside the data folder"),
    (_metadata_not_utf8, "is not UTF-8 text (byte 0xe9"),
    (_sidecar_not_utf8, "is not UTF-8 text (line 2: byte 0xff"),
    (_too_many_pixels, "over the limit of 64 megapixels"),
    (_extreme_aspect, "aspect ratio of 1000000:1"),
]


def _folder(tmp_path, build):
    root = tmp_path / "data"
    root.mkdir()
    _png(root / "good.png")
    (root / "good.txt").write_text("ok")
    return root, build(root)


@pytest.mark.parametrize("build, reason", FOLDER_CASES, ids=[c[0].__name__.strip("_") for c in FOLDER_CASES])
def test_bad_folder_examples_are_refused_by_name(build, reason, tmp_path, caplog):
    root, named = _folder(tmp_path, build)
    with pytest.raises(ValueError, match=f"{re.escape(named)}.*{re.escape(reason)}|"
                                         f"{re.escape(reason)}.*{re.escape(named)}") as e:
        caption_folder.CaptionFolderSource(str(root), resolution=64, on_bad_image="error")
    assert "\n" not in str(e.value)
    with caplog.at_level(logging.WARNING, logger="jaxdiff.train.data"):
        source = caption_folder.CaptionFolderSource(str(root), resolution=64, on_bad_image="skip")
    assert [rel for rel, _ in source.examples] == ["good.png"]
    assert len(source.skipped) == 1 and named in " ".join(source.skipped[0]) and reason in source.skipped[0][1]
    assert any(named in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    image, caption = source[0]
    assert image.shape == (64, 64, 3) and caption == "ok"


@pytest.mark.parametrize("build", [_truncated_jpeg, _broken_png_block], ids=["truncated_jpeg", "png_block"])
def test_image_that_fails_to_decode_is_skipped_or_named_never_a_crash(build, tmp_path, caplog):
    root, name = _folder(tmp_path, build)
    _png(root / "z.png", colour=(200, 0, 0))
    (root / "z.txt").write_text("last")
    source = caption_folder.CaptionFolderSource(str(root), resolution=16, on_bad_image="skip")
    assert [rel for rel, _ in source.examples] == [name, "good.png", "z.png"]  # (it passes the scan)
    with caplog.at_level(logging.WARNING, logger="jaxdiff.train.data"):
        image, caption = source[0]  # the next example that decodes takes its place
        again, _ = source[0]
    assert caption == "ok" and np.array_equal(image, again) and np.array_equal(image, source[1][0])
    warnings = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(warnings) == 1 and "cannot decode" in warnings[0]  # named once, however often it comes up
    assert [path.rsplit("/", 1)[-1] for path, _ in source.skipped] == [name]
    # batches through the prefetcher's threads: a full batch, the same on every call
    fn = lambda step: data.batch_at(source, step, 6, seed=0)  # noqa: E731
    with data.Prefetcher(fn, 0) as batches:
        got = [next(batches)[1] for _ in range(3)]
    assert all(b["images"].shape == (6, 16, 16, 3) for b in got)
    assert [b["captions"] for b in got] == [fn(s)["captions"] for s in range(3)]

    strict = caption_folder.CaptionFolderSource(str(root), resolution=16, on_bad_image="error")
    with pytest.raises(ValueError, match=f"{name}: cannot decode image"):
        strict[0]
    with data.Prefetcher(lambda step: data.batch_at(strict, step, 3, seed=0), 0) as batches:
        with pytest.raises(ValueError, match=f"{name}: cannot decode image"):
            for _ in range(3):
                next(batches)


def test_pil_decompression_bomb_is_refused_by_name(tmp_path, monkeypatch):
    root, _ = _folder(tmp_path, lambda root: None)
    Image.new("L", (600, 500)).save(root / "bomb.png")
    (root / "bomb.txt").write_text("x")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 300,000 > 2 x this: PIL refuses in open()
    source = caption_folder.CaptionFolderSource(str(root), resolution=8, on_bad_image="skip")
    assert [rel for rel, _ in source.examples] == ["good.png"]
    assert "too many pixels" in source.skipped[0][1]


# --- runs of the tiny U-Net config, as subprocesses sharing a compilation cache -----------------------------

@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """The environment of `python main.py train` subprocesses: one XLA cache, so only the first compiles."""
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla"))}


def _train_cmd(workdir, *extra):
    return [sys.executable, os.path.join(REPO, "main.py"), "train", "--workdir", str(workdir), *TINY, *extra]


def _run(cmd, env, log):
    with open(log, "w") as err:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, timeout=600)
    return proc.returncode, open(log).read()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cli_env):
    """A tiny U-Net run of 6 steps (checkpoints 2, 4, 6) never interrupted."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    rc, err = _run(_train_cmd(workdir), cli_env, str(workdir) + ".log")
    assert rc == 0, err
    return workdir


def _assert_same_params(a, b):
    for use_ema in (False, True):
        pa, pb = (loop.restore_pipeline(str(w), use_ema=use_ema).params for w in (a, b))
        leaves_a, leaves_b = jax.tree.leaves(pa), jax.tree.leaves(pb)
        assert len(leaves_a) == len(leaves_b) > 0
        for x, y in zip(leaves_a, leaves_b):
            assert np.array_equal(np.asarray(x), np.asarray(y))


def _metric_steps(workdir):
    return [int(s) for s in np.genfromtxt(os.path.join(workdir, "metrics.csv"), delimiter=",", names=True)["step"]]


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_is_bit_identical(reference_run, cli_env, tmp_path):
    """SIGKILL at seeded random moments (in the first 0.5 s; just after the run files are written; after
    the first checkpoint), each re-run resuming what the last left, then a run to the end: the params
    are those of the run never killed, bit for bit, and metrics.csv has one row per step."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    for name in ("config.json", "pipeline.json"):  # left 0-byte by an older version killed at start-up
        (workdir / name).write_text("")
    ckpts = str(workdir / "checkpoints")
    rng = random.Random(30)

    def started(_):
        return True

    def run_files_written(_):
        return (workdir / "pipeline.json").stat().st_size > 0

    def checkpoint_saved(before):
        return len(checkpoint_lib.saved_steps(ckpts)) > len(before)

    moments = [(started, rng.uniform(0.05, 0.5)), (run_files_written, rng.uniform(0.0, 0.3)),
               (checkpoint_saved, rng.uniform(0.0, 2.0))]
    log = str(tmp_path / "killed.log")
    for event, delay in moments:
        before = checkpoint_lib.saved_steps(ckpts)
        with open(log, "a") as err:
            proc = subprocess.Popen(_train_cmd(workdir), cwd=REPO, env=cli_env, stdout=subprocess.DEVNULL,
                                    stderr=err)
        deadline = time.monotonic() + 300
        while not event(before) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode in (-signal.SIGKILL, 0), open(log).read()
    rc, err = _run(_train_cmd(workdir), cli_env, str(tmp_path / "final.log"))
    assert rc == 0, err
    assert checkpoint_lib.saved_steps(ckpts)[-1] == 6
    _assert_same_params(reference_run, workdir)
    assert _metric_steps(workdir) == list(range(1, 7))
    assert not [n for n in os.listdir(workdir) if n.startswith(".jaxdiff-tmp")]


def _no_traceback_but_orbax_loop_noise(err: str) -> bool:
    """No traceback in `err` except Orbax's known shutdown noise: after a failed restore, callbacks of
    its background event loop sometimes fire once the loop is closed ("RuntimeError: Event loop is
    closed", printed by asyncio; the restore and the run are unaffected). A known, open defect."""
    return all("Event loop is closed" in chunk for chunk in err.split("Traceback (most recent call last):")[1:])


@pytest.mark.slow
def test_corrupt_newest_checkpoint_resumes_from_the_one_before_and_export_too(reference_run, cli_env,
                                                                               tmp_path, capsys, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(reference_run, workdir)
    _truncate_data(str(workdir / "checkpoints" / "6"))
    # export: the newest checkpoint that restores (step 4), one warning naming step 6
    with caplog.at_level(logging.WARNING):
        assert main.main(["export", str(workdir), str(tmp_path / "out")]) == 0
    assert _no_traceback_but_orbax_loop_noise(capsys.readouterr().err)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "checkpoint step 6" in warnings[0] and "trying step 4" in warnings[0]
    # train: resumes from step 4, sets step 6 aside, trains steps 5 and 6 again: the same run
    rc, err = _run(_train_cmd(workdir), cli_env, str(tmp_path / "train.log"))
    # (Not checked here: Orbax's shutdown tracebacks after the failed restore, a known open defect.)
    assert rc == 0 and "checkpoint step 6" in err, err
    assert os.listdir(workdir / checkpoint_lib.CORRUPT_DIR) == ["6"]
    _assert_same_params(reference_run, workdir)
    assert _metric_steps(workdir) == list(range(1, 7))
    # nothing restores: one line, exit 2, nothing moved
    for step in checkpoint_lib.saved_steps(str(workdir / "checkpoints")):
        _empty_metadata(str(workdir / "checkpoints" / str(step)))
    assert main.main(["export", str(workdir), str(tmp_path / "out2")]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "can be restored: step 6" in errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("log_every, message", [
    (1, r"loss is (NaN|inf) at step (\d+); the last finite checkpoint is step (\d+), kept"),
    (100, r"the loss or the parameters are not finite at step (\d+) .*the last finite checkpoint is step (\d+), kept"),
])
def test_diverging_run_stops_naming_the_step_and_keeps_the_last_finite_checkpoint(log_every, message, cli_env,
                                                                                   tmp_path):
    """learning_rate=1e30: the step after the warm-up throws the params to ~1e30, the next loss is not
    finite. Seen in the loss (logged every step) or before a checkpoint (logged rarely)."""
    workdir = tmp_path / "run"
    rc, err = _run(_train_cmd(workdir, "--config.train.learning_rate=1e30", "--config.checkpoint.every=1",
                              f"--config.log_every={log_every}"), cli_env, str(tmp_path / "train.log"))
    errors = _error_lines(err)
    assert rc == 2 and len(errors) == 1, err
    found = re.search(message, errors[0])
    assert found, errors[0]
    bad_step, kept = int(found.groups()[-2]), int(found.groups()[-1])
    assert kept < bad_step < 6
    assert checkpoint_lib.saved_steps(str(workdir / "checkpoints"))[-1] == kept
    params = loop.restore_pipeline(str(workdir), use_ema=False).params
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
