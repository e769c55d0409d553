"""The import rules of the adassl_fast package (docs/architecture.md section 1), read from the source.

Every import statement counts, at module level or inside a function (the lazily imported backends too):
- a module imports only from its own layer or the layers below it;
- the modules import each other without a cycle;
- no name with a leading underscore is imported from another module of the package (a package-private
  module itself, such as `_checks`, may be imported as a module: its public names are the package's
  internal interface);
- kernels/ imports nothing of the library (tests/kernels/test_imports.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.import_graph import find_cycle, import_nodes

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "adassl_fast"

# Top to bottom. The apps/ subpackage's modules are named "apps.<module>". Two nodes are not read here:
# kernels/ (one node; its own rules are checked apart) and _C_cuda, the CUDA extension setup.py may build
# ahead of time.
ELSEWHERE = {"kernels", "_C_cuda"}
APPS = PACKAGE / "apps"
LAYERS = (
    ("apps", {"__main__", "apps", "apps.cli", "apps.train", "apps.compare", "apps.data", "apps.metrics",
              "apps.benchmark"}),
    ("public API", {"__init__"}),
    ("modules", {"nn", "cached", "compat"}),
    ("functional ops", {"nt_xent", "info_nce", "adassl", "latent", "siglip"}),
    ("distributed schedules", {"distributed"}),
    ("core op", {"core"}),
    ("dispatch and op glue", {"_dispatch", "_library"}),
    ("backends", {"torch_backend", "indices", "_cuda", "_cuda_build", "_C_cuda", "kernels"}),
    ("foundation", {"_checks", "_version"}),
)
LAYER_OF = {module: depth for depth, (_, modules) in enumerate(LAYERS) for module in modules}


def _modules() -> dict[str, Path]:
    apps = {("apps" if path.stem == "__init__" else f"apps.{path.stem}"): path for path in sorted(APPS.glob("*.py"))}
    return {path.stem: path for path in sorted(PACKAGE.glob("*.py"))} | apps


def _module_name(dotted: str) -> str | None:
    """The package module an absolute import names ("adassl_fast.kernels.configs" -> "kernels",
    "adassl_fast.apps.train" -> "apps.train"), or None."""
    parts = dotted.split(".")
    if parts[0] != "adassl_fast":
        return None
    if parts[1:2] == ["apps"]:
        return ".".join(parts[1:3])
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(package module, imported name or None) for each import of the package in one file; the name is None
    where a module itself is imported."""
    modules = set(_modules()) | ELSEWHERE
    found = []
    for node in import_nodes(path):
        if isinstance(node, ast.Import):
            found += [(m, None) for m in map(_module_name, (a.name for a in node.names)) if m is not None]
            continue
        assert node.level == 0, f"{path.name}: relative import (the package uses absolute imports)"
        module = _module_name(node.module)
        if module is None:
            continue
        for alias in node.names:
            if module == "__init__" and alias.name in modules:
                found.append((alias.name, None))  # `from adassl_fast import nn`: the module nn
            elif module == "apps" and f"apps.{alias.name}" in modules:
                found.append((f"apps.{alias.name}", None))  # `from adassl_fast.apps import train`
            elif module == "kernels":
                found.append(("kernels", None))  # kernels/'s own names are its business
            else:
                found.append((module, alias.name))
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in imports(path)} - {name} for name, path in _modules().items()}


def test_every_module_has_a_layer():
    assert set(_modules()) | ELSEWHERE == set(LAYER_OF), "a module missing from LAYERS, or a stale entry"


def test_imports_point_down():
    upward = [
        f"{name} ({LAYERS[LAYER_OF[name]][0]}) imports {dep} ({LAYERS[LAYER_OF[dep]][0]})"
        for name, deps in _graph().items() for dep in sorted(deps) if LAYER_OF[dep] < LAYER_OF[name]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    cycle = find_cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_private_name_crosses_a_module_boundary():
    private = [
        f"{name} imports {imported} from {module}"
        for name, path in _modules().items() for module, imported in imports(path)
        if imported is not None and imported.startswith("_") and not imported.startswith("__")
    ]
    assert not private, "\n".join(private)


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_walker_sees_function_level_and_private_imports(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from adassl_fast.core import _hidden\n    from adassl_fast import nn, info\n"
                      "    from adassl_fast.apps import train\n    from adassl_fast.apps.cli import _private\n")
    assert imports(source) == [("core", "_hidden"), ("nn", None), ("__init__", "info"), ("apps.train", None),
                               ("apps.cli", "_private")]
