"""The direction of imports (DESIGN.md's flow), read from every module's source with ast.

main (flags) -> experiment (ConfigDict -> Experiment) -> app (one module per mode) ->
train / generate / evaluation -> diffusion, models, data, parallel, checkpoint. The math
imports only jax, numpy and the standard library; models never import the math; nothing
below the Experiment imports ml_collections; no import cycles; no diffjax import hidden in a
function, and a third-party one only with a comment saying why (heavy or optional).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "diffjax")
# The only modules that may read a ConfigDict: the command lines (flags), config files, and
# the Experiment.
CONFIG_MODULES = {"diffjax.main", "diffjax.configlib", "diffjax.experiment",
                  "diffjax.convert.__main__"}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                out[_module_name(path)] = path
    return out


MODULES = _modules()


def _imports(path: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) of every import of a file; ``from X import
    y`` counts as X.y when that is a diffjax module, else as X."""
    tree = ast.parse(open(path).read(), path)
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    out = []
    for node in ast.walk(tree):
        nested = id(node) in in_function
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, nested) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.append((full if full in MODULES else node.module, node.lineno, nested))
    return out


def _graph() -> dict[str, set[str]]:
    """diffjax module -> the diffjax modules it imports (importing a submodule runs its
    parent packages' __init__ too)."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        deps = set()
        for target, _, _ in _imports(path):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                # A module's own parent packages are already being imported when it runs.
                if prefix in MODULES and prefix != name and not name.startswith(prefix + "."):
                    deps.add(prefix)
        graph[name] = deps
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    assert _find_cycle(_graph()) is None, " -> ".join(_find_cycle(_graph()))


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def _allowed_in_math(target: str) -> bool:
    top = target.split(".")[0]
    return (top in ("jax", "numpy", "__future__") or top in sys.stdlib_module_names
            or target.startswith("diffjax.diffusion"))


def test_the_math_imports_only_jax_numpy_and_itself():
    bad = [(name, t, line) for name, path in MODULES.items()
           if name.startswith("diffjax.diffusion")
           for t, line, _ in _imports(path) if not _allowed_in_math(t)]
    assert not bad, bad


def test_models_do_not_import_the_math():
    bad = [(name, t) for name, path in MODULES.items() if name.startswith("diffjax.models")
           for t, _, _ in _imports(path) if t.startswith("diffjax.diffusion")]
    assert not bad, bad


def test_ml_collections_only_above_the_experiment():
    bad = [(name, line) for name, path in MODULES.items() if name not in CONFIG_MODULES
           for t, line, _ in _imports(path) if t.split(".")[0] == "ml_collections"]
    assert not bad, bad


def test_the_layers_point_down():
    """Nothing imports the app tier but main; below the app nothing imports the Experiment
    builder or the config; the trainer does not import generation."""
    graph = _graph()
    for name, deps in graph.items():
        if name != "diffjax.main" and not name.startswith("diffjax.app"):
            assert not {d for d in deps if d.startswith("diffjax.app")}, (name, deps)
        if name not in CONFIG_MODULES:
            assert not deps & {"diffjax.experiment", "diffjax.configlib", "diffjax.main"}, name
        if name.startswith("diffjax.train"):
            assert "diffjax.generate" not in deps, name


def test_imports_inside_functions_are_third_party_and_explained():
    bad = []
    for name, path in MODULES.items():
        lines = open(path).read().splitlines()
        for target, line, nested in _imports(path):
            if not nested:
                continue
            text = lines[line - 1]
            if target.startswith("diffjax") or "#" not in text:
                bad.append(f"{name}:{line}: {text.strip()}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", ["diffjax.diffusion", "diffjax.models"])
def test_importing_the_math_and_models_leaves_ml_collections_out(package):
    code = (f"import sys, pkgutil, importlib, {package} as p\n"
            "for m in pkgutil.iter_modules(p.__path__):\n"
            "    importlib.import_module(p.__name__ + '.' + m.name)\n"
            "print('ml_collections' in sys.modules, 'flax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    has_ml_collections, has_flax = out.stdout.split()
    assert has_ml_collections == "False"
    if package == "diffjax.diffusion":
        assert has_flax == "False"
