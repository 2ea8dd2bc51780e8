"""README.md's service quickstart works copy-pasted: its ``bash`` block under "The merge
service" runs as written, in a fresh folder (with the repository's ``.venv`` linked in),
against the session's Redis and on a free port, and the job it submits succeeds.

Only the environment differs from a user's shell: ``COREMERGE_REDIS_URL`` (the session's own
Redis, never the machine's), ``COREMERGE_API_URL`` (a free port: ``serve`` listens where the
client looks) and a queue of its own. The block's background ``serve`` and ``worker`` are
stopped by their pids when it ends.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from pathlib import Path

from tests.processes import ROOT, free_port, stop

#: Stops the block's background processes and keeps the status of its last command (submit).
_EPILOGUE = '\nstatus=$?\nkill $(jobs -p) 2>/dev/null\nwait\nexit "$status"\n'


def quickstart_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## The merge service\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "README.md: no bash block under 'The merge service'"
    return block.group(1)


def test_the_readme_service_quickstart_runs_as_written(redis_url: str, tmp_path: Path) -> None:
    block = quickstart_block()
    assert "COREMERGE_ALLOW_FILE_URIS" in block and "job.json" in block
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    name = f"quickstart{uuid.uuid4().hex[:8]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("COREMERGE_")},
        "COREMERGE_REDIS_URL": redis_url,
        "COREMERGE_API_URL": f"http://127.0.0.1:{free_port()}",
        "COREMERGE_QUEUE": name,
        "COREMERGE_KEY_PREFIX": name,
        "COREMERGE_DEVICE": "cpu",
    }
    shell = subprocess.Popen(
        ["bash", "-c", block + _EPILOGUE], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0,
    )  # fmt: skip
    try:
        out, err = shell.communicate(timeout=300)
    finally:
        stop(shell)
    assert shell.returncode == 0, err[-4000:]
    job = json.loads(re.findall(r"^\{$.*?^\}$", out, re.M | re.S)[-1])  # submit's, last
    assert job["status"] == "succeeded", job
    merged = tmp_path / "merged" / "run-1"
    assert job["result"]["uri"] == f"file://{merged}/"
    assert {"adapter_config.json", "adapter_model.safetensors", "merge_report.json"} <= {
        p.name for p in merged.iterdir()
    }
    assert json.loads((merged / "adapter_config.json").read_text())["r"] == 8
