"""Stage 1 of the bundled model: a small f=8 VAE on 64x64 shapes images (8x8x4 latents).

    python main.py train --config configs/shapes_vae.py --workdir runs/shapes_vae
    python main.py train --config configs/shapes_vae.py:tiny ...   # seconds, for tests
"""

from configs import common

VAE = dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=4,
           block_out_channels=(16, 32, 64, 64), layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           norm_num_groups=16, sample_size=64, scaling_factor=1.0)


def get_config(arg=None):
    c = common.base_config()
    c.mode = "vae"
    c.model.vae = dict(VAE)
    # The U-Net and text encoder exist (a run is a whole pipeline) but are not trained here.
    c.model.unet = dict(TINY_UNET)
    c.model.text_encoder = dict(TINY_TEXT)
    c.train.steps = 3000
    c.train.batch_size = 32
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 100
    c.train.ema_decay = 0.99
    c.sample_every = 500
    if arg == "tiny":
        c.model.vae = dict(VAE, block_out_channels=(8, 8, 16, 16), norm_num_groups=4)
        c.data.config = "tiny"
        c.train.steps, c.train.batch_size, c.train.warmup_steps = 4, 4, 1
        c.checkpoint.every, c.log_every, c.sample_every = 2, 1, 0
    return c


TINY_UNET = dict(_class_name="UNet2DConditionModel", sample_size=8, in_channels=4, out_channels=4,
                 block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                 attention_head_dim=2)
TINY_TEXT = dict(architectures=["CLIPTextModel"], hidden_size=16, intermediate_size=32,
                 num_hidden_layers=1, num_attention_heads=2, hidden_act="quick_gelu")
