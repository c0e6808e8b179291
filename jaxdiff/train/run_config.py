"""A training run's config: a `configs/NAME.py[:ARG]` file's `get_config(ARG)`, with the command
line's `--config.KEY=VALUE` overrides read as ml_collections' config_flags reads them (without absl).

    config = load_config("configs/shapes_unet.py:tiny")
    override_config(config, [("train.steps", "100")])
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import os
import sys

OVERRIDE = "--config."  # --config.KEY=VALUE, --config.KEY VALUE


def load_config(spec: str):
    """`configs/NAME.py[:ARG]` -> the file's `get_config(ARG)`, or `get_config()` without `:ARG`.

    A file in a package folder (configs/ has an __init__.py) is loaded as that package's module, with
    the package's parent folder on sys.path: its `from configs import common` then works from any
    working directory, the installed `jaxdiff` command's too.
    """
    import ml_collections

    path, colon, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"cannot load --config {spec}: no such file")
    folder, name = os.path.split(os.path.abspath(path))
    names = [os.path.splitext(name)[0]]
    while os.path.isfile(os.path.join(folder, "__init__.py")):
        folder, package = os.path.split(folder)
        names.insert(0, package)
    if len(names) > 1 and folder not in sys.path:
        sys.path.insert(0, folder)
    module_spec = importlib.util.spec_from_file_location(".".join(names), path)
    if module_spec is None:
        raise ValueError(f"cannot load --config {spec}: not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ValueError(f"cannot load --config {spec}: {path} has no get_config()")
    if colon and not inspect.signature(get_config).parameters:
        raise ValueError(f"--config {spec}: get_config() of {path} takes no argument; drop ':{arg}'")
    try:
        config = get_config(arg) if colon else get_config()
    except ValueError as e:  # a config's own check (an unknown variant): one line
        raise ValueError(f"--config {spec}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"--config {spec}: get_config() returned a {type(config).__name__}, "
                         "not an ml_collections.ConfigDict")
    return config


def split_overrides(argv):
    """argv -> (the rest, [(KEY, VALUE), ...]): each `--config.KEY=VALUE` or `--config.KEY VALUE` taken
    out, in order. VALUE is None for a `--config.KEY` with no value (followed by an option or nothing),
    which a bool field reads as True."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg.startswith(OVERRIDE):
            key, eq, value = arg[len(OVERRIDE):].partition("=")
            if not eq:
                value = None
                if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    i += 1
                    value = argv[i]
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def override_config(config, overrides) -> None:
    """Sets each (KEY, VALUE) of `overrides` (strings, as on the command line) on `config`, as
    ml_collections' config_flags does: VALUE is read as the type of the field it replaces

    - int, float: as absl reads them (an int may be 0x.., 0o.., 0b..);
    - bool: true/false, t/f, 1/0 (any case), or no value at all for True;
    - str: as given, never evaluated;
    - tuple: a Python literal ('("vae","text_encoders")', '(64,128,256)'); a single element alone is
      a 1-tuple; a KEY given more than once adds its elements up;
    - a group of fields: a dict literal, which replaces the whole group;
    - anything else (a None field): a Python literal, else the string as given.

    A KEY the config lacks is a ValueError naming it (and the nearest field there is); so is a value
    its field's type cannot read. A later override of a group must not undo an earlier one inside it.
    """
    keys = [key for key, _ in overrides]
    for i, inner in enumerate(keys):
        for outer in keys[i + 1:]:
            if inner.startswith(outer + "."):
                raise ValueError(f"--config.{outer} comes after --config.{inner} and would replace it; "
                                 f"give --config.{outer} first")
    tuples = {}
    for key, text in overrides:
        holder, field = _config_field(config, key)
        kind = holder.get_type(field)
        value = _parse_value(key, kind, text)
        if kind is tuple:  # --config.KEY a --config.KEY b: ("a", "b")
            value = tuples[key] = tuples.get(key, ()) + value
        try:
            holder[field] = value
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"--config.{key}={text}: {' '.join(str(e).split())}") from None


def _config_field(config, key):
    """--config.a.b.c -> (config.a.b, "c"), or a ValueError naming the part of KEY that is missing."""
    import ml_collections

    *parents, field = key.split(".")
    if not key or not all(parents) or not field:
        raise ValueError(f"bad config key --config.{key}")
    holder, path = config, "config"
    for depth, name in enumerate(parents + [field]):
        if not isinstance(holder, ml_collections.ConfigDict):
            raise ValueError(f"no such config field: --config.{key} ({path} is {holder!r}, not a group "
                             "of fields)")
        if name not in holder:
            near = difflib.get_close_matches(name, list(holder.keys()), n=1)
            hint = f"; did you mean --{path}.{near[0]}?" if near else f"; {path} has: {', '.join(holder.keys())}"
            raise ValueError(f"no such config field: --config.{key} ({path} has no {name!r}{hint})")
        if depth < len(parents):
            holder, path = holder[name], f"{path}.{name}"
    return holder, field


_TRUE, _FALSE = ("true", "t", "1"), ("false", "f", "0")


def _parse_value(key, kind, text):
    """The command-line string `text` as a value of type `kind` (see override_config)."""
    import ml_collections

    if text is None:
        if kind is bool:
            return True
        raise ValueError(f"--config.{key} needs a value: --config.{key}=VALUE")
    try:
        if kind is bool:
            if text.strip().lower() in _TRUE + _FALSE:
                return text.strip().lower() in _TRUE
            raise ValueError
        if kind is int:
            digits = text.strip().lower().lstrip("+-")
            return int(text, 0) if digits[:2] in ("0x", "0o", "0b") else int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        if kind is tuple:
            return _parse_tuple(text)
        if isinstance(kind, type) and issubclass(kind, ml_collections.ConfigDict):
            value = ast.literal_eval(text)
            if not isinstance(value, dict):
                raise ValueError
            return ml_collections.ConfigDict(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        what = {bool: "a bool (true or false)", int: "an int", float: "a float",
                tuple: "a tuple, e.g. '(\"a\",\"b\")'"}.get(kind, "a dict literal")
        raise ValueError(f"--config.{key}={text}: not {what}") from None
    return _parse_literal(text)


def _parse_tuple(text):
    """ml_collections' TupleParser: a literal, made a tuple; a bare word is a 1-tuple of itself."""
    try:
        value = ast.literal_eval(text)
    except ValueError:  # a name: --config.KEY vae
        value = text
    except SyntaxError:  # a path or pattern (not a tuple if it has no comma or space)
        if "," in text or " " in text:
            raise
        value = text
    if isinstance(value, tuple):
        return value
    if isinstance(value, (list, set, frozenset, dict)):
        return tuple(value)
    return (value,)


def _parse_literal(text):
    """A Python literal (true/false as True/False), else the string as given."""
    if text in ("true", "false"):
        text = text.capitalize()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


# -- main ------------------------------------------------------------------------------------------
