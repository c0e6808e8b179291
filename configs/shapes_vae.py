"""Stage 1 of the bundled model: a small f=4 VAE on 64x64 shapes images (16x16x8 latents).

f=4, not SD's f=8: the smallest spec object is 11 pixels, under 1.5 latent cells at f=8, and an f=8 VAE
trained for 1800 steps gave back squares with rounded corners (the project's detector read 20% of its
reconstructions right); at f=4 the smallest object spans almost 3 cells. 8 latent channels, not SD's 4:
with 4, a green object on gray was the faintest thing in the latents (a latent difference from the
background of 8.2, against 10.8-20.9 for the other colours), and both the VAE (52 of 85 round trips) and
every U-Net trained on it drew it as a blob; with 8 it is 16.1, within the others' range, and the round
trip gives back 84 of 85 (README, Training).

    python main.py train --config configs/shapes_vae.py --workdir runs/shapes_vae
    python main.py train --config configs/shapes_vae.py:decoder --workdir runs/shapes_vae_decoder \
        --config.init.path=runs/shapes_vae
    python main.py train --config configs/shapes_vae.py:tiny ...   # seconds, for tests
"""

from configs import common

VAE = dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=8,
           block_out_channels=(16, 32, 64), layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
           norm_num_groups=4, sample_size=64, scaling_factor=1.0)
# 4 groups: 4+ channels per GroupNorm group, as in SD (128 channels / 32 groups). With one channel per
# group the norm is an instance norm, which strips each channel's per-image level: on flat images that
# is the colour itself, and reconstructions came back in one muddy average colour.


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
        from configs import shapes_unet  # (it imports this module)

        c.init.path = "jaxdiff/assets/shapes_model"
        c.init.components = ("vae", "unet", "text_encoders")
        c.model.scheduler = shapes_unet.get_config().model.scheduler.to_dict()
        c.train.frozen = ("vae/encoder", "vae/quant_conv")
        # 0: a fifth of the steps keep the encoder's own latents, so real latents still decode right.
        c.train.redraw_strengths = (0.0, 0.15, 0.3, 0.45, 0.6)
        # The shipped decoder's 1200 steps (29-37 min on 2 CPU cores); 2400 scored the same (README).
        c.train.steps, c.train.learning_rate, c.train.lr_schedule = 1200, 2e-4, "constant"
        # The shipped defaults, so the decoder learns the latents the shipped sampler draws. A stochastic
        # sampler: its fresh noise each step undoes part of the U-Net's errors (README "Sampler").
        c.export.defaults = dict(sampler="dpmpp_2m_sde", steps=30, guidance_scale=2.0)
    if arg == "tiny":
        c.model.vae = dict(VAE, block_out_channels=(8, 8, 16), norm_num_groups=4)
        c.data.config = "tiny"
        c.train.steps, c.train.batch_size, c.train.warmup_steps = 4, 4, 1
        c.checkpoint.every, c.log_every, c.sample_every = 2, 1, 0
    common.link_latent_channels(c)
    return c


TINY_UNET = dict(_class_name="UNet2DConditionModel", sample_size=16, in_channels=4, out_channels=4,
                 block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                 attention_head_dim=2)
TINY_TEXT = dict(architectures=["CLIPTextModel"], hidden_size=16, intermediate_size=32,
                 num_hidden_layers=1, num_attention_heads=2, hidden_act="quick_gelu")
