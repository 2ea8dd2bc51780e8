"""coremerge's version, defined once: the merge report, the API's OpenAPI document and
``coremerge --version`` all read it. ``pyproject.toml`` carries the same number for packaging
(tests/test_version.py keeps the two equal), so a source tree that was never installed still
reports the version it is."""

from __future__ import annotations

__all__ = ["VERSION"]

VERSION = "0.1.0"
