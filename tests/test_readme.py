"""README.md stays true: every command it shows is run by a test, the methods table in
docs/cli.md is the generated one, and .ci/run runs the README's test command.

Which test runs which block: the set-up's two commands are CI itself (.ci/run runs the second
as written, and the first's demo runs in the next block); "Merge on your machine" and "Coming
from mergekit" run here, copy-pasted, in a fresh folder with the repository's ``.venv`` linked
in; "The merge service" runs in ``tests/integration/test_quickstart.py`` against a real
Redis, API and worker.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from jobs.spec import params_table_markdown

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(section: str, language: str) -> list[str]:
    """The fenced ``language`` blocks under the README's ``## section`` heading."""
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", body, re.S)


def test_every_readme_block_is_one_a_test_runs() -> None:
    """A new block in a section no test runs fails here, not in a user's shell."""
    tested = {"Set-up: two commands", "Merge on your machine", "Coming from mergekit",
              "The merge service"}  # fmt: skip
    sections = re.split(r"\n## ", README)[1:]
    with_code = {s.split("\n", 1)[0] for s in sections if "```" in s}
    assert with_code <= tested


def test_methods_table_matches_the_declaration() -> None:
    doc = (ROOT / "docs" / "cli.md").read_text()
    table = re.search(r"<!-- params-table:start -->\n(.*?)\n<!-- params-table:end -->", doc, re.S)
    assert table is not None
    assert table.group(1) == params_table_markdown(), "run scripts/update_doc_tables.py"


def test_the_doc_tables_script_finds_every_table_current() -> None:
    """``scripts/update_doc_tables.py`` (how a contributor regenerates the tables) runs and
    agrees with the tests that no table is stale."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "update_doc_tables.py"), "--check"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_ci_runs_the_readme_test_command() -> None:
    command = re.search(r"^# 2\. .*\n(.+)$", README, re.M).group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def _run(block: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COREMERGE_")}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, text=True,
        capture_output=True, timeout=600,
    )  # fmt: skip


def test_the_local_merge_and_the_mergekit_config_run_as_written(tmp_path: Path) -> None:
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    [local] = blocks("Merge on your machine", "bash")
    done = _run(local, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["method"] == "ties"
    assert "layers" in done.stdout or "modules" in done.stdout  # inspect's table

    [yaml], [command] = (
        blocks("Coming from mergekit", "yaml"),
        blocks("Coming from mergekit", "bash"),
    )
    (tmp_path / "merge.yml").write_text(yaml)
    done = _run(command, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    merged = tmp_path / "merged-ties"
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["method"] == "ties"
    tensors = json.loads((merged / "adapter_config.json").read_text())
    assert tensors["peft_type"] == "LORA"
