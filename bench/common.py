"""Shared pieces of the jaxdiff-against-diffusers benchmarks (unet_speed.py, txt2img_speed.py,
gpu_suite.py): the model configs, written out here and never downloaded; random-weight diffusers
models and pipelines built from them; the diffusers scheduler that matches a jaxdiff sampler; and
timing, memory, FLOP and table helpers.

The configs are those of the released models' components (Stable Diffusion 1.5: the U-Net is
diffusers' `UNet2DConditionModel` defaults with `cross_attention_dim=768`, the text encoder is
CLIP ViT-L/14's; SDXL base: its U-Net, its two text encoders and its VAE). Weights are random
(PyTorch's default initialisation): speed does not depend on them. The tokenizers are small
(`jaxdiff.text.build_tokenizer` on a few words): the text encoders still see 77 tokens, so the
vocabulary's size changes nothing but the size of one embedding table.

Heavy modules (torch, diffusers, jax) are imported inside the functions, so that a script's
`--help` answers at once.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_jaxdiff_importable() -> None:
    """Puts the repository root on sys.path when jaxdiff is not installed (a bare checkout, such as
    a copy on a GPU host)."""
    try:
        import jaxdiff  # noqa: F401
    except ImportError:
        sys.path.insert(0, REPO)


# ------------------------------------------------------------------------------------------------
# Configs

SCHEDULER_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                       beta_schedule="scaled_linear", steps_offset=1, prediction_type="epsilon")

# UNet2DConditionModel's defaults with cross_attention_dim=768 (runwayml/stable-diffusion-v1-5 unet).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768,
    attention_head_dim=8, use_linear_projection=False)

# The SD 1.x/2.x VAE (AutoencoderKL, 83.7M parameters).
SD_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512,
    scaling_factor=0.18215)

# CLIP ViT-L/14's text tower (SD 1.x and SDXL's first encoder). Not `CLIPTextConfig()`: its defaults
# are ViT-B/32's (512 wide, 8 heads).
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                   projection_dim=768)
# OpenCLIP ViT-bigG/14's text tower (SDXL's second encoder, with its projection).
CLIP_BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                      projection_dim=1280)

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that matter; the rest are
# UNet2DConditionModel's defaults there too).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    upcast_attention=False)

# SDXL's VAE: SD's with another scaling factor. force_upcast=False (as in the fp16-fix VAE): with
# True, diffusers' SDXL pipeline decodes in float32 when the VAE is float16, while jaxdiff decodes
# in its compute dtype, and the comparison would time different precisions.
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=False)

# Tiny stand-ins of the same architectures (the shapes of tests/tiny_pipelines.py), for --quick
# and --tiny runs that check a script in seconds.
TINY_UNET_COMMON = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                        layers_per_block=2, norm_num_groups=8)
TINY_SD15_UNET = dict(TINY_UNET_COMMON, cross_attention_dim=32, attention_head_dim=4,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_SDXL_UNET = dict(TINY_UNET_COMMON, cross_attention_dim=64, attention_head_dim=(2, 4),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                      transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                      addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=1, norm_num_groups=4, sample_size=64)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32)

ARCHS = ("sd15", "sdxl")


def arch_configs(arch: str, tiny: bool = False) -> dict:
    """The component configs of `arch` ("sd15" | "sdxl"): unet, vae, text_encoders (a list of
    (config, with_projection, pad_token)), scheduler (the released model's, as a dict), and the
    native image size."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if arch == "sd15":
        return dict(
            pipeline="StableDiffusionPipeline",
            unet=TINY_SD15_UNET if tiny else SD15_UNET, vae=TINY_VAE if tiny else SD_VAE,
            text_encoders=[(TINY_TEXT if tiny else CLIP_L_TEXT, False, "<|endoftext|>")],
            scheduler=dict(_class_name="PNDMScheduler", **SCHEDULER_BETAS, skip_prk_steps=True,
                           set_alpha_to_one=False),
            size=64 if tiny else 512)
    return dict(
        pipeline="StableDiffusionXLPipeline",
        unet=TINY_SDXL_UNET if tiny else SDXL_UNET,
        vae=dict(TINY_VAE, scaling_factor=0.13025, force_upcast=False) if tiny else SDXL_VAE,
        text_encoders=[(TINY_TEXT if tiny else CLIP_L_TEXT, False, "<|endoftext|>"),
                       (dict(TINY_TEXT, hidden_act="gelu") if tiny else CLIP_BIGG_TEXT, True, "!")],
        scheduler=dict(_class_name="EulerDiscreteScheduler", **SCHEDULER_BETAS, timestep_spacing="leading",
                       interpolation_type="linear", use_karras_sigmas=False),
        size=64 if tiny else 1024)


# ------------------------------------------------------------------------------------------------
# Random-weight diffusers models

PROMPT = "a photo of a cat to the left of a red square"
WORDS = ("a", "photo", "of", "cat", "to", "the", "left", "right", "red", "blue", "square", "circle")


def make_tokenizer(pad_token: str = "<|endoftext|>"):
    from jaxdiff.text import build_tokenizer

    return build_tokenizer(WORDS, model_max_length=77, pad_token=pad_token)


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def jax_dtype(name: str):
    import jax.numpy as jnp

    return {"fp32": jnp.float32, "fp16": jnp.float16, "bf16": jnp.bfloat16}[name]


def build_unet(config: dict, device: str = "cpu", dtype=None, seed: int = 0):
    """A diffusers UNet2DConditionModel of `config`, random weights, built on `device`."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    return _cast(unet, dtype).eval()


def _cast(module, dtype):
    import torch

    # Only when needed: diffusers warns on every .to(dtype) call.
    return module if dtype in (None, torch.float32) else module.to(dtype=dtype)


def build_pipeline(arch: str, tiny: bool = False, device: str = "cpu", dtype=None, seed: int = 0):
    """A diffusers StableDiffusion(XL)Pipeline of `arch` with random weights, built on `device` in
    `dtype` (default float32), with the released model's scheduler."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = arch_configs(arch, tiny)
    torch.manual_seed(seed)
    tokenizers, encoders = [], []
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(**cfg["unet"])
        vae = diffusers.AutoencoderKL(**cfg["vae"])
        for text_cfg, projection, pad in cfg["text_encoders"]:
            tok = make_tokenizer(pad)
            config = CLIPTextConfig(**text_cfg, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
            tokenizers.append(tok)
            encoders.append(model)
    unet, vae = _cast(unet, dtype).eval(), _cast(vae, dtype).eval()
    encoders = [_cast(m, dtype).eval() for m in encoders]
    sched_cfg = dict(cfg["scheduler"])
    scheduler = getattr(diffusers, sched_cfg.pop("_class_name")).from_config(sched_cfg)
    if arch == "sd15":
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def use_counterpart_scheduler(pipe, sampler: str, folder: str) -> str:
    """Gives the diffusers pipeline the scheduler that jaxdiff's `sampler` reproduces, from the
    scheduler config saved in `folder` (what jaxdiff.load reads); returns its class name.

    From the saved file, not from `pipe.scheduler.config`: in memory, a config keeps the values its
    class only took as defaults in `_use_default_values`, and `from_config` of another class drops
    them (PNDM's timestep_spacing "leading" becomes Euler's "linspace"); `save_pretrained` writes
    them out as plain values, so a pipeline loaded from the folder keeps them, as jaxdiff does.
    """
    import diffusers

    from jaxdiff.sampling import schedules

    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        config = json.load(f)
    cls, overrides = schedules.counterpart(sampler)
    pipe.scheduler = getattr(diffusers, cls).from_config(config, **overrides)
    return cls


class Txt2Img:
    """The two text-to-image calls of one case, on the same prompts and the same starting noise:
    `diffusers()` and `jaxdiff()` each return images [B, H, W, 3] in [0, 1] (NumPy).

    `ref` is a diffusers pipeline (its scheduler already the counterpart of `sampler`), `pipe` a
    jaxdiff Pipeline of the same weights. A jaxdiff image that comes out NaN (random weights in a
    low precision) is counted in `nonfinite`, not raised: the time is what it is.
    """

    def __init__(self, ref, pipe, batch: int, size: int, steps: int, guidance: float, sampler: str,
                 seed: int = 0, prompt: str = PROMPT, progress_every: int = 0):
        import numpy as np
        import torch

        f, c = pipe.models.vae_scale_factor, pipe.models.latent_channels
        self.noise = np.random.default_rng(seed).standard_normal((batch, size // f, size // f, c), dtype=np.float32)
        self.latents = torch.from_numpy(self.noise.transpose(0, 3, 1, 2).copy()).to(ref.device, ref.unet.dtype)
        self.prompts = [prompt] * batch
        self.ref, self.pipe = ref, pipe
        self.kw = dict(height=size, width=size, guidance_scale=guidance)
        self.steps, self.sampler = steps, sampler
        self.nonfinite = 0
        self.progress_every = progress_every  # > 0: log every that many diffusers steps

    def _step_end(self, pipe, i, t, kwargs):
        if (i + 1) % self.progress_every == 0 or i + 1 == self.steps:
            log(f"  diffusers step {i + 1}/{self.steps}")
        return kwargs

    def diffusers(self):
        import torch

        extra = {"callback_on_step_end": self._step_end} if self.progress_every else {}
        with torch.inference_mode():
            return self.ref(self.prompts, num_inference_steps=self.steps, latents=self.latents,
                            output_type="np", **self.kw, **extra).images

    def jaxdiff(self):
        from jaxdiff.pipeline import NonFiniteImageError

        try:
            return self.pipe.generate(self.prompts, steps=self.steps, sampler=self.sampler,
                                      latents=self.noise, **self.kw)
        except NonFiniteImageError:
            self.nonfinite += 1
            return None


def max_abs_diff(a, b) -> float | None:
    import numpy as np

    if a is None or b is None:
        return None
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.nanmax(np.abs(a - b))) if a.shape == b.shape else None


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def port_unet(torch_unet, dtype=None):
    """(jaxdiff UNet2DConditionModel, params as device arrays) of a diffusers U-Net, through the
    loader's strict conversion. Computes in `dtype`; params in bfloat16 when that is bfloat16,
    float32 otherwise, as `jaxdiff.load(dtype=...)` keeps them."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.models.params import param_shapes
    from jaxdiff.models.unet import UNet2DConditionModel
    from jaxdiff.weights.convert import load_state_dict

    dtype = dtype or jnp.float32
    param_dtype = jnp.bfloat16 if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) else jnp.float32
    config = json.loads(torch_unet.to_json_string())
    model = UNet2DConditionModel.from_config(config, dtype=dtype)
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype)
                          if jnp.issubdtype(s.dtype, jnp.floating) else s, param_shapes(model))
    state = {k: v.detach().float().cpu().numpy() for k, v in torch_unet.state_dict().items()}
    params = load_state_dict(state, shapes, what="unet")
    del state
    return model, jax.tree.map(jnp.asarray, params)


def param_dtypes(params) -> str:
    """The dtypes of a params pytree's leaves, e.g. "bfloat16" or "bfloat16, float32"."""
    import jax

    return ", ".join(sorted({str(x.dtype) for x in jax.tree.leaves(params)}))


# ------------------------------------------------------------------------------------------------
# Measuring

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line with the wall-clock time and the seconds since the script started."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def median(xs):
    return statistics.median(xs) if xs else None


def peak_rss_gb() -> float:
    """The process's peak resident set size so far (getrusage ru_maxrss: KiB on Linux), in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def xla_flops(stage) -> float | None:
    """FLOPs of a `jax.stages.Lowered` or `Compiled` by XLA's cost analysis (dots and convolutions
    as 2 * multiply-adds; a custom call such as a fused-attention kernel counts 0)."""
    analysis = stage.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None else None


def torch_flops(fn) -> float | None:
    """FLOPs counted by torch.utils.flop_counter while running `fn()` (matmuls, convolutions and
    the attention kernels torch knows), or None if the counter is unavailable."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def fmt(value, spec: str = ".3f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def fmt_flops(value) -> str:
    if value is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g}"


def markdown_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
