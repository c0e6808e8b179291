"""jax's persistent compilation cache for jaxdiff's programs, in ~/.cache/jaxdiff/xla (XDG_CACHE_HOME is
honoured), turned on by `pipeline.load` and `train.loop.train`.

Compiling is most of a short command's time: the second `jaxdiff generate` of the bundled model takes
10 s instead of 16 on 2 cores, and a resumed or repeated training stage skips its train step's compile.
XLA:CPU checks an entry's target CPU features before it loads it and compiles afresh on a mismatch
(some Intel CPUs fail that check on every entry and log an error line for each: jax issue 38445).

Opting out: JAXDIFF_COMPILE_CACHE=0. JAX_COMPILATION_CACHE_DIR, when set, wins (jax reads it itself:
a folder all hosts of a pod share, or empty to turn the cache off); so does a cache directory the
program configured itself before.
"""

from __future__ import annotations

import os

import jax

MAX_BYTES = 1 << 30  # least recently used entries go first


def enable() -> str | None:
    """Turns the cache on unless opted out or configured elsewhere; returns its folder (None: off or
    not ours). Idempotent."""
    if os.environ.get("JAXDIFF_COMPILE_CACHE", "1").lower() in ("0", "false", "no", "off"):
        return None
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return None
    configured = jax.config.jax_compilation_cache_dir
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    ours = os.path.join(base, "jaxdiff", "xla")
    if configured and configured != ours:
        return None  # the program chose its own folder
    if not configured:
        jax.config.update("jax_compilation_cache_dir", ours)
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return ours
