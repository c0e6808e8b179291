"""Helpers for parity tests against torch reference models (diffusers, transformers)."""

from __future__ import annotations

import numpy as np
import torch

_NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)


def randomize_(module: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Overwrites every parameter with seeded random values, in place; returns `module`.

    Default init leaves norms at scale 1 / bias 0 and many biases at 0, which would hide a swapped
    or dropped tensor; here every tensor matters. Norm scales become 1 + scale * N(0, 1); other
    tensors scale * N(0, 1), shrunk for large fan-ins so that deep stacks stay well-conditioned.
    """
    gen = torch.Generator().manual_seed(seed)
    norm_scales = {id(m.weight) for m in module.modules() if isinstance(m, _NORMS) and m.weight is not None}
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            if id(p) in norm_scales:
                p.copy_(1.0 + scale * noise)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(scale * noise / max(1.0, fan_in ** 0.5 / 4))
    return module


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """The module's state dict as float32 NumPy arrays, named as torch names them."""
    return {k: v.detach().cpu().float().numpy() for k, v in module.state_dict().items()}


def assert_close_rel(actual, expected, rtol: float, what: str = "output") -> float:
    """max |actual - expected| / max |expected| <= rtol; returns that relative error."""
    actual = np.asarray(actual, np.float32)
    expected = np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    err = float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"
    return err


def nchw_to_nhwc(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


def nhwc_to_nchw(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


def port(torch_model, jax_cls, what: str):
    """(config.json dict, jaxdiff module, params) of a diffusers torch model, through the loader's
    strict conversion (a naming mistake fails here)."""
    import json

    from jaxdiff.models.params import param_shapes
    from jaxdiff.weights.convert import load_state_dict

    config = json.loads(torch_model.to_json_string())  # what the component's config.json holds
    model = jax_cls.from_config(config)
    return config, model, load_state_dict(state_dict_numpy(torch_model), param_shapes(model), what=what)
