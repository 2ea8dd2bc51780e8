"""README.md stays true: the methods table is the generated one, and .ci/run runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

from jobs.spec import params_table_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_methods_table_matches_the_declaration() -> None:
    readme = (ROOT / "README.md").read_text()
    table = re.search(
        r"<!-- params-table:start -->\n(.*?)\n<!-- params-table:end -->", readme, re.S
    )
    assert table is not None
    assert table.group(1) == params_table_markdown()


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^# 2\. .*\n(.+)$", readme, re.M).group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
