"""Reading a component's `config.json` dict against the defaults of the class it mirrors."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any


def with_defaults(config: Mapping[str, Any], defaults: Mapping[str, Any], what: str) -> dict[str, Any]:
    """`defaults` overridden by the keys of `config` they name; other keys warn and are ignored.

    diffusers also ignores (with a warning) keys its `__init__` does not take; `_`-prefixed keys
    are bookkeeping (`_class_name`, `_diffusers_version`).
    """
    unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults)
    if unknown:
        warnings.warn(f"{what} config: ignoring unknown fields {unknown}", stacklevel=3)
    return {**defaults, **{k: v for k, v in config.items() if k in defaults}}
