"""The bundled shapes model's components as diffusers config dicts, in one place: the stage configs
(shapes_vae.py, shapes_clip.py, shapes_unet.py) each build a whole pipeline from them, and their `tiny`
variants share the TINY_* sizes (seconds per step, for tests).

Why these sizes: the model card (jaxdiff/assets/shapes_model/README.md) and
docs/research/relation-learning.md.
"""

from configs import common

# f=4, not SD's f=8: the smallest spec object is 11 pixels, under 1.5 latent cells at f=8, and an f=8 VAE
# trained for 1800 steps gave back squares with rounded corners (the project's detector read 20% of its
# reconstructions right); at f=4 the smallest object spans almost 3 cells. 8 latent channels, not SD's 4:
# with 4, a green object on gray was the faintest thing in the latents (a latent difference from the
# background of 8.2, against 10.8-20.9 for the other colours), and both the VAE (52 of 85 round trips) and
# every U-Net trained on it drew it as a blob; with 8 it is 16.1, within the others' range, and the round
# trip gives back 84 of 85.
VAE = dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=8,
           block_out_channels=(16, 32, 64), layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
           norm_num_groups=4, sample_size=64, scaling_factor=1.0)
# 4 groups: 4+ channels per GroupNorm group, as in SD (128 channels / 32 groups). With one channel per
# group the norm is an instance norm, which strips each channel's per-image level: on flat images that
# is the colour itself, and reconstructions came back in one muddy average colour.

# 16x16 latents. Each level costs about the same (channels double as the side halves); no attention at
# 16x16, where a shape's outline is drawn, cross-attention at 8x8 and 4x4, where objects are placed.
# 8 norm groups keep 4+ channels per group (see VAE above on instance norms).
UNET = dict(_class_name="UNet2DConditionModel", sample_size=16,
            in_channels=VAE["latent_channels"], out_channels=VAE["latent_channels"],
            block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=128, attention_head_dim=4)
TEXT_ENCODER = dict(architectures=["CLIPTextModel"], hidden_size=128, intermediate_size=512,
                    num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu",
                    projection_dim=128)

# v-prediction on a zero-terminal-SNR schedule (Lin et al. 2024, "Common Diffusion Noise Schedules
# and Sample Steps Are Flawed"; diffusers' rescale_betas_zero_snr + trailing timesteps).
# - At SD's last timestep the latents keep sqrt(0.0047) of their signal. A shapes object covers
#   4x4 of the 16x16 latents, so its 64 values add up to an SNR near 1: the model learns to find
#   objects in the "noise" at t=999, and sampling from pure noise then finds them wherever the
#   noise happens to look like one: extra objects, and relations the prompt did not ask for.
# - Zero SNR needs v-prediction (an epsilon model's clean-image estimate divides by 0 there); it
#   also weighs the error of the implied clean image by SNR + 1 instead of the SNR (epsilon), so
#   the high-noise steps, where the layout is decided, are learned with full weight.
SCHEDULER = dict(common.SD_SCHEDULER, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                 timestep_spacing="trailing")

# The `tiny` variants' components.
TINY_VAE = dict(VAE, block_out_channels=(8, 8, 16), norm_num_groups=4)
TINY_UNET = dict(_class_name="UNet2DConditionModel", sample_size=16, in_channels=4, out_channels=4,
                 block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                 attention_head_dim=2)
TINY_TEXT = dict(architectures=["CLIPTextModel"], hidden_size=16, intermediate_size=32,
                 num_hidden_layers=1, num_attention_heads=2, hidden_act="quick_gelu")
