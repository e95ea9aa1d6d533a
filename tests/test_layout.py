"""The layout is the architecture: no package imports one that imports it back, and the
README's Architecture table names every module there is."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
PACKAGE = PROJECT / "mirror"


def _unit(module: str) -> str:
    """A module's package under mirror/ (`mirror.store.tiers` → `store`), or the top-level
    module itself (`mirror.config` → `config`)."""
    return module.split(".")[1] if "." in module else module


def _imports() -> dict[str, set[str]]:
    """unit → the units it imports from."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        here = _unit("mirror." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mirror"):
                targets = (
                    [a.name for a in node.names]
                    if node.module == "mirror"
                    else [_unit(node.module or "")]
                )
                edges[here].update(t for t in targets if t != here and t != "__version__")
    return edges


def test_no_package_imports_one_that_imports_it_back() -> None:
    edges = _imports()
    assert edges["http"] and edges["store"], "the walk found the packages"

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(unit for unit in edges if unit in reach(unit))
    assert not cycles, f"packages in an import cycle: {cycles}"


def test_the_readme_architecture_table_names_every_module() -> None:
    readme = (PROJECT / "README.md").read_text()
    table = readme[readme.index("| module | owns |") : readme.index("**Sending blobs.**")]
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if len(rel.parts) == 1:
            named = path.name in ("__init__.py", "__main__.py") or f"mirror/{path.name}" in table
        elif path.name == "__init__.py":
            named = f"mirror/{rel.parts[0]}/" in table
        else:
            named = f"mirror/{rel.parts[0]}/" in table and f"`{path.name}`" in table
        if not named:
            missing.append(str(rel))
    assert not missing, f"modules the README's Architecture table does not name: {missing}"
