"""The layout's rules, checked on the source: the maths imports no framework, the jobs import no
Prefect, the flows hold no model code, and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("diffusion_core", "flows")
MATHS = (
    "diffusion_core.schedule",
    "diffusion_core.reverse",
    "diffusion_core.objectives",
    "diffusion_core.likelihood",
    "diffusion_core.toy",
    "diffusion_core.sampling",
    "diffusion_core.nn",
    "diffusion_core.cascade",
)
FRAMEWORKS = ("ray", "mlflow", "prefect", "fsspec")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules imported by a file (only at module level with ``top_level_only``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


MODULES = _modules()


def _internal(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_the_maths_imports_no_framework():
    offenders = {
        mod: sorted(n for n in _imports(path, False) if n.split(".")[0] in FRAMEWORKS)
        for mod, path in MODULES.items()
        if mod.startswith(MATHS)
    }
    assert {m: v for m, v in offenders.items() if v} == {}


def test_the_core_imports_no_prefect():
    offenders = {
        mod: sorted(n for n in _imports(path, False) if n.split(".")[0] == "prefect")
        for mod, path in MODULES.items()
        if mod.startswith("diffusion_core")
    }
    assert {m: v for m, v in offenders.items() if v} == {}


def test_flows_hold_no_model_code():
    """Flows orchestrate: no torch, no networks; they call diffusion_core."""
    offenders = {
        mod: sorted(n for n in _imports(path, False) if n.split(".")[0] in ("torch", "numpy"))
        for mod, path in MODULES.items()
        if mod.startswith("flows")
    }
    assert {m: v for m, v in offenders.items() if v} == {}


def test_no_import_cycles():
    """Function-level imports count too: a lazy import both ways is still a cycle."""
    graph = {
        mod: {i for n in _imports(path, False) if (i := _internal(n)) and i != mod}
        for mod, path in MODULES.items()
    }
    # a package's __init__ re-exporting its submodules is not a cycle of its own
    for mod in graph:
        graph[mod] = {d for d in graph[mod] if not mod.startswith(d + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert cycles == []


@pytest.mark.parametrize("mod", sorted(m for m in MODULES if m.startswith("diffusion_core")))
def test_every_module_names_what_it_is(mod):
    """One concept per file: every module opens with a docstring that says what it holds."""
    doc = ast.get_docstring(ast.parse(MODULES[mod].read_text()))
    assert doc and len(doc) > 20, f"{mod} has no module docstring"
