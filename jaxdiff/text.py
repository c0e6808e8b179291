"""Prompts -> token ids (host side) and token ids -> U-Net conditioning (pure, jittable)."""

from __future__ import annotations

import dataclasses
import threading
import warnings
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TextConditioning:
    """Which encoder outputs a pipeline family feeds the U-Net.

    SD1.x/2.x take each encoder's last layer after the final layer norm; SDXL takes the penultimate
    layer without it, concatenated over both encoders, plus the pooled projection of the last one.
    """
    hidden_layer: int = -1
    final_norm: bool = True
    pooled: bool = False


def as_prompt_list(prompts, what: str = "prompts") -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(p, str) for p in prompts):
        return list(prompts)
    raise ValueError(f"{what} must be a string or a non-empty list of strings, got {prompts!r}")


# HF fast tokenizers keep padding/truncation settings as state on the shared Rust object, so two
# threads (the training prefetcher) calling with different settings can encode with the wrong ones.
_TOKENIZER_LOCK = threading.Lock()


def tokenize(tokenizer, prompts: Sequence[str]) -> np.ndarray:
    """Token ids [B, model_max_length], padded and truncated as diffusers does (with a warning)."""
    max_len = tokenizer.model_max_length
    with _TOKENIZER_LOCK:
        ids = tokenizer(list(prompts), padding="max_length", max_length=max_len, truncation=True).input_ids
        full = tokenizer(list(prompts)).input_ids  # unpadded, so each prompt's own length shows
    for prompt, long_ids in zip(prompts, full):
        if len(long_ids) > max_len:
            dropped_ids = long_ids[max_len - 1:-1]
            dropped = tokenizer.decode(dropped_ids)
            excerpt = dropped if len(dropped) <= 60 else dropped[:57] + "..."
            warnings.warn(f"prompt truncated to {max_len} tokens; {len(dropped_ids)} token(s) dropped, "
                          f"from: {excerpt!r}", stacklevel=3)
    return np.asarray(ids, np.int32)


class CaptionIds:
    """`tokenize` for a training input pipeline, each distinct caption tokenized once.

    A data set repeats its captions every epoch (the 50k shapes examples have 1098 distinct ones), and
    `tokenize` holds a lock around the tokenizer: 256 captions took 14 ms of the host per step on a 2-core
    CPU, spent again every step. Up to `max_entries` captions are kept (4 bytes a token plus a few
    hundred bytes of Python objects each: about 130 MB at the default and CLIP's 77 tokens); past that,
    new ones are tokenized every time they come.
    Thread-safe: two prefetch workers that miss the same caption both tokenize it, and get the same ids.
    """

    def __init__(self, tokenizer, max_entries: int = 1 << 18):
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self._ids: dict[str, np.ndarray] = {}

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        known = self._ids
        missing = [c for c in dict.fromkeys(captions) if c not in known]
        new = dict(zip(missing, tokenize(self.tokenizer, missing))) if missing else {}
        if new and len(known) + len(new) <= self.max_entries:
            known.update(new)
        return np.stack([known[c] if c in known else new[c] for c in captions])


def encode(encoders, params, ids, spec: TextConditioning):
    """Token ids per encoder -> (context [B, T, sum of widths], pooled [B, P] or None). Pure."""
    contexts, pooled = [], None
    for encoder, p, i in zip(encoders, params, ids):
        out = encoder.apply({"params": p}, i)
        if spec.final_norm and spec.hidden_layer == -1:
            contexts.append(out.last_hidden_state)
        elif spec.final_norm:
            raise ValueError("a normed hidden layer other than the last is not supported")
        else:
            contexts.append(out.hidden_states[spec.hidden_layer])
        if out.text_embeds is not None:
            pooled = out.text_embeds
    if spec.pooled and pooled is None:
        raise ValueError("this pipeline needs a pooled text embedding, but no text encoder has a "
                         "projection (CLIPTextModelWithProjection)")
    return jnp.concatenate(contexts, axis=-1), (pooled if spec.pooled else None)


def build_tokenizer(words: Sequence[str], model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A CLIP BPE tokenizer for a model trained from scratch: every byte, plus merges that make
    each of `words` one token (so a small closed vocabulary costs one embedding per word)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = []
    for word in words:
        prefix = word[0]
        for k, ch in enumerate(word[1:], start=1):  # w+o -> wo, wo+r -> wor, ... last one word-final
            piece = ch + ("</w>" if k == len(word) - 1 else "")
            merges.append((prefix, piece))
            prefix += piece
            vocab.setdefault(prefix, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>", pad_token):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), pad_token=pad_token,
                         model_max_length=model_max_length)
