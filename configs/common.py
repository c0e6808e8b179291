"""Fields every training config has, with their defaults (a config overrides what it needs)."""

import ml_collections

from jaxdiff.models import contrastive

SHAPES_WORDS = ("a", "red", "green", "blue", "yellow", "purple", "orange", "circle", "square",
                "triangle", "to", "the", "left", "right", "of", "above", "below")

# Stable Diffusion's noise schedule (scaled_linear 0.00085..0.012), as its scheduler_config.json has it.
SD_SCHEDULER = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085,
                    beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
                    timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                    clip_sample=False)


def check_variant(arg: str | None, variants: tuple[str, ...], module: str) -> None:
    """`configs/NAME.py:VARIANT` names one of the file's `VARIANTS` (or none): a typo is an error,
    not a silent run of the full config."""
    if arg not in (None,) + tuple(variants):
        raise ValueError(f"unknown variant {arg!r} of {module}; choose one of {variants}")


def link_latent_channels(c: ml_collections.ConfigDict) -> None:
    """Makes `model.unet`'s in/out channels follow `model.vae.latent_channels` (the U-Net reads and
    predicts the VAE's latents), so `--config.model.vae.latent_channels=4` changes all three.
    `identity()` is a derived reference: setting the U-Net's own value (an inpainting U-Net reads 9
    channels) replaces the link instead of writing through to the VAE. Call it last in `get_config`:
    assigning a new dict to `model.vae` or `model.unet` drops the link."""
    channels = c.model.vae.get_ref("latent_channels")
    c.model.unet.in_channels = channels.identity()
    c.model.unet.out_channels = channels.identity()


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # "unet" (diffusion objective), "vae" (reconstruction + KL) or "clip" (text encoder pretraining)
    c.mode = "unet"
    c.seed = 0

    c.model = ml_collections.ConfigDict()  # components built from scratch (diffusers config dicts)
    c.model.pipeline_class = "StableDiffusionPipeline"
    c.model.unet = {}
    c.model.vae = {}
    c.model.text_encoder = {}
    c.model.scheduler = dict(SD_SCHEDULER)
    c.model.tokenizer_words = SHAPES_WORDS
    c.model.max_length = 77
    c.model.contrastive = dict(contrastive.DEFAULTS)  # mode "clip": its image tower and projection

    c.init = ml_collections.ConfigDict()  # components taken from a diffusers folder or a run dir
    c.init.path = ""
    c.init.components = ()  # of "text_encoders", "unet", "vae", "scheduler" (else config.model's)
    c.init.calibrate_scaling_factor = False  # set the VAE's scaling_factor to 1/std of its latents

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"  # "tfds", "shapes" (the same data generated in memory, no TensorFlow) or "folder"
    c.data.name = "shapes"
    c.data.config = "res64"  # TFDS builder config; for the shapes data a name in jaxdiff.data.shapes.BUILDS
    c.data.split = "train"
    c.data.data_dir = ""  # TFDS data dir; "" = TFDS default (~/tensorflow_datasets)
    c.data.folder = ""  # a captioned image folder when source == "folder"
    c.data.resolution = 64
    c.data.on_bad_image = "skip"  # or "error"
    c.data.flip = False  # random horizontal flips break left/right captions
    c.data.prefetch = 2

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 64  # global, over all hosts
    c.train.grad_accum_steps = 1  # micro-batches per step (the batch's activation memory / this)
    c.train.optimizer = "adamw"  # or "sgd"
    c.train.learning_rate = 1e-4
    c.train.lr_schedule = "cosine"  # or "constant" (both after linear warm-up)
    c.train.warmup_steps = 100
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.weight_decay = 1e-2
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.999
    c.train.compute_dtype = "float32"
    c.train.caption_dropout = 0.1  # empty prompt this often, for classifier-free guidance
    c.train.min_snr_gamma = 0.0  # 0 = off; 5 is the paper's value
    # Which timesteps training sees: "uniform" (DDPM, SD) or "logit_normal" (SD3: t/T = sigmoid(N(mean,
    # std)); a positive mean spends more of the steps at high noise, where a layout is decided).
    c.train.timestep_sampling = "uniform"
    c.train.timestep_logit_mean = 0.0
    c.train.timestep_logit_std = 1.0
    c.train.train_text_encoder = True
    c.train.frozen = ()  # param path prefixes kept fixed within trained components, e.g. ("vae/encoder",)
    c.train.sample_posterior = True  # VAE latents: a posterior sample (True) or its mean
    # U-Net mode: encode the whole data set once before training instead of every batch (the same
    # training, without the frozen encoder in each step; costs N x latent size x 2 floats of host memory)
    c.train.cache_latents = False
    c.train.kl_weight = 1e-6  # vae mode, against the reconstruction loss summed over each image (as SD)
    c.train.edge_weight = 0.0  # vae mode: weight of the L1 loss on image gradients (sharp edges)
    c.train.redraw_strengths = ()  # vae mode: decode the frozen U-Net's img2img redraws (step.make_redraw)

    c.mesh = ml_collections.ConfigDict()  # devices of all hosts as a (data, fsdp) grid
    c.mesh.data = -1  # -1: all devices not used by fsdp
    c.mesh.fsdp = 1  # shard large params and optimizer state over this many devices
    c.mesh.min_shard_size = 2 ** 14  # arrays with fewer elements stay replicated

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 500
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.log_every = 50
    c.sample_every = 0  # 0 = never
    c.sample_prompts = ("a red circle", "a blue square above a yellow triangle")

    c.export = ml_collections.ConfigDict()
    c.export.defaults = dict(sampler="dpmpp_2m", steps=20, guidance_scale=5.0)
    return c
