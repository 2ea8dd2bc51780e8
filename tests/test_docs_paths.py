"""The maps of the code stay true: every repository path that docs/architecture.md and the
README name exists.

A map that names a file that has moved sends a newcomer to nothing, and nobody notices
until then. Checked here, by one rule for both pages:

- a backticked path (```worker/engine/ledger.py```, ```bench/results/```) whose first part is
  a top-level entry of the repository must exist;
- in docs/architecture.md, under a ``### `pkg/` `` heading, a table row's first cell names a
  module of that package, and the other backticked ``*.py`` names and folders in the row are
  files of the package, or of the folder the first cell names (``engine/`` … ``linalg.py``);
- in a fenced block, a line that starts with a path (``worker/merge/plan.py    the plan…``) is a
  map entry: the path must exist, and the ``*.py`` names that follow it, on its line and on
  the indented lines after it, are files of its folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = ("docs/architecture.md", "README.md")
TOP = {p.name for p in ROOT.iterdir() if not p.name.startswith(".git")}
BACKTICKED = re.compile(r"`([^`\s]+)`")
PATHLIKE = re.compile(r"^[\w.\-/]+$")
PY_NAME = re.compile(r"(?<![\w./])([\w\-/]+\.py)\b")
MAP_ENTRY = re.compile(r"^([\w.\-]+/[\w.\-/]*)\s")


def _exists(name: str, *bases: str) -> bool:
    """``name`` exists under one of ``bases`` (relative to the repository root)."""
    return any((ROOT / base / name).exists() for base in bases)


def _is_repo_path(token: str) -> bool:
    """A path from the repository root: its first part is a top-level entry."""
    return PATHLIKE.match(token) is not None and "/" in token and token.split("/")[0] in TOP


def _backticked(text: str) -> list[str]:
    """Missing backticked root paths anywhere on the page."""
    return [t for t in BACKTICKED.findall(text) if _is_repo_path(t) and not _exists(t, ".")]


def _package_tables(text: str) -> list[str]:
    """Missing modules in the tables under ``### `pkg/` `` headings (docs/architecture.md)."""
    missing, package = [], None
    for line in text.splitlines():
        heading = re.match(r"^#+ `([\w\-]+/)`", line)
        if line.startswith("#"):
            package = heading.group(1) if heading else None
            continue
        cells = line.split("|")
        if package is None or not line.startswith("|") or len(cells) < 3:
            continue
        first = BACKTICKED.findall(cells[1])
        if not first:
            continue
        if not _exists(first[0], package):
            missing.append(f"{package}{first[0]}")
        folder = package + first[0] if first[0].endswith("/") else package
        for token in BACKTICKED.findall("|".join(cells[2:])):
            if PATHLIKE.match(token) and (token.endswith(".py") or token.endswith("/")):
                if "/" in token.rstrip("/") and not _is_repo_path(token):
                    continue  # a media type or the like, not a path
                if not _exists(token, ".", package, folder):
                    missing.append(f"{folder}{token} (in the row of {package}{first[0]})")
    return missing


def _code_maps(text: str) -> list[str]:
    """Missing paths in the maps drawn in fenced blocks."""
    missing, fenced, folder = [], False, None
    for line in text.splitlines():
        if line.startswith("```"):
            fenced, folder = not fenced, None
            continue
        if not fenced:
            continue
        entry = MAP_ENTRY.match(line + " ")
        if entry and entry.group(1).split("/")[0] in TOP:
            path = entry.group(1)
            if not _exists(path, "."):
                missing.append(path)
            folder = path if path.endswith("/") else str(Path(path).parent) + "/"
            rest = line[entry.end() :]
        elif folder is not None and line.startswith(" "):
            rest = line
        else:
            folder = None
            continue
        missing += [f"{folder}{n}" for n in PY_NAME.findall(rest) if not _exists(n, folder, ".")]
    return missing


@pytest.mark.parametrize("page", PAGES)
def test_every_path_the_page_names_exists(page: str) -> None:
    text = (ROOT / page).read_text(encoding="utf-8")
    missing = _backticked(text) + _package_tables(text) + _code_maps(text)
    assert not missing, f"{page} names paths that do not exist: {sorted(set(missing))}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("see `worker/no_such.py` and `worker/merge/runner.py`", ["worker/no_such.py"]),
        ("### `jobs/`\n| `spec.py` | x |\n| `gone.py` | y |\n", ["jobs/gone.py"]),
        ("### `worker/`\n| `engine/` | `linalg.py`, `nope.py` |\n", ["worker/engine/nope.py"]),
        ("```\nworker/engine/   linalg.py, nope.py\n                 spaces.py\n```\n", ["nope"]),
        ("```\nworker/gone.py   the plan\n```\n", ["worker/gone.py"]),
        ("`s3://bucket/x/` `/merges` `application/problem+json` `org/name`", []),
    ],
    ids=["backticked", "table", "row", "code map", "code entry", "not paths"],
)
def test_the_rule_finds_what_is_missing(text: str, expected: list[str]) -> None:
    """The checks fail on a missing path (so the test above can fail) and pass URIs,
    routes and media types."""
    missing = _backticked(text) + _package_tables(text) + _code_maps(text)
    assert [m for m in missing if any(e in m for e in expected)] == missing
    assert len(missing) == len(expected)
