"""The training noise schedule's betas, as diffusers builds them: torch's float32 `linspace` and
float64-accumulated `cumprod` reproduced bit for bit, and zero-terminal-SNR rescaling. `schedules`
turns them into each sampler's sigmas and timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32), bit-exact: float32 step, each half anchored at
    its own end, fused multiply-add (emulated in float64, where the float32 product is exact)."""
    s, e = np.float32(start), np.float32(end)
    step = np.float64(np.float32((e - s) / np.float32(max(n - 1, 1))))
    idx = np.arange(n, dtype=np.float64)
    out = np.where(idx < n // 2, np.float64(s) + step * idx, np.float64(e) - step * (n - 1 - idx))
    return out.astype(np.float32)


def cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """squaredcos_cap_v2 (Nichol & Dhariwal 2021), in float64 then float32 like diffusers."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], np.float32)


def betas(cfg: Mapping) -> np.ndarray:
    """The training betas [num_train_timesteps], float32, of a resolved scheduler config."""
    n = int(cfg["num_train_timesteps"])
    if cfg["trained_betas"] is not None:
        return np.asarray(cfg["trained_betas"], np.float32)
    kind = cfg["beta_schedule"]
    if kind == "linear":
        return torch_linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
    if kind == "scaled_linear":
        return torch_linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
    if kind == "squaredcos_cap_v2":
        return cosine_betas(n)
    raise NotImplementedError(f"beta_schedule {kind!r} is not supported "
                              "(linear, scaled_linear, squaredcos_cap_v2)")


def cumprod(a: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod accumulates float32 in float64.
    return np.cumprod(a.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Alg. 1: shift/scale sqrt(alphas_cumprod) so the last one is exactly 0."""
    sqrt_ac = np.sqrt(cumprod(1.0 - betas))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac ** 2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return (1.0 - alphas).astype(np.float32)
