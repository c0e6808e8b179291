"""jaxdiff.models.clip against transformers' CLIPTextModel / CLIPTextModelWithProjection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxdiff.models.clip import ACTIVATIONS, CLIPTextModel, CLIPTextOutput, canonical_state_dict
from jaxdiff.weights.convert import WeightError, load_state_dict

VOCAB, EOS, PAD = 1000, 7, 5


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    # Default init leaves layer norms at 1/0 and biases at 0, which would hide swapped or dropped
    # affine params; random values everywhere make every tensor matter.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _assert_close_rel(actual, expected, rtol: float, what: str) -> None:
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


def _build(hidden_act: str, eos_token_id: int, layers: int, with_projection: bool, seed: int):
    """A randomized tiny torch model, its config.json dict and the jaxdiff model and params."""
    cfg = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=37, projection_dim=24,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
        hidden_act=hidden_act, layer_norm_eps=1e-5, bos_token_id=6, eos_token_id=eos_token_id,
        pad_token_id=PAD, attn_implementation="eager")
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    torch_model = cls(cfg).eval()
    _randomize(torch_model, seed)
    config = {**cfg.to_dict(), "architectures": [cls.__name__]}
    model = CLIPTextModel.from_config(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
    tensors = canonical_state_dict({k: v.numpy() for k, v in torch_model.state_dict().items()})
    params = load_state_dict(tensors, shapes, what="text_encoder", ignore=[r"position_ids$"])
    return torch_model, config, model, params


def _input_ids(eos_token_id: int, seq_len: int, seed: int) -> np.ndarray:
    """Three different sequences: BOS, tokens, end token, then padding to seq_len.

    The end token is the EOS id, or for legacy eos_token_id=2 configs the largest id (as CLIP's
    49407 is). Row 1 pads with the end token, as SD's tokenizer does: the first one must win.
    """
    end = VOCAB - 1 if eos_token_id == 2 else eos_token_id
    rng = np.random.default_rng(seed)
    ids = np.full((3, seq_len), PAD, np.int32)
    for row, n in enumerate([3, seq_len // 2, seq_len - 2]):
        ids[row, 0] = 6
        ids[row, 1:n + 1] = rng.integers(10, VOCAB - 1, n)
        ids[row, n + 1] = end
    ids[1, seq_len // 2 + 1:] = end
    return ids


def _torch_forward(torch_model, ids: np.ndarray) -> dict:
    """Reference outputs; the projection model's own output has no pooler_output, so that comes
    from its inner text_model."""
    text_model = getattr(torch_model, "text_model", torch_model)
    input_ids = torch.from_numpy(ids).long()
    with torch.no_grad():
        ref = text_model(input_ids, output_hidden_states=True)
        out = {"last_hidden_state": ref.last_hidden_state, "pooler_output": ref.pooler_output,
               "hidden_states": ref.hidden_states, "text_embeds": None}
        if text_model is not torch_model:
            out["text_embeds"] = torch_model(input_ids).text_embeds
    return out


CASES = [
    # hidden_act, eos_token_id, layers, with_projection
    ("quick_gelu", 2, 2, False),       # SD 1.x: legacy eos id, pooled at argmax(input_ids)
    ("gelu", EOS, 3, True),            # SDXL text_encoder_2: first EOS, projection
    ("gelu_new", EOS, 2, False),
]


@pytest.mark.parametrize("hidden_act,eos_token_id,layers,with_projection", CASES)
def test_matches_transformers(hidden_act, eos_token_id, layers, with_projection):
    torch_model, _, model, params = _build(hidden_act, eos_token_id, layers, with_projection, seed=layers)
    apply = jax.jit(model.apply)
    for seq_len in (77, 19):
        ids = _input_ids(eos_token_id, seq_len, seed=seq_len)
        ref = _torch_forward(torch_model, ids)
        out = apply({"params": params}, jnp.asarray(ids))
        assert isinstance(out, CLIPTextOutput)
        assert len(out.hidden_states) == layers + 1 == len(ref["hidden_states"])
        where = f"{hidden_act} T={seq_len}"
        for name in ("last_hidden_state", "pooler_output"):
            _assert_close_rel(getattr(out, name), ref[name], 1e-4, f"{name} {where}")
        for i, (h, h_ref) in enumerate(zip(out.hidden_states, ref["hidden_states"])):
            _assert_close_rel(h, h_ref, 1e-4, f"hidden_states[{i}] {where}")
        if with_projection:
            _assert_close_rel(out.text_embeds, ref["text_embeds"], 1e-4, f"text_embeds {where}")
        else:
            assert out.text_embeds is None


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_matches_transformers(name):
    # Directly, over a wide range: inside the tiny models the pre-activations are too small for
    # gelu and its tanh approximation ("gelu_new") to differ beyond the 1e-4 tolerance.
    x = np.linspace(-8, 8, 2001, dtype=np.float32)
    ref = transformers.activations.ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ACTIVATIONS[name](jnp.asarray(x)), ref, rtol=1e-6, atol=1e-6)


def test_pools_first_eos():
    ids = np.array([[6, 11, EOS, EOS, EOS], [6, EOS, 12, EOS, PAD], [6, 11, 12, 13, EOS]], np.int32)
    _, _, model, params = _build("quick_gelu", EOS, 2, False, seed=0)
    out = model.apply({"params": params}, jnp.asarray(ids))
    np.testing.assert_array_equal(out.pooler_output, out.last_hidden_state[np.arange(3), [2, 1, 4]])


def test_with_projection_from_architectures_and_override():
    config = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
              "architectures": ["CLIPTextModelWithProjection"]}
    assert CLIPTextModel.from_config(config).with_projection
    assert not CLIPTextModel.from_config(config, with_projection=False).with_projection
    assert not CLIPTextModel.from_config({**config, "architectures": ["CLIPTextModel"]}).with_projection


def test_missing_tensor_raises_weight_error():
    torch_model, _, model, _ = _build("quick_gelu", 2, 2, True, seed=1)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
    tensors = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    del tensors["text_model.encoder.layers.1.mlp.fc2.weight"]
    with pytest.raises(WeightError, match=r"text_model\.encoder\.layers\.1\.mlp\.fc2\.weight"):
        load_state_dict(tensors, shapes, what="text_encoder", ignore=[r"position_ids$"])


def test_bfloat16_compute():
    torch_model, config, _, params = _build("gelu", EOS, 2, True, seed=3)
    model = CLIPTextModel.from_config(config, dtype=jnp.bfloat16)
    ids = _input_ids(EOS, 77, seed=0)
    ref = _torch_forward(torch_model, ids)
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
    assert out.last_hidden_state.dtype == jnp.bfloat16
    _assert_close_rel(out.last_hidden_state, ref["last_hidden_state"], 3e-2, "bf16 last_hidden_state")
    _assert_close_rel(out.text_embeds, ref["text_embeds"], 3e-2, "bf16 text_embeds")
