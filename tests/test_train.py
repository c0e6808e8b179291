"""Training: a tiny config learns, resuming is bit-identical, bad config keys are named."""

import json
import os

import jax
import numpy as np
import pytest

import jaxdiff
import main
from configs import shapes_clip, shapes_unet, shapes_vae
from jaxdiff.train import loop


def _config(module, tfds_dir, **overrides):
    config = module.get_config("tiny")
    config.data.data_dir = tfds_dir
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _losses(workdir):
    rows = np.genfromtxt(os.path.join(workdir, "metrics.csv"), delimiter=",", names=True)
    return rows["loss"]


def _eval_loss(config, params, tokenizers, models, steps=4):
    """The objective on fixed batches and keys: only the params differ between two calls."""
    from jaxdiff.train import data, step as step_lib

    load = loop._batch_fn(config, data.make_source(config.data), tokenizers, models)
    objective = step_lib.make_objective(models, config)
    total = 0.0
    for i in range(steps):
        batch = load(1000 + i)
        keys = step_lib.example_keys(jax.random.key(i), len(batch["images"]))
        total += float(objective(params, batch, keys)["loss"].mean())
    return total / steps


@pytest.mark.slow
@pytest.mark.parametrize("module", [shapes_vae, shapes_unet, shapes_clip])
def test_tiny_config_loss_falls(module, tfds_dir, tmp_path):
    from jaxdiff import components

    config = _config(module, tfds_dir, **{"train.steps": 40, "train.batch_size": 8,
                                          "train.learning_rate": 3e-3, "train.lr_schedule": "constant",
                                          "checkpoint.every": 40})
    configs, params, tokenizers = loop.build_pipeline(config)
    models = components.build_models(configs)
    before = _eval_loss(config, params, tokenizers, models)
    state = loop.train(config, str(tmp_path))
    after = _eval_loss(config, state.pipeline_params(use_ema=False), tokenizers, models)
    assert np.all(np.isfinite(_losses(str(tmp_path))))
    assert after < 0.9 * before, (before, after)


@pytest.mark.slow
def test_resume_is_bit_identical(tfds_dir, tmp_path):
    config = _config(shapes_unet, tfds_dir, **{"train.steps": 6, "checkpoint.every": 2})
    straight = loop.train(config, str(tmp_path / "straight"))
    # "killed" after step 3, through the CLI's --until_step (the same config, as flags)
    assert main.main(["train", "--config", "configs/shapes_unet.py:tiny", "--workdir", str(tmp_path / "resumed"),
                      f"--config.data.data_dir={tfds_dir}", "--config.train.steps=6",
                      "--config.checkpoint.every=2", "--until_step=3"]) == 0
    assert loop.Checkpointer(str(tmp_path / "resumed" / "checkpoints"), 1, 1).latest_step() == 3
    resumed = loop.train(config, str(tmp_path / "resumed"))
    assert int(resumed.step) == int(straight.step) == 6
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_takes_the_scheduler_only_when_named(tfds_dir, pipeline_dir):
    """The objective follows config.model.scheduler (an eps model can be fine-tuned into v-prediction)
    unless init.components names "scheduler"."""
    folder = pipeline_dir("sd1")
    config = _config(shapes_unet, tfds_dir, **{"init.path": folder,
                                               "init.components": ("text_encoders", "unet", "vae")})
    config.model.scheduler.prediction_type = "v_prediction"
    configs, params, _ = loop.build_pipeline(config)
    base = jaxdiff.load(folder)
    assert base.configs.scheduler["prediction_type"] == "epsilon"
    assert configs.scheduler == config.model.scheduler.to_dict()
    assert configs.unet == base.configs.unet and configs.pipeline_class == base.configs.pipeline_class
    np.testing.assert_array_equal(params["unet"]["conv_in"]["kernel"], base.params["unet"]["conv_in"]["kernel"])
    config.init.components = ("text_encoders", "unet", "vae", "scheduler")
    assert loop.build_pipeline(config)[0].scheduler == base.configs.scheduler
    config.init.components = ("unet", "sheduler")
    with pytest.raises(ValueError, match="sheduler"):
        loop.build_pipeline(config)


