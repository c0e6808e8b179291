"""`train(config, workdir)`: build or load the pipeline, resume, run the jitted step, log, save.

A run's workdir (`run_dir` lists its files) holds everything needed to resume or export it.
Restarting the same command resumes from the newest checkpoint; the batch and the random key of a
step depend only on (seed, step), so a resumed run is bit-identical to an uninterrupted one, however it
was stopped (kill -9 included): the run files are written whole or not at all (a temporary file or
folder, then a rename), metrics.csv drops the rows after the step it resumes from, and a checkpoint
that cannot be restored is named and set aside for the one before it.

A run whose loss (seen every `log_every` steps) or state (checked before each checkpoint) turns
non-finite stops with `step.TrainingDiverged`, naming the step; no non-finite state is ever saved, so
the last checkpoint is the last finite one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import compile_cache, components, parallel, pipeline, sample, text
from jaxdiff.images import save_pngs
from jaxdiff.models import params as model_params
from jaxdiff.models.contrastive import ContrastiveHeads
from jaxdiff.train import data, step as step_lib
from jaxdiff.train import checkpoint as checkpoint_lib, run_dir
from jaxdiff.train.checkpoint import Checkpointer

COMPONENTS = ("text_encoders", "unet", "vae")  # the param subtrees of a pipeline
INIT_COMPONENTS = COMPONENTS + ("scheduler",)  # what config.init may take from another model


def load_pipeline(path: str) -> pipeline.Pipeline:
    """A diffusers folder, or the newest checkpoint of a jaxdiff run directory."""
    if os.path.exists(os.path.join(path, run_dir.RUN_CONFIG)):
        return restore_pipeline(path)
    return pipeline.load(path)


def build_pipeline(config) -> tuple[components.PipelineConfigs, dict, list]:
    """(model_configs, params, tokenizers) the run starts from: components named in `config.init`
    come from `config.init.path`, the rest are built from `config.model` with random weights.

    The scheduler (which defines the objective: its noise schedule and prediction type) is
    `config.model.scheduler` unless "scheduler" is named too, so a model can be fine-tuned to a new
    prediction type, as SD 2 turned an epsilon model into a v-prediction one.
    """
    take = tuple(config.init.components) if config.init.path else ()
    unknown = set(take) - set(INIT_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown init.components {sorted(unknown)}; choose from {INIT_COMPONENTS}")
    base = load_pipeline(config.init.path) if take else None
    if base is not None and "text_encoders" in take:
        tokenizers = list(base.tokenizers)
    else:
        tokenizers = [text.build_tokenizer(config.model.tokenizer_words, config.model.max_length)]
    if set(take) >= set(COMPONENTS):
        model_configs = base.configs  # its pipeline class too (an SDXL folder stays SDXL)
        if "scheduler" not in take:
            model_configs = dataclasses.replace(model_configs, scheduler=config.model.scheduler.to_dict())
    else:
        tok = tokenizers[0]
        # The vocabulary and special ids follow the tokenizer, so config and tokenizer cannot disagree.
        encoder = {**config.model.text_encoder.to_dict(), "vocab_size": len(tok),
                   "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                   "pad_token_id": tok.pad_token_id, "max_position_embeddings": tok.model_max_length}
        model_configs = components.PipelineConfigs(
            pipeline_class=config.model.pipeline_class, unet=config.model.unet.to_dict(),
            vae=config.model.vae.to_dict(), text_encoders=(encoder,),
            scheduler=config.model.scheduler.to_dict())
        if base is not None:
            model_configs = dataclasses.replace(model_configs, **{k: getattr(base.configs, k) for k in take})
    if config.mode == "unet":
        components.check_latent_channels(model_configs)
    params = components.init_params(components.build_models(model_configs), config.seed)
    if base is not None:
        params.update({k: base.params[k] for k in take if k in COMPONENTS})
    params.update(model_params.random_params(training_head_shapes(config, model_configs), config.seed))
    return model_configs, params, tokenizers


def training_head_shapes(config, model_configs: components.PipelineConfigs) -> dict:
    """The shapes of the params a mode trains beside the pipeline's own (mode "clip": its image tower,
    text projection and temperature, under "contrastive"); empty for the other modes."""
    if config.mode != "clip":
        return {}
    heads = ContrastiveHeads.from_config(config.model.contrastive)
    return {"contrastive": heads.param_shapes(config.data.resolution, model_configs.text_encoders[0]["hidden_size"])}


def calibrate_scaling_factor(model_configs: components.PipelineConfigs, vae_params, source, config,
                             num_images: int = 512) -> components.PipelineConfigs:
    """Sets the VAE's scaling_factor to 1 / std of its latents on the training data, as Stable
    Diffusion chose 0.18215, so the diffusion model sees unit-variance latents."""
    models = components.build_models(dataclasses.replace(model_configs, vae={**model_configs.vae, "scaling_factor": 1.0,
                                                              "shift_factor": None}))
    encode = jax.jit(lambda p, x: sample.encode_images(models, p, x))
    latents = [np.asarray(encode(vae_params, data.batch_at(source, i, 64, config.seed)["images"] / 2 + 0.5))
               for i in range(max(1, num_images // 64))]
    factor = float(1.0 / np.std(np.concatenate(latents)))
    logging.info("VAE scaling_factor calibrated to %.5f", factor)
    return dataclasses.replace(model_configs, vae={**model_configs.vae, "scaling_factor": factor})


def cache_posteriors(models: components.Models, vae_params, source, batch_size: int = 256) -> data.ArraySource:
    """The source's examples as VAE posteriors (mean and std concatenated on channels, float32), with
    their captions: a U-Net step then samples latents from them instead of running the frozen encoder.

    The posterior is a deterministic function of the image, so training on the cache is the same
    training (each row's posterior noise still comes from its own key), minus the encoder's time. It
    holds N x h x w x 2C floats in host memory: 410 MB for the 50k shapes images.
    """
    encode = jax.jit(lambda p, x: jnp.concatenate(sample.posterior(models, p, x), axis=-1))
    chunks = []
    for begin in range(0, len(source), batch_size):
        images = np.stack([source[i][0] for i in range(begin, min(begin + batch_size, len(source)))])
        chunks.append(np.asarray(encode(vae_params, images.astype(np.float32) / 255.0)))
    captions = [source[i][1] for i in range(len(source))]
    return data.ArraySource(np.concatenate(chunks), captions, field="posterior")


def abstract_state(config, model_configs, optimizer):
    """The TrainState's structure and shapes, computed without allocating it."""
    shapes = {**components.pipeline_param_shapes(components.build_models(model_configs)), **training_head_shapes(config, model_configs)}
    return jax.eval_shape(lambda p: step_lib.create_state(p, config, optimizer), shapes)


def restore_pipeline(workdir: str, use_ema: bool = True) -> pipeline.Pipeline:
    """The newest checkpoint of a run as a `Pipeline` (EMA weights by default)."""
    config, model_configs, tokenizers = run_dir.read_run(workdir)
    if not checkpoint_lib.saved_steps(os.path.join(workdir, run_dir.CHECKPOINTS)):
        raise FileNotFoundError(f"{workdir} has no checkpoint yet")
    optimizer = step_lib.make_optimizer(config)
    ckpt = Checkpointer(os.path.join(workdir, run_dir.CHECKPOINTS), every=1, keep=1)
    # Onto this machine's devices, whatever mesh the run was saved from.
    abstract = abstract_state(config, model_configs, optimizer)
    shardings = parallel.shardings_for(abstract, parallel.make_mesh())
    try:  # the newest checkpoint that restores (a damaged one is named, and the one before it tried)
        state = ckpt.restore_latest(jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings))
    finally:
        ckpt.close()
    if state is None:
        raise FileNotFoundError(f"{workdir} has no checkpoint yet")
    models = components.build_models(model_configs)
    params = {k: v for k, v in state.pipeline_params(use_ema).items() if k in COMPONENTS}
    return pipeline.Pipeline(models, params, tokenizers, model_configs, dict(config.export.defaults), path=workdir)


