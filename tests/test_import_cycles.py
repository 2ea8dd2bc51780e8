"""No import cycle between the product's modules (docs/architecture.md, "The dependency rule").

A cycle makes a module's meaning depend on import order, and it came back once unnoticed
(adapters' lora ↔ source ↔ vera). Read from the source with ``ast``, so nothing is imported:
every ``import`` in ``jobs/``, ``service/`` and ``worker/``, the ones inside functions too,
is an edge to the project module it names (``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg``); a package's ``__init__`` is a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jobs", "service", "worker")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name → file, for every module of PACKAGES."""
    found = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _targets(name: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names an import statement in module ``name`` may refer to."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = name.split(".") if is_package else name.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join([*parts, *([node.module] if node.module else [])])
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module → the project modules it imports (anywhere in its body)."""
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _targets(name, path.name == "__init__.py", node):
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        while work:
            node, edges = work[-1]
            nxt = next((w for w in edges if w not in index or w in stack), None)
            if nxt is not None and nxt not in index:
                index[nxt] = low[nxt] = len(index)
                stack.append(nxt)
                work.append((nxt, iter(sorted(graph[nxt]))))
                continue
            if nxt is not None:
                low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles (split the shared part into a module both import):\n" + (
        "\n".join("  " + " ↔ ".join(c) for c in found)
    )


def test_a_cycle_is_found(tmp_path: Path) -> None:
    """The check can fail: a lazy import that closes a loop counts."""
    pkg = tmp_path / "worker"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from worker import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import x\n")
    (pkg / "c.py").write_text("import worker.a\nx = 1\n")
    (pkg / "d.py").write_text("from worker.a import thing\n")
    assert cycles(import_graph(tmp_path)) == [["worker.a", "worker.b", "worker.c"]]