@pytest.mark.slow
def test_export_cli_writes_a_loadable_folder_with_its_defaults(tfds_dir, tmp_path, capsys):
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    loop.train(_config(shapes_unet, tfds_dir, **{"train.steps": 2}), run)
    assert main.main(["export", run, out, "--sampler", "ddim", "--steps", "3", "--cfg", "2.5"]) == 0
    pipe = jaxdiff.load(out)
    assert pipe.defaults == {"sampler": "ddim", "steps": 3, "guidance_scale": 2.5}
    assert pipe.configs.scheduler["prediction_type"] == "v_prediction"
    assert pipe.generate("a red circle").shape == (1, 64, 64, 3)
    assert main.main(["export", run, str(tmp_path / "bad"), "--sampler", "eular"]) == 2
    assert "unknown sampler 'eular'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad")
    before = sorted(os.listdir(out))
    assert main.main(["export", run, out]) == 2  # a folder already written: kept, and the way out named
    assert f"{out} is not empty; pass overwrite=True (jaxdiff export --overwrite)" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before
    assert main.main(["export", run, out, "--overwrite"]) == 0
    # Never over the run itself, nor with a default a folder must not carry.
    run_files = sorted(os.listdir(run))
    for argv, named in ([run, run, "--overwrite"], "model being exported"), \
            ([run, str(tmp_path), "--overwrite"], "model being exported"), \
            ([run, str(tmp_path / "nan"), "--cfg", "nan"], "guidance_scale"):
        capsys.readouterr()
        assert main.main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert named in err and err.count("\n") == 1, err
    assert sorted(os.listdir(run)) == run_files and not os.path.exists(tmp_path / "nan")


def test_unknown_config_key_is_named(tmp_path, capsys):
    rc = main.main(["train", "--config", "configs/shapes_vae.py:tiny", "--workdir", str(tmp_path),
                    "--config.train.stepz=3"])
    assert rc == 2
    assert "stepz" in capsys.readouterr().err