# VAE config fields that do not change what the weights mean.
_VAE_CALIBRATION = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "_diffusers_version")


def with_vae_decoder(pipe: pipeline.Pipeline, donor: pipeline.Pipeline, tolerance: float = 1e-5) -> pipeline.Pipeline:
    """`pipe` with the VAE weights of `donor`, a decoder-only fine-tune of the same VAE
    (`configs/shapes_vae.py:decoder`). The donor's encoder must be `pipe`'s (within `tolerance`): the
    U-Net was trained on that encoder's latent space. `pipe`'s latent calibration is kept."""
    strip = lambda c: {k: v for k, v in c.items() if k not in _VAE_CALIBRATION}
    if strip(pipe.configs.vae) != strip(donor.configs.vae):
        raise ValueError("the two VAEs differ in architecture: "
                         f"{strip(pipe.configs.vae)} vs {strip(donor.configs.vae)}")
    ours, theirs = pipe.params["vae"], donor.params["vae"]
    for name in ("encoder", "quant_conv"):
        worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                    for a, b in zip(jax.tree.leaves(ours[name]), jax.tree.leaves(theirs[name])))
        if worst > tolerance:
            raise ValueError(f"the donor VAE's {name} differs from the pipeline's by {worst:.3g} "
                             f"(> {tolerance}): only a decoder fine-tune keeps the latent space")
    return pipeline.Pipeline(pipe.models, {**pipe.params, "vae": theirs}, pipe.tokenizers, pipe.configs,
                      pipe.defaults, path=pipe.path)


