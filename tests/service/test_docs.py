"""docs/configuration.md stays true: its settings table is the one generated from Settings."""

from __future__ import annotations

import re
from pathlib import Path

from jobs.settings import settings_table_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_table_matches_settings() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    table = re.search(
        r"<!-- settings-table:start -->\n(.*?)\n<!-- settings-table:end -->", text, re.S
    )
    assert table is not None
    assert table.group(1) == settings_table_markdown()