def test_missing_config_file_is_named(tmp_path, capsys):
    rc = main.main(["train", "--config", "configs/shapes_nope.py", "--workdir", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load --config") and "configs/shapes_nope.py" in err
    assert "Traceback" not in err


def test_unknown_config_variant_is_named(tmp_path, capsys):
    rc = main.main(["train", "--config", "configs/shapes_vae.py:tinny", "--workdir", str(tmp_path)])
    assert rc == 2
    assert "unknown variant 'tinny'" in capsys.readouterr().err


def test_unknown_mode_is_named(tfds_dir, tmp_path):
    config = _config(shapes_vae, tfds_dir, mode="gan")
    with pytest.raises(ValueError, match="unknown training mode 'gan'"):
        loop.train(config, str(tmp_path))


def test_unet_channels_follow_the_vae_and_a_mismatch_is_named(tfds_dir):
    config = _config(shapes_unet, tfds_dir, **{"model.vae.latent_channels": 6})
    configs, params, _ = loop.build_pipeline(config)
    assert configs.unet["in_channels"] == configs.unet["out_channels"] == 6
    assert params["unet"]["conv_out"]["kernel"].shape[-1] == 6
    config.model.unet.out_channels = 4  # set on its own, the U-Net's value no longer follows the VAE
    assert config.model.vae.latent_channels == 6
    with pytest.raises(ValueError, match="predicts 4 latent channels .* latents have 6"):
        loop.build_pipeline(config)


# (padded rows, micro-batches) against 6 rows in one step; the U-Net compiles slowly, so it gets two.
# CLIP's negatives are the rest of the (micro-)batch, so micro-batching changes its loss by design;
# padding must not (a pad row is nobody's negative).
@pytest.mark.slow
@pytest.mark.parametrize("module, cases", [(shapes_vae, [(8, 1), (6, 2), (6, 3), (8, 4)]),
                                           (shapes_unet, [(8, 1), (8, 4)]),
                                           (shapes_clip, [(8, 1), (12, 1)])])
def test_padding_and_accumulation_change_nothing(module, cases, tfds_dir):
    """Weight-0 pad rows and micro-batching give the plain step's update (rows keep their randomness)."""
    from jaxdiff import components
    from jaxdiff.train import data, step as step_lib

    config = _config(module, tfds_dir, **{"train.batch_size": 6, "train.optimizer": "sgd",
                                          "train.learning_rate": 0.05, "train.lr_schedule": "constant",
                                          "train.warmup_steps": 0})
    configs, params, tokenizers = loop.build_pipeline(config)
    models = components.build_models(configs)
    optimizer = step_lib.make_optimizer(config)
    source = data.make_source(config.data)

    def update(padded_rows, accum):
        config.train.grad_accum_steps = accum
        batch = loop._batch_fn(config, source, tokenizers, models, padded_rows)(0)
        assert len(batch["images"]) == padded_rows
        train_step = jax.jit(step_lib.make_train_step(models, config, optimizer))
        state, metrics = train_step(step_lib.create_state(params, config, optimizer), batch,
                                    jax.random.key(0))
        return jax.tree.leaves(state.params), float(metrics["loss"])

    plain, plain_loss = update(6, 1)
    start = jax.tree.leaves({k: params[k] for k in step_lib.trained_components(config)})
    assert max(float(np.abs(a - b).max()) for a, b in zip(plain, start)) > 1e-4  # the step moved
    for padded_rows, accum in cases:
        leaves, loss = update(padded_rows, accum)
        worst = max(float(np.abs(a - b).max()) for a, b in zip(leaves, plain))
        assert worst <= 1e-6, (padded_rows, accum, worst)
        assert loss == pytest.approx(plain_loss, rel=1e-5), (padded_rows, accum)


@pytest.mark.slow
def test_cached_latents_train_the_same(tfds_dir, tmp_path):
    """`train.cache_latents` encodes the data set once; the run it gives is the uncached run (the
    posterior is a function of the image, and each row keeps its own posterior noise)."""
    from jaxdiff import components
    from jaxdiff.train import data

    config = _config(shapes_unet, tfds_dir, **{"train.steps": 3, "train.batch_size": 6})
    plain = loop.train(config, str(tmp_path / "plain"))
    config.train.cache_latents = True
    cached = loop.train(config, str(tmp_path / "cached"))
    worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(cached.params)))
    assert worst <= 1e-6, worst

    configs, params, tokenizers = loop.build_pipeline(config)
    source = data.make_source(config.data)
    cache = loop.cache_posteriors(components.build_models(configs), params["vae"], source, batch_size=100)
    assert len(cache) == len(source) and cache.captions == source.captions
    batch = data.batch_at(cache, 0, 4, seed=0)
    assert "images" not in batch and batch["posterior"].shape == (4, 16, 16, 2 * configs.vae["latent_channels"])
    with pytest.raises(ValueError, match="cannot flip posterior"):
        data.batch_at(cache, 0, 4, seed=0, flip=True)
    config.mode = "vae"
    with pytest.raises(ValueError, match="cache_latents is for mode 'unet'"):
        loop.train(config, str(tmp_path / "vae"))


