"""Rewrite the tables docs/ generates from the code's one declaration of each thing:

- docs/cli.md, the method parameters (``jobs.spec.METHOD_PARAMS``);
- docs/configuration.md, the ``COREMERGE_*`` settings (``jobs.settings.Settings``);
- docs/service.md, the problem types a client can receive (``service.problems``).

Run it after adding a method, a parameter, a setting or a problem type:
``.venv/bin/python scripts/update_doc_tables.py`` (``--check`` only says which are stale).
The tests (tests/test_readme.py, tests/service/test_docs.py, tests/service/test_openapi.py)
fail while a table is stale.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jobs.settings import settings_table_markdown  # noqa: E402
from jobs.spec import params_table_markdown  # noqa: E402
from service.problems import problem_types_markdown  # noqa: E402

#: (file, marker, generator): the table sits between ``<!-- marker:start -->`` and ``:end``.
TABLES: list[tuple[str, str, Callable[[], str]]] = [
    ("docs/cli.md", "params-table", params_table_markdown),
    ("docs/configuration.md", "settings-table", settings_table_markdown),
    ("docs/service.md", "problem-types", problem_types_markdown),
]


def update(check: bool = False) -> list[str]:
    """The files whose table was stale (rewritten unless ``check``)."""
    stale = []
    for name, marker, generate in TABLES:
        path = ROOT / name
        text = path.read_text()
        pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(\n<!-- {marker}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{name}: no <!-- {marker}:start --> … end markers")
        table = generate()
        new = pattern.sub(lambda m, table=table: m.group(1) + table + m.group(2), text)
        if new != text:
            stale.append(name)
            if not check:
                path.write_text(new)
    return stale


if __name__ == "__main__":
    check = "--check" in sys.argv[1:]
    stale = update(check)
    for name in stale:
        print(f"{name}: {'stale' if check else 'rewritten'}")
    sys.exit(1 if check and stale else 0)
