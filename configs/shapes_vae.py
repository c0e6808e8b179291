"""Stage 1 of the bundled model: a small f=4 VAE on 64x64 shapes images (16x16x8 latents; why those
sizes: configs/shapes_components.py). Variants: `decoder` (the decoder alone, sharpened), `redraw`
(the last stage of the bundled chain: the decoder fitted to the U-Net's latents), `tiny` (tests).

    jaxdiff train --config configs/shapes_vae.py --workdir runs/shapes_vae
    jaxdiff train --config configs/shapes_vae.py:decoder --workdir runs/shapes_vae_decoder \
        --config.init.path=runs/shapes_vae
    jaxdiff train --config configs/shapes_vae.py:tiny ...   # seconds, for tests
"""

from configs import common
from configs.shapes_components import SCHEDULER, TINY_TEXT, TINY_UNET, TINY_VAE, VAE

VARIANTS = ('tiny', 'decoder', 'redraw')  # configs/NAME.py:VARIANT


def get_config(arg=None):
    common.check_variant(arg, VARIANTS, __name__)
    c = common.base_config()
    c.mode = "vae"
    c.model.vae = dict(VAE)
    # The U-Net and text encoder exist (a run is a whole pipeline) but are not trained here.
    c.model.unet = dict(TINY_UNET)
    c.model.text_encoder = dict(TINY_TEXT)
    c.train.steps = 3000
    c.train.batch_size = 16  # flat images carry little information each: more steps beat bigger batches
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 200
    c.train.ema_decay = 0.995
    c.train.edge_weight = 1.0
    c.checkpoint.every = 250
    c.sample_every = 500
    if arg == "decoder":
        # Stage 1b: sharpen the decoder alone (as SD's ft-MSE VAE did). The encoder, and so the latent
        # space a U-Net is trained on, stays bit-identical. --config.init.path=<stage-1 run>.
        c.init.path, c.init.components = "runs/shapes_vae", ("vae",)
        c.train.frozen = ("vae/encoder", "vae/quant_conv")
        c.train.steps, c.train.learning_rate, c.train.lr_schedule = 1000, 2e-4, "constant"
    if arg == "redraw":
        # The last stage of the bundled model: its decoder fitted to its U-Net's latents (see
        # train.step.make_redraw). The whole pipeline comes from --config.init.path (an exported
        # model); only the decoder trains, so the latent space the U-Net works in stays bit-identical.
        c.init.path = "jaxdiff/assets/shapes_model"
        c.init.components = ("vae", "unet", "text_encoders")
        c.model.scheduler = dict(SCHEDULER)  # the U-Net's, which the redraws sample with
        c.train.frozen = ("vae/encoder", "vae/quant_conv")
        # 0: a fifth of the steps keep the encoder's own latents, so real latents still decode right.
        c.train.redraw_strengths = (0.0, 0.15, 0.3, 0.45, 0.6)
        # The shipped decoder's 1200 steps (29-37 min on 2 CPU cores); 2400 scored the same (model card).
        c.train.steps, c.train.learning_rate, c.train.lr_schedule = 1200, 2e-4, "constant"
        # The shipped defaults, so the decoder learns the latents the shipped sampler draws. A stochastic
        # sampler: its fresh noise each step undoes part of the U-Net's errors (model card, "Sampler").
        c.export.defaults = dict(sampler="dpmpp_2m_sde", steps=30, guidance_scale=2.0)
    if arg == "tiny":
        c.model.vae = dict(TINY_VAE)
        c.data.config = "tiny"
        c.train.steps, c.train.batch_size, c.train.warmup_steps = 4, 4, 1
        c.checkpoint.every, c.log_every, c.sample_every = 2, 1, 0
    common.link_latent_channels(c)
    return c

