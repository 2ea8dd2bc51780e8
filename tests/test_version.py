"""The version is defined once (``jobs.version``); the packaging metadata must say the same."""

from __future__ import annotations

import tomllib
from pathlib import Path

from jobs.version import VERSION

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_version_is_the_code_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["version"] == VERSION, (
        f"pyproject.toml says {project['version']}, jobs/version.py says {VERSION}: change both"
    )


def test_version_has_one_definition() -> None:
    """No module but jobs/version.py assigns a ``VERSION``."""
    defined = [
        path.relative_to(ROOT).as_posix()
        for package in ("worker", "service", "jobs")
        for path in sorted((ROOT / package).rglob("*.py"))
        if any(
            line.startswith("VERSION =") or line.startswith("VERSION: ")
            for line in path.read_text(encoding="utf-8").splitlines()
        )
    ]
    assert defined == ["jobs/version.py"]