def test_frozen_subtrees_stay_put(tfds_dir):
    """`train.frozen` keeps the named subtrees bit-identical (SD-style decoder-only VAE fine-tuning)."""
    from jaxdiff import components
    from jaxdiff.train import data, step as step_lib

    config = _config(shapes_vae, tfds_dir, **{"train.frozen": ("vae/encoder", "vae/quant_conv"),
                                              "train.warmup_steps": 0})
    configs, params, tokenizers = loop.build_pipeline(config)
    models = components.build_models(configs)
    optimizer = step_lib.make_optimizer(config)
    batch = loop._batch_fn(config, data.make_source(config.data), tokenizers, models)(0)
    state = step_lib.create_state(params, config, optimizer)
    train_step = jax.jit(step_lib.make_train_step(models, config, optimizer))
    for i in range(2):
        state, _ = train_step(state, batch, jax.random.key(i))
    before = params["vae"]
    for after in (state.params["vae"], state.ema["vae"]):
        for name in ("encoder", "quant_conv"):
            for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])):
                np.testing.assert_array_equal(a, b)
    after = state.params["vae"]
    moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(before["decoder"]),
                                                           jax.tree.leaves(after["decoder"]))]
    assert max(moved) > 1e-4

    config.train.frozen = ("vae/encodr",)
    with pytest.raises(ValueError, match="vae/encodr"):
        step_lib.create_state(params, config, step_lib.make_optimizer(config))


@pytest.mark.slow
def test_redraw_fits_the_decoder_to_the_unets_latents(tfds_dir):
    """`train.redraw_strengths`: the decoder learns from the frozen U-Net's img2img redraws of the
    latents (strength 0: the latents as they are); encoder, U-Net and text encoder stay put."""
    from jaxdiff import components
    from jaxdiff.train import data, step as step_lib

    config = _config(shapes_vae, tfds_dir, **{"train.frozen": ("vae/encoder", "vae/quant_conv"),
                                              "train.warmup_steps": 0})
    configs, params, tokenizers = loop.build_pipeline(config)
    models = components.build_models(configs)
    batch = loop._batch_fn(config, data.make_source(config.data), tokenizers, models)(0)
    keys = step_lib.example_keys(jax.random.key(0), len(batch["images"]))

    def loss(strengths):
        config.train.redraw_strengths = strengths
        return np.asarray(step_lib.make_objective(models, config)(params, batch, keys)["loss"])

    plain = loss(())
    np.testing.assert_allclose(loss((0.0,)), plain, rtol=1e-5)  # unscale(scale(z)) is z up to rounding
    redrawn = loss((0.5,))
    assert np.all(np.isfinite(redrawn)) and np.abs(redrawn - plain).max() > 1e-3

    optimizer = step_lib.make_optimizer(config)
    state = step_lib.create_state(params, config, optimizer)
    state, _ = jax.jit(step_lib.make_train_step(models, config, optimizer))(state, batch, jax.random.key(1))
    after = state.pipeline_params(use_ema=False)
    for name in ("unet", "text_encoders"):
        for a, b in zip(jax.tree.leaves(params[name]), jax.tree.leaves(after[name])):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(params["vae"]["encoder"]), jax.tree.leaves(after["vae"]["encoder"])):
        np.testing.assert_array_equal(a, b)
    moved = max(float(np.abs(np.asarray(a) - b).max()) for a, b in
                zip(jax.tree.leaves(params["vae"]["decoder"]), jax.tree.leaves(after["vae"]["decoder"])))
    assert moved > 1e-5

    unet_config = _config(shapes_unet, tfds_dir, **{"train.redraw_strengths": (0.5,)})
    with pytest.raises(ValueError, match="redraw_strengths is for mode 'vae'"):
        step_lib.make_objective(models, unet_config)


