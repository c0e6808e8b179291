"""The bundled shapes model: loads with no argument, generates from the CLI, and follows prompts."""

import os

import numpy as np
import pytest

import jaxdiff
import main
from jaxdiff.eval import prompt_adherence


@pytest.fixture(scope="module")
def bundled():
    return jaxdiff.load()


def test_load_without_path_is_the_bundled_model(bundled):
    assert os.path.samefile(bundled.path, jaxdiff.pipeline.BUNDLED_MODEL)
    assert set(bundled.defaults) >= {"sampler", "steps", "guidance_scale"}
    images = bundled.generate("a red circle", seed=0)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_bundled_model_is_small():
    total = sum(os.path.getsize(os.path.join(d, f))
                for d, _, files in os.walk(jaxdiff.pipeline.BUNDLED_MODEL) for f in files)
    assert total <= 50 * 2 ** 20, total


def test_cli_generate_without_model_writes_png(tmp_path):
    from PIL import Image

    rc = main.main(["generate", "a red circle above a blue square", "--out", str(tmp_path)])
    assert rc == 0
    assert Image.open(tmp_path / "image_000.png").size == (64, 64)


@pytest.mark.slow
def test_bundled_model_follows_prompts(bundled):
    """A regression guard on a small sample, below what the shipped model measures on it (0.92 overall,
    1.0 single on these 48 captions): a broken load or sampler scores ~0. 48 captions are too few to
    check the 0.95 target; `jaxdiff eval --n 1000` does (the model card's scores)."""
    scores, _, _ = prompt_adherence.evaluate(bundled, n=48, seed=123)
    assert scores["overall"] >= 0.7 and scores["single"] >= 0.8, scores


@pytest.mark.slow
def test_bundled_model_reads_relations(bundled):
    """The relation word reaches the image: at t = 999 the U-Net's loss on validation images is lower
    with the caption as written than with its relation reversed (the model shipped before the
    contrastively pretrained text encoder: equal to 4 decimals; the shipped one: 0.803 against 0.831)."""
    written, flipped = prompt_adherence.relation_loss_gap(bundled, n=64, timesteps=(999,))[999]
    assert flipped - written > 0.01, (written, flipped)


@pytest.mark.slow
def test_eval_cli_prints_every_kind(pipeline_dir, capsys):
    rc = main.main(["eval", "--model", pipeline_dir("sd1"), "--n", "6", "--steps", "1",
                    "--guidance-rescale", "0.7",
                    "--batch-size", "3", "--relation-sensitivity", "--relation-loss-gap", "--vae-roundtrip"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "overall:" in out and "n: 6" in out
    assert "by background and named colour" in out
    assert "relation sensitivity:" in out
    assert "t=999:" in out and "t=700:" in out
    assert "VAE round trip of 6 validation images" in out and out.count("n: 6") == 2


@pytest.mark.parametrize("flags, message", [(["--n", "0"], "n must be a positive int, got 0"),
                                            (["--batch-size", "0"], "batch_size must be a positive int, got 0")])
def test_eval_cli_names_a_bad_count(flags, message, capsys):
    assert main.main(["eval", *flags]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    for check in (prompt_adherence.vae_roundtrip, prompt_adherence.relation_sensitivity,
                  prompt_adherence.relation_loss_gap):
        with pytest.raises(ValueError, match=message.split(",")[0]):
            check(None, **{"n" if "--n" in flags else "batch_size": 0})


def test_vae_roundtrip_scores_what_the_decoder_gives_back(bundled, pipeline_dir):
    """The bundled VAE gives back nearly every validation image the detector reads right; a random one
    gives back nothing it can read."""
    trained = prompt_adherence.vae_roundtrip(bundled, n=64, batch_size=32)
    assert trained["n"] == 64 and trained["overall"] >= 0.9, trained
    random = prompt_adherence.vae_roundtrip(jaxdiff.load(pipeline_dir("sd1")), n=8)
    assert random["overall"] <= 0.25, random


class _FakePipe:
    """Images that depend on the noise seed only, or also on the caption's words."""

    def __init__(self, reads_text: bool):
        self.reads_text = reads_text

    def generate(self, captions, seed):
        images = []
        for i, c in enumerate(captions):
            rng = np.random.default_rng([seed, i] + ([sum(map(ord, c))] if self.reads_text else []))
            images.append(rng.random((8, 8, 3)))
        return np.stack(images)


@pytest.mark.parametrize("reads_text, changed", [(False, 0.0), (True, 1.0)])
def test_relation_sensitivity_tells_a_relation_blind_model(reads_text, changed):
    result = prompt_adherence.relation_sensitivity(_FakePipe(reads_text), n=40, seed=3, batch_size=7)
    pairs = sum(" a " in c for c in prompt_adherence.held_out_captions(40, 3))
    assert result["n"] == pairs > 0 and result["changed"] == changed
    assert (result["mean_difference"] == 0.0) == (not reads_text)


@pytest.mark.slow
def test_relation_loss_gap_is_zero_only_when_relations_cannot_be_told_apart(bundled):
    """With the opposite relations' token embeddings made equal the text encoder cannot tell the two
    captions apart, so the two losses are equal exactly; with the model's own embeddings they differ."""
    import jax

    gap = prompt_adherence.relation_loss_gap(bundled, n=24, timesteps=(999, 900), batch_size=16)
    assert set(gap) == {999, 900}
    assert all(0.0 < a < 2.0 and a != b for a, b in gap.values()), gap

    tokenizer = bundled.tokenizers[0]
    left, right, above, below = (tokenizer.convert_tokens_to_ids(w + "</w>")
                                 for w in ("left", "right", "above", "below"))
    params = jax.tree.map(np.array, bundled.params)
    embedding = params["text_encoders"][0]["text_model"]["embeddings"]["token_embedding"]["embedding"]
    embedding[right], embedding[below] = embedding[left], embedding[above]
    blind = jaxdiff.Pipeline(bundled.models, params, bundled.tokenizers, bundled.configs, bundled.defaults)
    gap = prompt_adherence.relation_loss_gap(blind, n=24, timesteps=(999, 900), batch_size=16)
    assert all(a == b for a, b in gap.values()), gap

    with pytest.raises(ValueError, match="timestep 1000 is outside"):
        prompt_adherence.relation_loss_gap(bundled, n=2, timesteps=(1000,))
