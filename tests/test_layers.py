"""The import rules README's "Layout" section states (DESIGN.md's layers), checked on the source.

Every ``import`` and ``from ... import`` in the package is read from the syntax tree, at module level
and inside functions alike, so a rule cannot be broken by an import tucked into a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sketcharray"

#: DESIGN.md: each layer is a folder (README's Layout); nothing imports a higher layer.
LAYERS = {
    "core": 0, "sketches": 0,
    "torch": 1,
    "collect": 2, "storage": 2,
    "analysis": 3, "workloads": 3,
    "app": 4,
}
#: the old module paths of 0.5, kept one release as aliases of their new homes (each only imports its new module)
MOVED = {"settings": "core", "progress": "core", "localmodules": "core", "store": "storage", "provenance": "storage",
         "outputs": "storage", "cluster": "collect", "cli": "app", "commands": "app", "demo": "app", "report": "app"}
#: modules that drive a model and so import torch when they load; every other module outside the
#: torch layer imports it only inside the functions that need it, or not at all
TORCH_AT_LOAD = ("sketcharray.torch", "sketcharray.collect", "sketcharray.workloads", "sketcharray.app.bench")
#: the analysis: scores, top-k, LDS, solvers on a linear operator, statistics, the search; never torch itself (what
#: drives a model -- HVPs, training, checkpoints -- is the torch layer's, called through sketcharray.torch)
ARRAY_ONLY = ("sketcharray.analysis",)


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def _imports(name: str, path: Path):
    """(imported module, line, at module level) for every import statement of a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
                # ``from . import x`` imports the submodule x
                targets = [f"{module}.{a.name}" for a in node.names] if node.module is None else [module]
            else:
                targets = [node.module]
        else:
            continue
        for target in targets:
            yield target, node.lineno, id(node) in top_level


def _layer(module: str):
    parts = module.split(".")
    if len(parts) > 1 and parts[0] == "sketcharray" and parts[1] in MOVED:
        return None  # an alias: checked by test_the_old_paths_are_aliases_only
    return LAYERS.get(parts[1]) if len(parts) > 1 and parts[0] == "sketcharray" else None


ALL = list(_modules())


def test_the_folders_are_the_layers():
    """Every module lives in a layer's folder; the top level holds the front door and the 0.5 aliases only."""
    top = {name.split(".")[1] for name, _ in ALL if "." in name}
    assert top <= set(LAYERS) | set(MOVED), f"modules outside the layers' folders: {sorted(top - set(LAYERS) - set(MOVED))}"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(LAYERS), folders
    assert len(ALL) > 40


@pytest.mark.parametrize("old, layer", sorted(MOVED.items()))
def test_the_old_paths_are_aliases_only(old, layer):
    import importlib
    import warnings

    path = PACKAGE / f"{old}.py"
    targets = [t for t, _, _ in _imports(f"sketcharray.{old}", path)]
    assert set(targets) <= {"importlib", "sys", "warnings"}, targets
    assert f'"sketcharray.{layer}.{old}"' in path.read_text()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import sys

        sys.modules.pop(f"sketcharray.{old}", None)
        module = importlib.import_module(f"sketcharray.{old}")
    assert module is importlib.import_module(f"sketcharray.{layer}.{old}")
    assert any(issubclass(w.category, DeprecationWarning) and f"sketcharray.{layer}.{old}" in str(w.message)
               for w in caught)


@pytest.mark.parametrize("name, path", ALL, ids=[n for n, _ in ALL])
def test_no_module_imports_a_higher_layer(name, path):
    own = _layer(name)
    if own is None:  # the package's front door, sketcharray/__init__.py: loads names on first use
        return
    for target, line, _ in _imports(name, path):
        other = _layer(target)
        assert other is None or other <= own, f"{path.name}:{line}: layer {own} module {name} imports {target} (layer {other})"


@pytest.mark.parametrize("name, path", [(n, p) for n, p in ALL if n.startswith("sketcharray.sketches")],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_sketches_are_array_code(name, path):
    """The operators: no dask, xarray or zarr anywhere, no torch when they load (a CPU torch tensor's state
    is built through numpy inside a function), nothing from the rest of the package."""
    for target, line, at_load in _imports(name, path):
        root = target.split(".")[0]
        assert root not in ("dask", "xarray", "zarr"), f"{path.name}:{line} imports {target}"
        assert not (root == "torch" and at_load), f"{path.name}:{line} imports torch when the module loads"
        assert (not target.startswith("sketcharray.") or target.startswith("sketcharray.sketches")
                or target == "sketcharray.__version__"), f"{path.name}:{line} imports {target}"


@pytest.mark.parametrize("name, path", ALL, ids=[n for n, _ in ALL])
def test_torch_loads_only_with_the_modules_that_drive_a_model(name, path):
    for target, line, at_load in _imports(name, path):
        if target.split(".")[0] != "torch":
            continue
        assert not name.startswith(ARRAY_ONLY), f"{path.name}:{line}: array-only {name} imports torch"
        if at_load:
            assert name.startswith(TORCH_AT_LOAD), f"{path.name}:{line}: {name} imports torch when it loads"


def test_the_rules_are_the_readmes():
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme[readme.index("## Layout"):]
    for phrase in ("tests/test_layers.py", "no dask, xarray or zarr", "array-only"):
        assert phrase in section, phrase


def test_settings_are_plain_python():
    """settings.py (layer 0) holds the option names every layer checks against: the standard library only."""
    import sys

    for target, line, _ in _imports("sketcharray.core.settings", PACKAGE / "core" / "settings.py"):
        root = target.split(".")[0]
        assert root in sys.stdlib_module_names or root == "__future__", f"settings.py:{line} imports {target}"


def test_no_import_cycles():
    """No module of the package imports, directly or through others, a module that imports it back (function-level
    imports included): each concern can be read, and loaded, on its own."""
    modules = {name for name, _ in ALL}

    def resolve(target):
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target

    graph = {name: {resolve(t) for t, _, _ in _imports(name, path)} - {name, "", "sketcharray"}
             for name, path in ALL}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(trail + [node, nxt])}"
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
