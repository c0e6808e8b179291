"""The CLIP-style text encoder, pretrained contrastively against images of the shapes data
(models/contrastive.py), as Stable Diffusion's text encoder was pretrained before its U-Net was
trained on it, frozen. The VAE (and, if named, a U-Net) of the init rides along untouched, so that the
U-Net stage takes everything from this run.

The bundled model (docs/training.md) trains it between the VAE and the U-Net, which then trains from
scratch on it, frozen:

    jaxdiff train --config configs/shapes_clip.py --workdir runs/shapes_clip \
        --config.init.path=runs/shapes_vae
    jaxdiff train --config configs/shapes_unet.py --workdir runs/unet1 \
        --config.init.path=runs/shapes_clip --config.init.components='("vae","text_encoders")' \
        --config.train.train_text_encoder=False --config.train.steps=7000

(The model shipped before it moved a jointly trained U-Net onto this encoder instead: this run with
--config.init.path=out/shapes_model --config.init.components='("vae","unet")', then
configs/shapes_unet.py:retext from it.)
"""

from configs import common, shapes_unet

VARIANTS = ('tiny',)  # configs/NAME.py:VARIANT


def get_config(arg=None):
    common.check_variant(arg, VARIANTS, __name__)
    c = shapes_unet.get_config("tiny" if arg == "tiny" else None)
    c.mode = "clip"
    c.init.components = ("vae",)
    c.init.calibrate_scaling_factor = False  # the U-Net stage calibrates the latents it trains on
    c.train.cache_latents = False  # images, not latents: the image tower reads pixels
    # Big batches: a caption learns its layout only from negatives with the same words in another
    # layout, and a batch of 256 holds about one such negative per caption.
    c.train.batch_size = 256
    c.train.steps = 1000
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 100
    c.train.ema_decay = 0.995  # over 1000 steps 0.999 would keep 37% of the random initialisation
    c.train.caption_dropout = 0.0
    c.sample_every = 0
    c.checkpoint.every = 250
    if arg == "tiny":
        c.model.contrastive = dict(c.model.contrastive.to_dict(), channels=(8, 16), norm_num_groups=4,
                                   projection_dim=16)
        c.train.batch_size, c.train.steps = 4, 4
        c.checkpoint.every = 2
    return c
