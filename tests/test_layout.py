"""The package's rooms import one way, down (docs/design.md, "Layout: one way down")."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import dyrate

# top to bottom: a unit may import only units listed before it
ORDER = ["errors", "rates", "assets", "adapters", "learn", "policies", "engine", "measure", "api", "evaluation",
         "testbed", "integrations", "cli", "__init__", "__main__"]
CORE = ("adapters", "policies", "engine", "api")


def unit_edges() -> dict[str, set[str]]:
    pkg = Path(dyrate.__file__).parent
    edges: dict[str, set[str]] = defaultdict(set)
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(pkg)
        unit = rel.parts[0].removesuffix(".py")
        mod = ["dyrate", *rel.with_suffix("").parts]
        is_pkg = mod[-1] == "__init__"
        if is_pkg:
            mod = mod[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = mod[: len(mod) - node.level + is_pkg] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target + "." + a.name for a in node.names] + [target]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "dyrate" and len(parts) > 1 and parts[1] != unit:
                    edges[unit].add(parts[1])
    return edges


def test_imports_run_one_way_down():
    edges = unit_edges()
    assert set(edges) <= set(ORDER), f"new top-level unit(s) {set(edges) - set(ORDER)}: place them in ORDER"
    upward = [(a, b) for a, targets in edges.items() for b in targets if ORDER.index(b) > ORDER.index(a)]
    assert not upward, f"imports that go up: {upward}"


def test_core_imports_neither_testbed_nor_evaluation():
    edges = unit_edges()
    assert not [(a, b) for a in CORE for b in edges.get(a, ()) if b in ("testbed", "evaluation")]
