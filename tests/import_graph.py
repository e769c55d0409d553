"""Import statements read from the source (every one, at module or function level) and the cycle search that
tests/kernels/test_imports.py and tests/test_imports.py share."""

from __future__ import annotations

import ast
from pathlib import Path


def import_nodes(path: Path) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of one file, wherever it sits (module level, inside functions or classes)."""
    tree = ast.parse(path.read_text(), str(path))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> modules it imports) as a path a -> ... -> a, or None."""
    done, active = set(), []

    def visit(module):
        if module in active:
            return active[active.index(module):] + [module]
        if module in done:
            return None
        active.append(module)
        for dep in sorted(graph.get(module, ())):
            found = visit(dep)
            if found:
                return found
        active.pop()
        done.add(module)
        return None

    return next((c for c in map(visit, sorted(graph)) if c), None)

