"""The import graph of src/symerge runs one way (docs/architecture.md): no cycles between packages or modules, and
no lower layer imports a higher one. Every import counts, also the ones inside functions (a lazy import hides a
cycle at import time but not in the design).

Run as a script to print the package-level graph: `python tests/test_layering.py`.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "symerge"

# Layers, bottom to top. A unit may import units of its own layer or below, never above. A unit is a top-level
# module (`symerge.batching`) or a subpackage (`symerge.merging`); `symerge/__init__.py` (the public facade) and
# `__main__` sit above everything.
LAYERS: list[set[str]] = [
    {"errors", "atomic", "hashing", "batching", "devices", "validation", "option_types"},
    {"sampling", "taskvectors", "tensorio"},
    {"merging", "evaluation", "pool"},
    {"adaptive", "models", "data", "result"},  # result: a lazy `models.text.tokenize` for raw-string predict
    {"method_options", "export"},
    {"config", "report"},
    {"suites", "pipeline", "memory_plan"},
    {"studies"},  # the paper's studies: build on the suites' benchmarks and runner
    {"cli"},
]
# Pairs inside one layer that must still not import each other (first must not import second).
FORBIDDEN_SAME_LAYER = {("report", "suites"), ("report", "config"), ("report", "pipeline"), ("suites", "pipeline"),
                        ("data", "adaptive"), ("data", "models"), ("result", "adaptive")}
# The package facade (`symerge/__init__.py`) runs before any `symerge.x` import anyway: taking a constant from it
# (`from symerge import __version__`) is allowed from anywhere; cycles through it are still caught.
FACADE = "symerge"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imported_modules(path: Path, name: str, modules: set[str]) -> set[str]:
    """symerge modules imported anywhere in the file (relative imports resolved; `from pkg import mod` -> pkg.mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("symerge"):
                found.add(target)
    return found


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "symerge"


def graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> imported modules, unit -> imported units), self-edges left out."""
    modules = all_modules()
    module_graph = {m: imported_modules(p, m, set(modules)) - {m} for m, p in modules.items()}
    unit_graph: dict[str, set[str]] = defaultdict(set)
    for m, targets in module_graph.items():
        unit_graph[unit(m)] |= {unit(t) for t in targets} - {unit(m)}
    return module_graph, dict(unit_graph)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_of(name: str) -> int:
    for level, names in enumerate(LAYERS):
        if name in names:
            return level
    return len(LAYERS)  # the facade (`symerge`), `__main__`: the top


def layering_violations(unit_graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in sorted(unit_graph.items()):
        for target in sorted(targets):
            if target == FACADE:
                continue
            if layer_of(target) > layer_of(source) or (source, target) in FORBIDDEN_SAME_LAYER:
                bad.append(f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)})")
    return bad


def test_every_unit_has_a_layer():
    _, unit_graph = graphs()
    unplaced = sorted(u for u in unit_graph if layer_of(u) == len(LAYERS) and u not in ("symerge", "__main__"))
    assert not unplaced, f"place these in LAYERS: {unplaced}"


def test_no_cycles_between_packages():
    _, unit_graph = graphs()
    assert cycles(unit_graph) == []


def test_no_cycles_between_modules():
    module_graph, _ = graphs()
    assert cycles(module_graph) == []


def test_lower_layers_never_import_higher_ones():
    _, unit_graph = graphs()
    assert layering_violations(unit_graph) == []


@pytest.mark.parametrize("low,high", [
    (low, high) for low in ("batching", "errors", "devices", "taskvectors", "merging", "sampling", "result")
    for high in ("adaptive", "suites", "pipeline", "cli", "report", "config")] + [("report", "suites")])
def test_named_rules(low, high):
    _, unit_graph = graphs()
    assert high not in unit_graph.get(low, set()), f"{low} imports {high}"


if __name__ == "__main__":
    _, unit_graph = graphs()
    for level, names in enumerate(LAYERS):
        for name in sorted(names):
            print(f"L{level} {name:15s} -> {', '.join(sorted(unit_graph.get(name, ()))) or '-'}")
    print("package cycles:", cycles(unit_graph) or "none")
    print("module cycles:", cycles(graphs()[0]) or "none")
    print("layering violations:", layering_violations(unit_graph) or "none")