def test_redraw_config_redraws_as_the_bundled_model_samples():
    """configs/shapes_vae.py:redraw trains the bundled decoder on the latents the bundled folder's
    own sampler, steps, guidance and noise schedule produce."""
    from jaxdiff import pipeline
    from jaxdiff.weights import folder
    from jaxdiff.sampling import schedules

    config = shapes_vae.get_config("redraw")
    bundled = folder.read_configs(pipeline.BUNDLED_MODEL)
    with open(os.path.join(pipeline.BUNDLED_MODEL, folder.JAXDIFF_DEFAULTS_FILE)) as f:
        defaults = json.load(f)
    assert dict(config.export.defaults) == defaults
    ours = schedules.make_schedule(defaults["sampler"], config.model.scheduler.to_dict(), defaults["steps"])
    theirs = schedules.make_schedule(defaults["sampler"], bundled.scheduler, defaults["steps"])
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_clip_run_hands_its_text_encoder_to_the_unet_stage(tfds_dir, tmp_path):
    """The chain of the bundled model: a CLIP run carries the VAE along, and the U-Net stage takes the
    VAE and the pretrained text encoder (EMA) from it; the training-only heads stay behind."""
    run = str(tmp_path / "clip")
    vae_run = str(tmp_path / "vae")
    loop.train(_config(shapes_vae, tfds_dir, **{"train.steps": 2}), vae_run)
    state = loop.train(_config(shapes_clip, tfds_dir, **{"init.path": vae_run}), run)
    pipe = loop.restore_pipeline(run)
    assert set(pipe.params) == set(loop.COMPONENTS)
    np.testing.assert_array_equal(pipe.params["vae"]["decoder"]["conv_out"]["kernel"],
                                  loop.restore_pipeline(vae_run).params["vae"]["decoder"]["conv_out"]["kernel"])
    config = _config(shapes_unet, tfds_dir, **{"init.path": run, "init.components": ("vae", "text_encoders"),
                                               "train.train_text_encoder": False})
    _, params, _ = loop.build_pipeline(config)
    assert "contrastive" not in params
    for a, b in zip(jax.tree.leaves(params["text_encoders"]), jax.tree.leaves(state.ema["text_encoders"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vae_decoder_swap_checks_the_encoder(tfds_dir):
    """`main.py export --vae-decoder`: a donor VAE with the same encoder is taken; another is refused."""
    from jaxdiff import components, pipeline

    configs, params, tokenizers = loop.build_pipeline(_config(shapes_vae, tfds_dir))
    pipe = pipeline.Pipeline(components.build_models(configs), params, tokenizers, configs, {})
    donor_vae = jax.tree.map(np.asarray, params["vae"])
    donor_vae["decoder"] = jax.tree.map(lambda x: x + 1.0, donor_vae["decoder"])
    donor = pipeline.Pipeline(pipe.models, {**params, "vae": donor_vae}, tokenizers, configs, {})
    swapped = loop.with_vae_decoder(pipe, donor)
    np.testing.assert_array_equal(swapped.params["vae"]["decoder"]["conv_in"]["kernel"],
                                  donor_vae["decoder"]["conv_in"]["kernel"])
    np.testing.assert_array_equal(swapped.params["unet"]["conv_in"]["kernel"],
                                  params["unet"]["conv_in"]["kernel"])
    donor_vae["encoder"] = jax.tree.map(lambda x: x + 1e-3, donor_vae["encoder"])
    donor = pipeline.Pipeline(pipe.models, {**params, "vae": donor_vae}, tokenizers, configs, {})
    with pytest.raises(ValueError, match="encoder differs"):
        loop.with_vae_decoder(pipe, donor)


def test_timestep_sampling():
    """Uniform covers [0, T); logit-normal puts its median at T * sigmoid(mean) and stays in range."""
    from jaxdiff.train import step as step_lib

    keys = step_lib.example_keys(jax.random.key(0), 20000)
    config = shapes_unet.get_config("tiny")
    t = np.asarray(step_lib.sample_timesteps(keys, config.train, 1000))
    assert t.min() == 0 and t.max() == 999
    assert abs(np.median(t) - 500) < 15

    config.train.timestep_sampling = "logit_normal"
    config.train.timestep_logit_mean, config.train.timestep_logit_std = 1.5, 1.0
    t = np.asarray(step_lib.sample_timesteps(keys, config.train, 1000))
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= 999
    assert abs(np.median(t) - 1000 / (1 + np.exp(-1.5))) < 10  # 817.6
    # P(t/T > sigmoid(mean + std)) is P(N(0, 1) > 1)
    assert abs(np.mean(t >= 1000 / (1 + np.exp(-2.5))) - 0.1587) < 0.01

    config.train.timestep_sampling = "cosine"
    with pytest.raises(ValueError, match="unknown train.timestep_sampling 'cosine'"):
        step_lib.sample_timesteps(keys, config.train, 1000)
