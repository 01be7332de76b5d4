"""The layer rule of STYLE.md, checked on the source: faces -> operations -> storage -> base,
never upward, no import cycle, and a face reaches storage only with a comment saying why.

Every ``import`` in ``app/``, ``tasks/`` and ``beat_schedule.py`` is read with ``ast``,
including the ones inside functions (a lazy import still ties two modules together).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BASE, STORAGE, OPS, FACE = 0, 1, 2, 3
LAYER_NAMES = {BASE: "base", STORAGE: "storage", OPS: "operations", FACE: "faces"}

# The marker a face writes on an import line that reaches storage on purpose.
WHY_MARKER = "# layer:"
# The one storage module every face may import: the Context it builds (settings, engine,
# Redis, clock) and hands to the operations. Building it is not reaching past them.
HANDLE = "app.storage.context"


def layer_of(module: str) -> int:
    """The layer of a first-party module, by its folder."""
    if module.startswith(("app.storage", "app.storage.")):
        return STORAGE
    if module == "app.ops" or module.startswith("app.ops."):
        return OPS
    if module.startswith(("app.cli", "app.api", "app.workers", "app.local", "app.celery_app",
                          "tasks")):
        return FACE
    return BASE  # app.settings, app.errors, app.clock, app.kinds, beat_schedule, ...


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def first_party_files() -> list[Path]:
    files = sorted((ROOT / "app").rglob("*.py")) + sorted((ROOT / "tasks").rglob("*.py"))
    files.append(ROOT / "beat_schedule.py")
    # Alembic's migration scripts are run by Alembic, not imported by the app.
    return [f for f in files if "versions" not in f.parts]


def imports_of(path: Path) -> list[tuple[str, int, str]]:
    """(imported module, line number, source line) for every first-party import."""
    source = path.read_text()
    lines = source.splitlines()
    found: list[tuple[str, int, str]] = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from app.storage import db` imports app.storage.db when db is a module.
            for a in node.names:
                candidate = f"{node.module}.{a.name}"
                as_path = ROOT / Path(*candidate.split("."))
                is_module = as_path.with_suffix(".py").exists() or as_path.is_dir()
                names.append(candidate if is_module else node.module)
        for name in names:
            if name.split(".")[0] in {"app", "tasks", "beat_schedule"}:
                found.append((name, node.lineno, lines[node.lineno - 1]))
    return found


def graph() -> dict[str, list[tuple[str, int, str]]]:
    return {module_name(f): imports_of(f) for f in first_party_files()}


Graph = dict[str, list[tuple[str, int, str]]]


def upward_imports(g: Graph) -> list[str]:
    return [f"{mod}:{line} ({LAYER_NAMES[layer_of(mod)]}) imports {dep} "
            f"({LAYER_NAMES[layer_of(dep)]})"
            for mod, deps in g.items() for dep, line, _ in deps if layer_of(dep) > layer_of(mod)]


def unexplained_storage_imports(g: Graph) -> list[str]:
    return [f"{mod}:{line} imports {dep}"
            for mod, deps in g.items() if layer_of(mod) == FACE
            for dep, line, text in deps
            if layer_of(dep) == STORAGE and dep != HANDLE and WHY_MARKER not in text]


def find_cycles(g: Graph) -> list[list[str]]:
    """Every import cycle between two different modules (a package's ``__init__`` that
    re-exports one of its own submodules does not count: that is one concept)."""
    edges = {mod: sorted({d for d, _, _ in deps if d != mod and d in g}) for mod, deps in g.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        stack.append(mod)
        for dep in edges[mod]:
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[mod] = 2

    for mod in sorted(edges):
        if mod not in state:
            visit(mod)

    def own_package(c: list[str]) -> bool:
        return any(b.startswith(a + ".") for a in c for b in c) and len(set(c)) == 2

    return [c for c in cycles if not own_package(c)]


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    assert upward_imports(graph()) == []


def test_faces_reach_storage_only_with_a_comment_saying_why() -> None:
    assert unexplained_storage_imports(graph()) == []


def test_there_is_no_import_cycle() -> None:
    assert find_cycles(graph()) == []


@pytest.mark.parametrize("module, expected", [
    ("app.settings", BASE), ("app.storage.store", STORAGE), ("app.ops.lanes", OPS),
    ("app.ops", OPS), ("app.cli.serve", FACE), ("tasks.checks", FACE),
    ("app.workers.lane_worker", FACE), ("app.local.up", FACE), ("app.celery_app", FACE),
])
def test_every_folder_maps_to_its_layer(module: str, expected: int) -> None:
    assert layer_of(module) == expected


def test_the_checks_can_fail() -> None:
    """Each rule catches what it is for, on a made-up graph."""
    assert upward_imports({"app.storage.x": [("app.ops.lanes", 3, "")]}) != []
    assert unexplained_storage_imports({"app.cli.x": [("app.storage.db", 3, "from ...")]}) != []
    assert unexplained_storage_imports(
        {"app.cli.x": [("app.storage.db", 3, "from app.storage import db  # layer: why")]}) == []
    cyclic: Graph = {"app.cli.flower": [("app.cli.serve", 1, "")],
                     "app.cli.serve": [("app.local.up", 1, "")],
                     "app.local.up": [("app.cli.flower", 1, "")]}
    assert find_cycles(cyclic) == [["app.cli.flower", "app.cli.serve", "app.local.up",
                                    "app.cli.flower"]]
