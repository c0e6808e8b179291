"""How big a request may be: a pixel cap and an estimate of the largest buffers a generation needs,
checked on the host before anything compiles. Without it a 100000x100000 request aborts the process
inside XLA (or asks for a terabyte-sized attention matrix) instead of saying why.

The estimate counts what dominates at large sizes: the attention score matrices (float32, one
[rows, heads, T, T] block per attention layer at a time, T the tokens of its level) of the U-Net's
first attention level and of the VAE's mid-block, and the VAE decoder's full-resolution
activations. It is a floor, not a bound: a request it refuses cannot fit; one it lets through
usually does.
"""

from __future__ import annotations

import math
import os

import jax

from jaxdiff.components import PipelineConfigs

# Pixels per image a request may ask for unless the caller raises the cap (4096 x 4096).
DEFAULT_MAX_PIXELS = 4096 * 4096
# Images one request may ask for: checked before the prompts are repeated per image.
MAX_BATCH = 4096
_FLOAT32 = 4


def _as_list(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def peak_bytes(configs: PipelineConfigs, rows: int, height: int, width: int, guidance: bool) -> int:
    """The largest buffer, in bytes, that generating `rows` images of height x width needs."""
    unet, vae = configs.unet, configs.vae
    factor = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
    latent_tokens = (height // factor) * (width // factor)
    unet_rows = rows * (2 if guidance else 1)  # the uncond and cond halves run as one batch
    down = list(unet.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    heads = _as_list(unet.get("num_attention_heads") or unet.get("attention_head_dim", 8), len(down))
    unet_attention = max((unet_rows * int(h) * (latent_tokens // 4 ** i) ** 2 * _FLOAT32
                          for i, (kind, h) in enumerate(zip(down, heads)) if "Attn" in kind), default=0)
    vae_attention = rows * latent_tokens ** 2 * _FLOAT32  # one head over every latent position
    full_width = int(list(vae.get("block_out_channels", (128,)))[0])
    decoder = 3 * rows * height * width * full_width * _FLOAT32  # a conv's input, output and norm
    return max(unet_attention, vae_attention, decoder)


def device_memory_bytes() -> int | None:
    """Memory one device can hold: an accelerator's own limit, or the host's RAM for CPU devices."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError


def check_request(configs: PipelineConfigs, batch: int, height: int, width: int, guidance: bool,
                  devices: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
    """Raises ValueError, with the numbers, for a request over the pixel cap or one whose largest
    buffer cannot fit in one device's memory (the batch is split over `devices`)."""
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                   or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive int or None (no cap), got {max_pixels!r}")
    if max_pixels is not None and height * width > max_pixels:
        raise ValueError(f"{height}x{width} is {height * width:,} pixels per image, over the cap of "
                         f"{max_pixels:,} (about {math.isqrt(max_pixels)}x{math.isqrt(max_pixels)}); "
                         "lower the size, or raise the cap (max_pixels=, --max-pixels)")
    rows = -(-batch // devices)
    need, have = peak_bytes(configs, rows, height, width, guidance), device_memory_bytes()
    if have is not None and need > have:
        raise ValueError(f"{batch} image(s) of {height}x{width} need at least {_human(need)} for one "
                         f"buffer (attention or the decoder's activations) on each device, but a device "
                         f"has {_human(have)}; lower the size or the batch")
