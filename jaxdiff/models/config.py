"""Reading a component's `config.json` dict against the defaults of the class it mirrors.

Each field's value is checked against the type of its default (an int field takes an int, a tuple
field a list, ...), widened where diffusers takes more than one type (`attention_head_dim` is an int
or one int per block; `sample_size` an int or [height, width]; a `None` default with no entry in
`WIDER_FIELDS` takes anything). A value of the wrong type raises `ValueError` naming the component
and the field, instead of failing later deep inside a module's setup (or not at all).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any

# A field's accepted types: a tuple of alternatives, each one of None, bool, int, float (an int or a
# float), str, or a one-element list [alternatives] (a JSON list, or a tuple, of such values).
Kind = tuple

# diffusers fields whose type is wider than their default's, per class (`what` of with_defaults).
_INT_OR_LIST = (int, [(int,)])
_OPTIONAL_INT = (None, int)
_OPTIONAL_STR = (None, str)
WIDER_FIELDS: dict[str, dict[str, Kind]] = {
    "UNet2DConditionModel": dict(
        sample_size=(None, int, [(int,)]), layers_per_block=_INT_OR_LIST,
        attention_head_dim=(None, int, [(int,)]), num_attention_heads=(None, int, [(int,)]),
        cross_attention_dim=_INT_OR_LIST,
        transformer_layers_per_block=(int, [(int, [(int,)])]),
        reverse_transformer_layers_per_block=(None, [(int, [(int,)])]),
        only_cross_attention=(bool, [(bool,)]), mid_block_only_cross_attention=(None, bool),
        mid_block_type=_OPTIONAL_STR, norm_num_groups=_OPTIONAL_INT,
        encoder_hid_dim=_OPTIONAL_INT, encoder_hid_dim_type=_OPTIONAL_STR, class_embed_type=_OPTIONAL_STR,
        addition_embed_type=_OPTIONAL_STR, addition_time_embed_dim=_OPTIONAL_INT,
        num_class_embeds=_OPTIONAL_INT, time_embedding_dim=_OPTIONAL_INT,
        time_embedding_act_fn=_OPTIONAL_STR, timestep_post_act=_OPTIONAL_STR, time_cond_proj_dim=_OPTIONAL_INT,
        projection_class_embeddings_input_dim=_OPTIONAL_INT, cross_attention_norm=_OPTIONAL_STR,
        addition_embed_type_num_heads=_OPTIONAL_INT, resnet_out_scale_factor=(float,),
    ),
    "AutoencoderKL": dict(
        sample_size=(int, [(int,)]), shift_factor=(None, float),
        latents_mean=(None, [(float,)]), latents_std=(None, [(float,)]),
    ),
}
# Int fields that may be negative (every other int field must be >= 0) and that must be positive.
SIGNED_FIELDS = frozenset({"freq_shift"})
POSITIVE_FIELDS = frozenset({
    "in_channels", "out_channels", "latent_channels", "block_out_channels", "norm_num_groups",
    "attention_head_dim", "num_attention_heads", "cross_attention_dim", "conv_in_kernel", "conv_out_kernel",
    "hidden_size", "intermediate_size", "vocab_size", "max_position_embeddings", "projection_dim",
    "addition_embed_type_num_heads",
})


def kind_of_default(default: Any) -> Kind | None:
    """The accepted types of a field from its default value; None (anything) for a None default."""
    if default is None:
        return None
    if isinstance(default, bool):
        return (bool, None)  # diffusers reads a null flag as false (SDXL's "upcast_attention": null)
    if isinstance(default, numbers.Integral):
        return (int,)
    if isinstance(default, numbers.Real):
        return (float,)
    if isinstance(default, str):
        return (str,)
    if isinstance(default, (list, tuple)):
        items = {kind_of_default(v) for v in default}
        return ([items.pop() if len(items) == 1 else None],) if items else ([None],)
    return None


def _article(text: str) -> str:
    return ("an " if text[0] in "aeiou" else "a ") + text


def _names(kind: Kind | None, qualifier: str, plural: bool) -> list[str]:
    q = qualifier + " " if qualifier else ""
    singular = {bool: "bool", int: q + "int", float: q + "number", str: "string"}
    if not kind:
        return ["values" if plural else "anything"]
    out = []
    for alt in kind:
        if alt is None:
            out.append("nulls" if plural else "null")
        elif isinstance(alt, list):
            name = "list of " + " or ".join(_names(alt[0], qualifier, True))
            out.append(name.replace("list", "lists", 1) if plural else _article(name))
        else:
            out.append(singular[alt] + "s" if plural else _article(singular[alt]))
    return out


def _describe(kind: Kind | None, qualifier: str = "") -> str:
    """"an int or a list of ints"; `qualifier` ("positive") goes before int and number."""
    return " or ".join(_names(kind, qualifier, False))


class _Mismatch(Exception):
    """A value not of its kind; args[0] is a range qualifier ("positive") when only the range is wrong."""


def _check(value: Any, kind: Kind | None, field: str) -> Any:
    """`value` if it is of `kind` (integral floats in int places become ints), else `_Mismatch`."""
    if kind is None:
        return value
    out_of_range = None
    for alt in kind:
        if alt is None and value is None:
            return value
        if alt is bool and (isinstance(value, bool) or isinstance(value, numbers.Integral) and value in (0, 1)):
            return bool(value)
        if alt is int and not isinstance(value, bool) and isinstance(value, numbers.Real) and (
                isinstance(value, numbers.Integral) or math.isfinite(value) and float(value).is_integer()):
            value = int(value)
            low = None if field in SIGNED_FIELDS else 1 if field in POSITIVE_FIELDS else 0
            if low is None or value >= low:
                return value
            out_of_range = "positive" if low else "non-negative"
        if alt is float and not isinstance(value, bool) and isinstance(value, numbers.Real):
            if math.isfinite(value):
                return value
            out_of_range = "finite"
        if alt is str and isinstance(value, str):
            return value
        if isinstance(alt, list) and isinstance(value, (list, tuple)):
            try:
                return type(value)(_check(v, alt[0], field) for v in value)
            except _Mismatch as e:
                out_of_range = out_of_range or e.args[0]
    raise _Mismatch(out_of_range)


def check_fields(config: Mapping[str, Any], defaults: Mapping[str, Any], what: str,
                 cls: str | None = None) -> dict[str, Any]:
    """The fields of `config` that `defaults` names, each checked against its default's type.

    `cls` (default `what`) picks the class's entry in `WIDER_FIELDS`. Raises `ValueError`
    "`what`: `field` must be ..., got ..." for the first field of the wrong type; integral floats
    in int fields are returned as ints.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{what}: the config must be a JSON object, got {type(config).__name__}")
    wider = WIDER_FIELDS.get(cls or what, {})
    out = {}
    for field, value in config.items():
        if field not in defaults:
            continue
        kind = wider.get(field, kind_of_default(defaults[field]))
        try:
            out[field] = _check(value, kind, field)
        except _Mismatch as e:
            raise ValueError(f"{what}: {field} must be {_describe(kind, e.args[0] or '')}, "
                             f"got {value!r}") from None
    return out


def with_defaults(config: Mapping[str, Any], defaults: Mapping[str, Any], what: str) -> dict[str, Any]:
    """`defaults` overridden by the keys of `config` they name; other keys warn and are ignored.

    diffusers also ignores (with a warning) keys its `__init__` does not take; `_`-prefixed keys
    are bookkeeping (`_class_name`, `_diffusers_version`). Each value is checked against the type
    of its default (`check_fields`); a wrong type raises `ValueError` naming `what` and the field.
    """
    checked = check_fields(config, defaults, f"{what} config", cls=what)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults)
    if unknown:
        warnings.warn(f"{what} config: ignoring unknown fields {unknown}", stacklevel=3)
    return {**defaults, **checked}
