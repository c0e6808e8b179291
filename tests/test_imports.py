"""Imports: generating stays light (no TensorFlow, no torch), and jaxdiff's modules import one way."""

import ast
import os
import subprocess
import sys

from tests.test_parallel import ROOT

# Lowest first: a module may import its own layer or a lower one, never a higher one. A new module
# gets a layer here (the test names an unlisted one), which is where its place in docs/architecture.md
# is decided.
LAYERS = (
    ("jaxdiff.models",),
    ("jaxdiff.sampling", "jaxdiff.text", "jaxdiff.images", "jaxdiff.data", "jaxdiff.parallel",
     "jaxdiff.compile_cache"),
    ("jaxdiff.components", "jaxdiff.limits"),
    ("jaxdiff.weights",),
    ("jaxdiff.sample",),
    ("jaxdiff.pipeline",),
    ("jaxdiff.train", "jaxdiff.eval"),
    ("jaxdiff.cli", "jaxdiff"),
)
PROJECT = ("jaxdiff", "configs")


def _modules() -> dict[str, str]:
    """name -> path of every module of jaxdiff/ and configs/."""
    found = {}
    for package in PROJECT:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    parts = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].split(os.sep)
                    found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(folder, name)
    return found


def _imports(path: str, name: str, modules) -> set[str]:
    """The project modules `path` imports anywhere in its body (function-level imports included:
    a lazy import still makes a cycle when it runs)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod when that is a module, else a name from pkg.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def _layer(name: str) -> int:
    best = None
    for i, members in enumerate(LAYERS):
        for m in members:
            if (name == m or name.startswith(m + ".")) and (best is None or len(m) > best[1]):
                best = (i, len(m))
    assert best is not None, f"{name} has no layer in tests/test_imports.py LAYERS"
    return best[0]


def _graph():
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def test_no_import_cycles():
    graph = _graph()
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_imports_go_one_way():
    upward = [f"{a} imports {b}" for a, targets in sorted(_graph().items()) if a.startswith("jaxdiff")
              for b in sorted(targets) if b.startswith("jaxdiff") and _layer(b) > _layer(a)]
    assert not upward, upward


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The walker is not blind: the real edges it must find are there."""
    graph = _graph()
    assert "jaxdiff.components" in graph["jaxdiff.weights.folder"]
    assert "jaxdiff.sample" in graph["jaxdiff.train.step"]  # a function-level or top-level import
    assert "configs.common" in graph["configs.shapes_unet"]
    assert _layer("jaxdiff.pipeline") > _layer("jaxdiff.sample") > _layer("jaxdiff.models.unet")


def test_import_does_not_pull_tensorflow_or_torch():
    code = ("import sys, jaxdiff, jaxdiff.pipeline; "
            "bad = [m for m in ('tensorflow', 'torch', 'diffusers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
