"""No function over 60 lines in the product or the benchmarks.

A function that does not fit on a screen hides its steps; the house rule is to split it by
meaning (an argument parser, a table, one step of a run). Counted from the ``def`` line to
the function's last line, nested functions and methods included, in every ``.py`` file under
``worker/``, ``service/``, ``jobs/`` and ``bench/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("worker", "service", "jobs", "bench")
MAX_LINES = 60
#: Functions over the limit, ``path::qualified name``, allowed for a while when a rule is
#: set; empty since issue 21 §6 split the last of them. Nothing under bench/speed or
#: bench/service.py may come back to this list.
ALLOWED: set[str] = set()
#: where the rule already holds without exception
NO_EXCEPTIONS = ("bench/speed/", "bench/service.py")


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function in ``tree``, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def long_functions(root: Path = ROOT) -> dict[str, int]:
    """``path::qualified name`` → lines, for every function over MAX_LINES under PACKAGES."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for name, node in _functions(tree):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    found[f"{path.relative_to(root).as_posix()}::{name}"] = lines
    return found


def test_no_function_over_the_limit() -> None:
    over = {k: n for k, n in long_functions().items() if k not in ALLOWED}
    listing = "\n".join(f"  {k}: {n} lines" for k, n in sorted(over.items(), key=lambda x: -x[1]))
    assert not over, (
        f"functions over {MAX_LINES} lines (def line to last line); split them by meaning:\n"
        + listing
    )


def test_allow_list_spares_bench_speed_and_service() -> None:
    spared = sorted(k for k in ALLOWED if k.startswith(NO_EXCEPTIONS))
    assert not spared, f"bench/speed and bench/service.py have no exceptions: {spared}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def f():\n" + "    x = 1\n" * 58 + "    return x\n", {}),
        ("def f():\n" + "    x = 1\n" * 60 + "    return x\n", {"m.py::f": 62}),
        (
            "class C:\n    @staticmethod\n    def g():\n" + "        pass\n" * 60,
            {"m.py::C.g": 61},
        ),
        (
            "def outer():\n    def inner():\n" + "        pass\n" * 60 + "    return inner\n",
            {"m.py::outer": 63, "m.py::outer.inner": 61},
        ),
        ("async def h():\n" + "    await x\n" * 61, {"m.py::h": 62}),
    ],
    ids=["60 lines", "62 lines", "method", "nested", "async"],
)
def test_counting(tmp_path: Path, source: str, expected: dict[str, int]) -> None:
    """The count runs from the def line (not its decorators) to the last line."""
    (tmp_path / "worker").mkdir()
    (tmp_path / "worker" / "m.py").write_text(source)
    found = long_functions(tmp_path)
    assert found == {f"worker/{k}": n for k, n in expected.items()}