def _batch_fn(config, source, tokenizers, models, padded_batch_size=None):
    """step -> the host's batch for that step: images in [-1, 1], token ids, empty-prompt ids, weights.

    With `padded_batch_size` (global) each host's rows are padded to its share of it by repeating the last
    row with weight 0, so that the batch divides over the devices and the pad changes nothing.
    """
    per_host = config.train.batch_size // jax.process_count()
    rows = (padded_batch_size or config.train.batch_size) // jax.process_count()
    empty = tuple(np.repeat(text.tokenize(t, [""]), per_host, axis=0) for t in tokenizers)
    caption_ids = [text.CaptionIds(t) for t in tokenizers]

    def load(step):
        raw = data.batch_at(source, step, config.train.batch_size, config.seed,
                            jax.process_index(), jax.process_count(), flip=config.data.flip)
        field = getattr(source, "field", "images")
        batch = {field: raw[field],
                 "ids": tuple(ids(raw["captions"]) for ids in caption_ids),
                 "empty_ids": empty,
                 "weights": np.ones(per_host, np.float32)}
        if models.family.micro_conditioning:
            batch["time_ids"] = sample.micro_conditioning_ids(config.data.resolution, config.data.resolution, per_host)
        batch = parallel.pad_rows(batch, rows)
        batch["weights"][per_host:] = 0.0
        return batch

    return load


def padded_batch_size(config, mesh) -> int:
    """The global batch rounded up so that each of its `grad_accum_steps` micro-batches splits evenly
    over the mesh; raises on a batch that cannot be split over the processes or the micro-batches."""
    t = config.train
    if t.batch_size < 1 or t.grad_accum_steps < 1:
        raise ValueError(f"train.batch_size ({t.batch_size}) and train.grad_accum_steps "
                         f"({t.grad_accum_steps}) must be positive")
    if t.batch_size % jax.process_count():
        raise ValueError(f"train.batch_size {t.batch_size} must be a multiple of the "
                         f"{jax.process_count()} processes (each reads an equal share)")
    if t.batch_size < t.grad_accum_steps:
        raise ValueError(f"train.batch_size {t.batch_size} is smaller than train.grad_accum_steps "
                         f"{t.grad_accum_steps}: a micro-batch would be empty")
    return parallel.pad_batch(t.batch_size, mesh, multiple=t.grad_accum_steps)


def _save_samples(config, state, models, model_configs, tokenizers, batch, workdir, step):
    if config.mode == "clip":
        return  # nothing to draw: the U-Net is not what this mode trains
    out = os.path.join(workdir, "samples")
    params = state.pipeline_params(use_ema=True)
    if config.mode == "vae":
        recon = sample.decode(models, params["vae"], sample.encode_images(models, params["vae"],
                                                               batch["images"][:8] / 2 + 0.5))
        grid = np.concatenate([batch["images"][:8] / 2 + 0.5, np.asarray(recon)], axis=2)
    else:
        pipe = pipeline.Pipeline(models, params, tokenizers, model_configs, dict(config.export.defaults))
        grid = pipe.generate(list(config.sample_prompts), seed=0)
    save_pngs(np.concatenate(list(grid), axis=0)[None], out, prefix=f"step_{step:07d}",
              overwrite=True)  # a resumed run redraws the step's samples


def sharded_training(models: components.Models, params: dict, config, optimizer, mesh):
    """(state, train_step): a new TrainState laid out on `mesh` by the one sharding rule, and the
    jitted step that keeps it there (the state donated, the metrics replicated)."""
    # Born sharded: the state's layout comes from its shapes, then each leaf is placed once.
    abstract = jax.eval_shape(lambda p: step_lib.create_state(p, config, optimizer), params)
    shardings = parallel.shardings_for(abstract, mesh, config.mesh.min_shard_size)
    # (`pipeline_params` of the state's shardings is the shardings of the full params tree.)
    state = jax.jit(lambda p: step_lib.create_state(p, config, optimizer), out_shardings=shardings)(
        parallel.reshard(params, shardings.pipeline_params()))
    replicated = parallel.replicated(mesh)
    train_step = jax.jit(step_lib.make_train_step(models, config, optimizer), donate_argnums=(0,),
                         out_shardings=(shardings, replicated))
    return state, train_step


