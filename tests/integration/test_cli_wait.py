"""``coremerge submit --wait`` as an operator meets it (issue 25 §2, §4): with no worker
listening it says so and ``--timeout`` ends the wait (exit 124, the job goes on); a job that
fails prints its code and message on stderr."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

from tests.integration.conftest import KEY_A, ROOT, Stack
from tests.processes import start_api, stop


def _submit(env: dict, spec_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "submit", str(spec_path), "--wait", *args],
        cwd=ROOT, env={**env, "COREMERGE_API_KEY": KEY_A}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_waiting_with_no_worker_hints_and_times_out(
    stack: Stack, tiny: list[str], tmp_path
) -> None:
    name = f"noworker{uuid.uuid4().hex[:8]}"
    env = {**stack.env, "COREMERGE_QUEUE": name, "COREMERGE_KEY_PREFIX": name}
    api, url = start_api(env, tmp_path / "api.log")
    spec_path = tmp_path / "job.json"
    spec_path.write_text(json.dumps({"adapters": [{"uri": u} for u in tiny],
                                     "output": {"uri": f"s3://merged/team-a/{name}/"}}))  # fmt: skip
    try:
        run = _submit({**env, "COREMERGE_API_URL": url}, spec_path, "--timeout", "13")
    finally:
        stop(api)
    assert run.returncode == 124, run.stderr
    assert "no worker listens on queue" in run.stderr and name in run.stderr
    assert "still queued after 13" in run.stderr


def test_a_failed_job_prints_its_error_on_stderr(stack: Stack, tmp_path) -> None:
    spec_path = tmp_path / "job.json"
    missing = f"s3://adapters-a/missing-{uuid.uuid4().hex[:8]}/"
    spec_path.write_text(json.dumps({"adapters": [{"uri": missing}],
                                     "output": {"uri": f"s3://merged/team-a/{uuid.uuid4().hex}/"}}))  # fmt: skip
    run = _submit(stack.env, spec_path)
    assert run.returncode == 1
    assert json.loads(run.stdout)["error"]["code"] == "adapter_not_found"
    assert "failed: adapter_not_found: " in run.stderr


def test_list_cancel_and_version_commands(stack: Stack, tiny: list[str], tmp_path) -> None:
    name = f"cli{uuid.uuid4().hex[:8]}"
    env = {**stack.env, "COREMERGE_QUEUE": name, "COREMERGE_KEY_PREFIX": name,
           "COREMERGE_API_KEY": KEY_A}  # fmt: skip
    api, url = start_api(env, tmp_path / "api.log")  # no worker on this queue: jobs wait
    env["COREMERGE_API_URL"] = url

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    spec_path = tmp_path / "job.json"
    try:
        ids = []
        for i in range(2):
            spec_path.write_text(json.dumps({"adapters": [{"uri": u} for u in tiny],
                                             "output": {"uri": f"s3://merged/team-a/{name}-{i}/"}}))  # fmt: skip
            ids.append(json.loads(cli("submit", str(spec_path)).stdout)["id"])
        listed = cli("list", "--limit", "5")
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert [line.split()[0] for line in lines] == ids[::-1]
        assert "queued" in lines[0] and f"s3://merged/team-a/{name}-1/" in lines[0]
        canceled = cli("cancel", ids[0])
        assert canceled.returncode == 0 and json.loads(canceled.stdout)["status"] == "canceled"
        only = cli("list", "--status", "canceled")
        assert [line.split()[0] for line in only.stdout.splitlines()] == [ids[0]]
        assert cli("cancel", "0" * 32).returncode == 1
    finally:
        stop(api)
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.strip().startswith("coremerge 0.")


def test_fetch_downloads_the_merged_adapter(stack: Stack, tiny: list[str], tmp_path) -> None:
    spec_path = tmp_path / "job.json"
    output = f"s3://merged/team-a/fetch-{uuid.uuid4().hex[:8]}/"
    spec_path.write_text(
        json.dumps({"adapters": [{"uri": u} for u in tiny], "output": {"uri": output}})
    )
    done = _submit(stack.env, spec_path)
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    env = {**stack.env, "COREMERGE_API_KEY": KEY_A}
    dest = tmp_path / "fetched"
    run = subprocess.run([sys.executable, "-m", "worker.cli", "fetch", job["id"], str(dest)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    names = sorted(p.name for p in dest.iterdir())
    assert names == sorted(["adapter_config.json", "adapter_model.safetensors", "README.md",
                            "merge_report.json"])  # fmt: skip
    key = output.removeprefix("s3://merged/") + "adapter_model.safetensors"
    body = stack.s3.get_object(Bucket="merged", Key=key)["Body"].read()
    assert (dest / "adapter_model.safetensors").read_bytes() == body
    again = subprocess.run([sys.executable, "-m", "worker.cli", "fetch", job["id"], str(dest)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 2 and "not an empty folder" in again.stderr
