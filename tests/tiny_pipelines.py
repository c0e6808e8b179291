"""Tiny random-weight Stable Diffusion pipelines in diffusers format, built offline for the tests.

Three families: SD1-like (epsilon, conv projections, quick_gelu CLIP), SD2-like (v-prediction, linear
projections, per-block head counts, gelu CLIP) and SDXL-like (two text encoders, text_time embedding,
two transformer layers in a block). Weights are random, so two fixes keep sampler mistakes visible
in the pixels (see `_calibrate`): the U-Net's output layer is scaled up (a random U-Net predicts
almost no noise) and the VAE's `scaling_factor` brings final latents to the decoder at about unit scale.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

WORDS = ("a", "red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle",
         "to", "the", "left", "right", "of", "above", "below", "cat", "photo")


def make_tokenizer(pad_token="<|endoftext|>"):
    from jaxdiff.text import build_tokenizer

    return build_tokenizer(WORDS, model_max_length=77, pad_token=pad_token)


def _text_encoder(tokenizer, hidden=32, layers=3, act="quick_gelu", projection_dim=None, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=projection_dim or hidden)
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection_dim else CLIPTextModel)(cfg)
    _randomize(model, 0.3, seed)
    return model.eval()


def _vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=32)
    _randomize(vae, 0.2, seed)
    return vae.eval()


def _randomize(module, scale, seed):
    """Random weights everywhere, norms included, so a mis-mapped tensor cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight",
                              "group_norm.weight", "norm_out.weight", "layer_norm.weight",
                              "layer_norm1.weight", "layer_norm2.weight", "final_layer_norm.weight")):
                p.copy_(1.0 + scale * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g) / max(1.0, p[0].numel() ** 0.5 / 4))


def _unet(kind, cross_attention_dim, seed=0):
    from diffusers import UNet2DConditionModel

    common = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                  layers_per_block=2, norm_num_groups=8, cross_attention_dim=cross_attention_dim)
    if kind == "sd1":
        cfg = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
    elif kind == "sd2":
        cfg = dict(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                   attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
    else:
        cfg = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                   use_linear_projection=True, transformer_layers_per_block=(1, 2),
                   addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=32 + 6 * 8)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**common, **cfg)
    _randomize(unet, 0.2, seed)
    return unet.eval()


# Gains fixed once by `_calibrate` below for these seeds and shapes; kept as constants so that the
# fixtures are cheap to build. `_calibrate` is what a new family would run.
OUTPUT_GAIN = {"sd1": 2.5, "sd2": 2.5, "sdxl": 2.5}
SCALING_FACTOR = {"sd1": 20.0, "sd2": 1.7, "sdxl": 19.0}


def _scale_unet_output(unet, gain):
    with torch.no_grad():
        unet.conv_out.weight.mul_(gain)
        unet.conv_out.bias.mul_(gain)


def build(kind: str, path: str, seed: int = 0):
    """Writes a tiny `kind` pipeline ("sd1" | "sd2" | "sdxl") to `path` with `save_pretrained`."""
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler,
                           StableDiffusionPipeline, StableDiffusionXLPipeline)

    sched_common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                        clip_sample=False)
    vae = _vae(seed)
    vae.register_to_config(scaling_factor=SCALING_FACTOR[kind])
    if kind == "sdxl":
        tok1 = make_tokenizer()
        tok2 = make_tokenizer(pad_token="!")
        te1 = _text_encoder(tok1, hidden=32, layers=3, act="quick_gelu", seed=seed + 1)
        te2 = _text_encoder(tok2, hidden=32, layers=3, act="gelu", projection_dim=32, seed=seed + 2)
        unet = _unet(kind, 64, seed + 3)
        _scale_unet_output(unet, OUTPUT_GAIN[kind])
        sched = EulerDiscreteScheduler(**{k: v for k, v in sched_common.items()
                                          if k not in ("set_alpha_to_one", "clip_sample")},
                                       timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2,
                                         tokenizer=tok1, tokenizer_2=tok2, unet=unet, scheduler=sched,
                                         force_zeros_for_empty_prompt=True)
    else:
        tok = make_tokenizer()
        act = "quick_gelu" if kind == "sd1" else "gelu"
        te = _text_encoder(tok, hidden=32, layers=3, act=act, seed=seed + 1)
        unet = _unet(kind, 32, seed + 3)
        _scale_unet_output(unet, OUTPUT_GAIN[kind])
        if kind == "sd1":
            sched = PNDMScheduler(**{k: v for k, v in sched_common.items() if k != "clip_sample"},
                                  skip_prk_steps=True)
        else:
            sched = DDIMScheduler(**sched_common, prediction_type="v_prediction")
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe


def _calibrate(kind, path):
    """Prints the latent and pixel statistics that OUTPUT_GAIN and SCALING_FACTOR were chosen from."""
    from diffusers import EulerDiscreteScheduler

    pipe = build(kind, path)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    out = pipe(["a red circle", "a blue square"], num_inference_steps=10, guidance_scale=5.0,
               height=48, width=80, generator=g, output_type="latent")
    lat = out.images
    with torch.no_grad():
        unet_out = pipe.unet(torch.randn(2, 4, 6, 10), 500, encoder_hidden_states=torch.randn(
            2, 77, pipe.unet.config.cross_attention_dim),
            added_cond_kwargs={"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
            if kind == "sdxl" else None).sample
        pix = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
    print(json.dumps({"kind": kind, "unet_out_std": float(unet_out.std()),
                      "latent_std": float(lat.std()), "pixel_std": float(pix.std()),
                      "pixel_clipped": float((pix.abs() > 1).float().mean())}))


if __name__ == "__main__":
    import tempfile

    for k in ("sd1", "sd2", "sdxl"):
        with tempfile.TemporaryDirectory() as d:
            _calibrate(k, os.path.join(d, k))
