"""The house rules of ``verimed/`` (docs/architecture.md, "Layout"): no import cycle, nothing
imports upward, ``core/`` and ``kernels/`` never import Ray, the actors or the command line.

The import graph is read from the source (``ast``), every ``import`` statement
counted — module level, inside functions, and under ``TYPE_CHECKING`` — so a lazy
import cannot hide a cycle. Nothing of ``verimed`` is imported here.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "verimed"

# Packages from the bottom up: a module may import its own package and any lower
# layer, never a higher one or another package of its own layer.
LAYERS: list[tuple[str, ...]] = [
    ("verimed.core.config", "verimed.core.types", "verimed.kernels", "verimed.data"),
    ("verimed.core.data", "verimed.core.models"),
    ("verimed.core.rl", "verimed.core.rollout", "verimed.core.cluster", "verimed.core.metrics"),
    ("verimed.core.rubrics", "verimed.core.simulator", "verimed.core.emulate"),
    ("verimed.core.tasks",),
    ("verimed.core.train", "verimed.core.eval"),
    ("verimed.actors",),
    ("verimed.cli",),
]
ROOTS = ("verimed", "verimed.core")  # package roots: docstrings only
PURE = ("verimed.core", "verimed.kernels")  # testable without Ray: see the forbidden imports below
FORBIDDEN_IN_PURE = ("ray", "verimed.actors", "verimed.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_names(path: Path, name: str) -> list[str]:
    """Every module an import statement of ``path`` names (absolute; relative ones resolved)."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            out.append(base)
            out += [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import submodule`
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target in imported_names(path, name):
            if target in mods and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> tuple[int, str]:
    for i, packages in enumerate(LAYERS):
        for package in packages:
            if module == package or module.startswith(package + "."):
                return i, package
    raise AssertionError(f"{module} belongs to no layer of tests/test_layout.py: add its package to LAYERS")


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_nothing_imports_upward():
    upward = []
    for module, targets in import_graph().items():
        if module in ROOTS:
            continue
        layer, package = layer_of(module)
        for target in targets:
            if target in ROOTS:
                continue
            t_layer, t_package = layer_of(target)
            if t_package != package and t_layer >= layer:
                upward.append(f"{module} (layer {layer}) imports {target} (layer {t_layer})")
    assert upward == []


@pytest.mark.parametrize("module", sorted(m for m in modules() if m.startswith(PURE)))
def test_core_and_kernels_never_import_ray_actors_or_cli(module):
    path = modules()[module]
    bad = [t for t in imported_names(path, module) if t.startswith(FORBIDDEN_IN_PURE) and
           (t in FORBIDDEN_IN_PURE or t.split(".")[0] == "ray" or t.startswith(tuple(f + "." for f in FORBIDDEN_IN_PURE)))]
    assert bad == [], f"{module} imports {bad}"


def test_every_subpackage_says_what_it_may_import():
    for init in (PACKAGE / "core").glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, f"{init.relative_to(ROOT)}: the docstring must say what it may import"
