"""The one-way dependency order of meft_ds/ (docs/ARCHITECTURE.md, "Layers"): no module imports one in a higher
layer, and no chain of imports leads back to where it started.

Every import counts: at module level, inside functions (lazy imports) and under ``if TYPE_CHECKING``. The layer table
is read from docs/ARCHITECTURE.md, so the document and the test cannot disagree.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "meft_ds"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"


def layers() -> list[tuple[str, list[str]]]:
    """``(layer, modules)`` from the table under "## Layers" in docs/ARCHITECTURE.md, lowest layer first."""
    section = ARCHITECTURE.read_text().split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if re.match(r"\| \w+ +\| `", line)]
    table = [(layer.strip(), re.findall(r"`([\w.]+)`", modules)) for layer, modules in rows]
    assert table, f"no layer table under '## Layers' in {ARCHITECTURE}"
    return table[::-1]  # the document lists the top layer first


def imported_modules(path: Path) -> set[str]:
    """The meft_ds modules ``path`` imports anywhere in the file (``__init__`` for the package itself)."""
    submodules = {p.stem for p in PACKAGE.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative: from . import x / from .x import y
            base = "meft_ds" + (f".{node.module}" if node.module else "")
            names = [base] if node.module else [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "meft_ds":
            names = [f"meft_ds.{alias.name}" if alias.name in submodules else "meft_ds" for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "meft_ds":
                found.add(parts[1] if len(parts) > 1 else "__init__")
    found.discard(path.stem)
    return found


def import_graph() -> dict[str, set[str]]:
    return {path.stem: imported_modules(path) for path in sorted(PACKAGE.glob("*.py"))}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_every_module_has_one_layer() -> None:
    listed = [module for _, modules in layers() for module in modules]
    on_disk = {path.stem for path in PACKAGE.glob("*.py")}
    assert len(listed) == len(set(listed)), f"listed twice: {sorted({m for m in listed if listed.count(m) > 1})}"
    assert set(listed) - on_disk == set(), "the table names modules that do not exist"
    assert on_disk - set(listed) == set(), f"add these modules to the table in {ARCHITECTURE.name}"


def test_no_module_imports_a_higher_layer() -> None:
    level = {module: rank for rank, (_, modules) in enumerate(layers()) for module in modules}
    name = [layer for layer, _ in layers()]
    upward = sorted(
        f"{importer} ({name[level[importer]]}) imports {imported} ({name[level[imported]]})"
        for importer, targets in import_graph().items()
        for imported in targets
        if level[imported] > level[importer]
    )
    assert upward == [], "imports against the dependency order:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    graph = import_graph()
    cyclic = sorted((a, b) for a, targets in graph.items() for b in targets if a in reachable(graph, b))
    assert cyclic == [], f"imports on a cycle (importer, imported): {cyclic}"
