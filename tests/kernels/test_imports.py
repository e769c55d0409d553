"""The import rules of kernels/ (docs/architecture.md): the Triton backend is the bottom layer.

Read from the source, not from an import: every kernels/*.py may import only kernels/ itself (relative
imports), torch, triton and the standard library, and the imports among kernels/ form no cycle.
"""

import ast
import sys
from pathlib import Path

from tests.import_graph import find_cycle, import_nodes

KERNELS = Path(__file__).resolve().parents[2] / "adassl_fast" / "kernels"
ALLOWED = {"torch", "triton"} | set(sys.stdlib_module_names)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(top-level packages of the absolute imports, kernels/ modules of the relative ones) of one file."""
    absolute, relative = set(), set()
    for node in import_nodes(path):
        if isinstance(node, ast.Import):
            absolute |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            absolute.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 1, f"{path.name}: import from above kernels/ (level {node.level})"
            # `from . import x` names modules, `from .x import y` names the module x
            relative |= {alias.name for alias in node.names} if node.module is None else {node.module.split(".")[0]}
    return absolute, relative


def _graph() -> dict[str, set[str]]:
    return {path.stem: _imports(path)[1] for path in sorted(KERNELS.glob("*.py"))}


def test_kernels_import_only_torch_triton_and_the_standard_library():
    files = sorted(KERNELS.glob("*.py"))
    assert len(files) > 5, files
    for path in files:
        absolute, relative = _imports(path)
        assert absolute <= ALLOWED, f"{path.name} imports {sorted(absolute - ALLOWED)}"
        assert relative <= {p.stem for p in files}, f"{path.name}: {sorted(relative)}"


def test_kernels_have_no_import_cycle():
    assert find_cycle(_graph()) is None, " -> ".join(find_cycle(_graph()))
