"""Stage 3 of the bundled model: a text-conditioned U-Net trained on the latents of the stage-1 VAE
(configs/shapes_vae.py), from scratch on the frozen stage-2 text encoder (configs/shapes_clip.py), then
continued with `:retext`, each stage from the last one's export (docs/training.md has the whole chain):

    jaxdiff train --config configs/shapes_unet.py --workdir runs/unet1 \
        --config.init.path=runs/shapes_clip --config.init.components='("vae","text_encoders")' \
        --config.train.train_text_encoder=False --config.train.steps=7000
    jaxdiff export runs/unet1 out/unet1 --raw
    jaxdiff train --config configs/shapes_unet.py:retext --workdir runs/unet2 \
        --config.init.path=out/unet1 --config.train.steps=7000

Without those overrides it trains the text encoder jointly from scratch, which reads a caption as a
bag of objects (docs/research/relation-learning.md). The variants `pooled`, `deep`, `film` and
`wide_out` are experiments on how a U-Net reads relations, kept so that they can be rerun; none of
them is part of the bundled model.
"""

from configs import common
from configs.shapes_components import SCHEDULER, TEXT_ENCODER, TINY_TEXT, TINY_UNET, TINY_VAE, UNET, VAE

VARIANTS = ('tiny', 'retext', 'pooled', 'deep', 'film', 'wide_out')  # configs/NAME.py:VARIANT


def get_config(arg=None):
    common.check_variant(arg, VARIANTS, __name__)
    c = common.base_config()
    c.mode = "unet"
    c.model.unet = dict(UNET)
    c.model.text_encoder = dict(TEXT_ENCODER)
    c.model.vae = dict(VAE)
    c.model.max_length = 16  # captions of the shapes grammar are at most 12 tokens with BOS/EOS
    c.model.scheduler = dict(SCHEDULER)  # v-prediction, zero terminal SNR: see shapes_components.py
    c.init.path = "runs/shapes_vae"
    c.init.components = ("vae",)
    c.init.calibrate_scaling_factor = True
    c.train.steps = 16000
    c.train.cache_latents = True  # the frozen encoder was about a fifth of each step
    c.train.batch_size = 64
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 200
    c.train.ema_decay = 0.999
    c.sample_every = 1000
    if arg == "retext":  # a trained U-Net on a contrastively pretrained text encoder, kept frozen
        # --config.init.path: an export of an earlier U-Net stage on that encoder (the bundled chain), or
        # a configs/shapes_clip.py run that carried a U-Net along (--config.init.components='("vae","unet")'
        # there). The text encoder trained jointly with the U-Net reads a caption as a bag of objects; the
        # CLIP-pretrained one tells the layouts apart.
        c.init.path = "runs/shapes_clip"
        c.init.components = ("vae", "unet", "text_encoders")
        c.init.calibrate_scaling_factor = False  # the VAE keeps the factor the U-Net was trained with
        c.train.train_text_encoder = False
        c.train.steps = 3000
        c.checkpoint.every = 250
    if arg == "pooled":  # an experiment (docs/research/relation-learning.md); not yet trained from scratch
        # The bundled model reads a caption as a bag of objects (eval --relation-sensitivity = 0): the
        # relation never reaches the image through cross-attention alone. diffusers'
        # addition_embed_type="text" adds the attention-pooled prompt to the timestep embedding, so
        # every resnet block sees the whole sentence, as a class label steers a class-conditional
        # model's layout. StableDiffusionPipeline runs such a U-Net unchanged.
        c.model.unet = dict(UNET, addition_embed_type="text", addition_embed_type_num_heads=4)
    if arg == "deep":  # an experiment (docs/research/relation-learning.md): a fourth level, cross-attention at 2x2
        # The idea: a relation picks a half of the image. At 2x2 every cell is a corner, so one
        # zero-padded conv tells the four apart; at 4x4 and 8x8 a query learns where it is only from
        # the padding's effect seeping in through several convs, against the noise that is all there
        # is at t = T. Trained 500 steps at t = T only it read relations no better than UNET.
        c.model.unet = dict(UNET, block_out_channels=(32, 64, 128, 128),
                            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                            up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",))
    if arg == "film":  # an experiment (docs/research/relation-learning.md): `pooled`, with FiLM resnets
        # At t = T the input is noise, and a time embedding added before GroupNorm is partly
        # normalised away with it; FiLM after the norm can switch the noise path off and put a clean
        # constant (from the time and the pooled prompt) in its place, which conv2's zero padding turns
        # into a position field: "red on the left" then needs no noise to be averaged out. Trained
        # 1000 steps from scratch (logit-normal t) it read no relation.
        c.model.unet = dict(UNET, addition_embed_type="text", addition_embed_type_num_heads=4,
                            resnet_time_scale_shift="scale_shift")
    if arg == "wide_out":  # an experiment (docs/research/relation-learning.md): a 17x17 conv_out, frozen text encoder
        # At t = T the input is pure noise and the best output is -E[x0 | caption]; for "to the left of"
        # that puts the first object's colour on the left half and the second's on the right. Zero
        # padding is a U-Net's only cue of where a pixel is, and through 3x3 convs it reaches a pixel or
        # two in from the border: the bundled model's mean output at t = T is flat inside that ring. A
        # conv_out wider than the latents sums a different part of its kernel at each output pixel, so
        # a spatially constant feature (the caption's, from cross-attention) becomes any field over the
        # image: the layout prior is linear in the caption features.
        c.model.unet = dict(UNET, conv_out_kernel=17)
        # Trained jointly from scratch, the text encoder maps "left"/"right" and "above"/"below" to
        # nearly the same states within 500 steps (4% and 2% apart at the tokens after them, against
        # 27% and 41% at init): while the U-Net cannot use a relation, any difference it makes is noise
        # in the output, and the encoder drops it first. SD keeps its (pretrained) CLIP frozen; this
        # keeps the random one.
        c.train.train_text_encoder = False
        c.train.timestep_sampling = "logit_normal"  # 31% of steps at t > 850, against 15% uniform
        c.train.timestep_logit_mean, c.train.timestep_logit_std = 1.0, 1.5
        c.train.steps = 6000
        c.checkpoint.every = 250
    if arg == "tiny":
        c.model.unet = dict(TINY_UNET)
        c.model.text_encoder = dict(TINY_TEXT)
        c.model.vae = dict(TINY_VAE)
        c.init.path, c.init.components = "", ()
        # A random VAE's latents sit far from 0 compared with their spread; scaled by 1/std they put
        # the v target at ~5 and a few steps cannot fit that. (A trained VAE's KL keeps them centred.)
        c.init.calibrate_scaling_factor = False
        c.data.config = "tiny"
        c.train.steps, c.train.batch_size, c.train.warmup_steps = 4, 4, 1
        c.train.cache_latents = False  # tests of the tiny config exercise the encoder in the step
        c.checkpoint.every, c.log_every, c.sample_every = 2, 1, 0
        c.export.defaults = dict(sampler="euler", steps=2, guidance_scale=3.0)
    common.link_latent_channels(c)
    return c