def train(config, workdir: str, until_step: int | None = None) -> step_lib.TrainState:
    """Runs (or resumes) the training described by `config` in `workdir`; returns the final state.

    `until_step` stops early after saving a checkpoint there, as a preempted job would (the
    schedule still spans `config.train.steps`). Raises `step.TrainingDiverged` when the loss or the
    state turns non-finite (the checkpoints already saved are all finite and kept).
    """
    from tqdm import tqdm

    step_lib.check_config(config)  # before anything is built: a bad field costs no start-up time
    if until_step is not None and until_step < 1:
        raise ValueError(f"--until-step must be >= 1, got {until_step}")
    compile_cache.enable()  # a resumed or repeated stage skips its train step's compile
    existing = run_dir.existing_run_configs(workdir)  # (names damaged run files before the slow part)
    model_configs, params, tokenizers = build_pipeline(config)
    source = data.make_source(config.data)
    if existing is not None:
        # A resumed run keeps the pipeline configs it started with (calibrated numbers included).
        model_configs = existing
    elif config.init.calibrate_scaling_factor:
        model_configs = calibrate_scaling_factor(model_configs, params["vae"], source, config)
    if jax.process_index() == 0 and existing is None:
        run_dir.write_run_files(workdir, config, model_configs, tokenizers)
    models = components.build_models(model_configs, dtype=jnp.dtype(config.train.compute_dtype))
    optimizer = step_lib.make_optimizer(config)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    padded = padded_batch_size(config, mesh)
    if padded != config.train.batch_size:
        logging.info("global batch %d padded to %d (weight-0 rows) to split over %d devices x %d "
                     "micro-batches", config.train.batch_size, padded, parallel.batch_size_divisor(mesh),
                     config.train.grad_accum_steps)
    if config.train.cache_latents:
        if config.mode != "unet":
            raise ValueError(f"train.cache_latents is for mode 'unet' (the VAE is frozen), not {config.mode!r}")
        t = time.perf_counter()
        source = cache_posteriors(models, params["vae"], source)
        logging.info("cached the VAE posteriors of %d examples in %.0f s", len(source), time.perf_counter() - t)
    state, train_step = sharded_training(models, params, config, optimizer, mesh)
    del params
    ckpt = Checkpointer(os.path.join(workdir, run_dir.CHECKPOINTS), every=config.checkpoint.every,
                        keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    try:
        restored = ckpt.restore_latest(state, set_aside=jax.process_index() == 0)
    except BaseException:
        ckpt.close()
        raise
    if restored is not None:
        state = restored
        logging.info("resumed from step %d", int(state.step))
    start = int(state.step)
    # One scalar, fetched only before a checkpoint is written: is every value of the state finite?
    is_finite = jax.jit(step_lib.state_is_finite, out_shardings=parallel.replicated(mesh))

    def diverged(what: str) -> step_lib.TrainingDiverged:
        ckpt.wait()  # (a save still being written is of a finite state: let it finish first)
        last = ckpt.latest_step()
        kept = (f"the last finite checkpoint is step {last}, kept" if last is not None
                else "no checkpoint was saved before it")
        return step_lib.TrainingDiverged(
            f"{what}; {kept} (lower train.learning_rate or check the data, then re-run to resume)")

    rng = jax.random.key(config.seed)
    log = run_dir.MetricsLog(os.path.join(workdir, "metrics.csv")) if jax.process_index() == 0 else None
    if log:
        log.keep_until(start)  # the rows after the checkpoint are written again
    total = config.train.steps
    stop = total if until_step is None else min(until_step, total)
    bar = tqdm(total=total, initial=start, disable=jax.process_index() != 0, dynamic_ncols=True)
    t0, done, finished = time.perf_counter(), 0, False
    try:
        with data.Prefetcher(_batch_fn(config, source, tokenizers, models, padded), start,
                             depth=config.data.prefetch) as batches:
            for step, batch in batches:
                if step >= stop:
                    break
                state, metrics = train_step(state, parallel.host_batch_to_global(batch, mesh), rng)
                done += 1
                if (step + 1) % config.log_every == 0 or step + 1 == total:
                    metrics = jax.device_get(metrics)
                    rate = done / (time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", steps_per_s=f"{rate:.2f}")
                    if log:
                        log.write(step + 1, {**metrics, "steps_per_s": rate})
                    loss = float(metrics["loss"])
                    if not np.isfinite(loss):
                        raise diverged(f"loss is {'NaN' if np.isnan(loss) else loss} at step {step + 1}")
                bar.update(1)
                if ckpt.due(step + 1, force=step + 1 == stop):
                    if not bool(is_finite(state, metrics["loss"])):
                        raise diverged(f"the loss or the parameters are not finite at step {step + 1} "
                                       f"(found before saving its checkpoint)")
                    ckpt.save(step + 1, state, force=True)
                if config.sample_every and (step + 1) % config.sample_every == 0 and jax.process_index() == 0:
                    _save_samples(config, state, models, model_configs, tokenizers, batch, workdir, step + 1)
        finished = True
    finally:
        bar.close()
        try:
            ckpt.wait()
            ckpt.close()
        except Exception as e:
            if finished:
                raise
            logging.warning("while closing the checkpoints after an error: %s", checkpoint_lib.error_reason(e))
    return state
