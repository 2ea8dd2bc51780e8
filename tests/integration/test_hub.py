"""Hub adapters through the real service: the API (uvicorn), an RQ worker process, moto's S3
for the output, and a Hugging Face cache in huggingface_hub's offline mode (no network on
these machines). A stack of its own, whose tenants file names ``hf://org/`` for team-a only,
and whose worker has HF_HUB_OFFLINE and HF_HUB_CACHE set as an operator would set them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from jobs.tenants import hash_key
from service.client import ApiError, CoremergeClient
from tests.hub_cache import put_in_cache
from tests.integration.conftest import AWS_ENV, free_port, start, stop, upload, wait_until

KEY_A, KEY_B = "hub-key-a", "hub-key-b"
TENANTS = {
    "tenants": {
        "team-a": {
            "keys_sha256": [hash_key(KEY_A)],
            "allow": ["s3://adapters-a/", "s3://merged/team-a/"],
            "read_only": ["hf://org/"],
        },
        "team-b": {
            "keys_sha256": [hash_key(KEY_B)],
            "allow": ["s3://adapters-b/", "s3://merged/team-b/"],
        },
    }
}


@dataclass
class HubStack:
    url: str
    env: dict[str, str]
    commits: dict[str, str]
    logs: Path

    def client(self, key: str = KEY_A) -> CoremergeClient:
        return CoremergeClient(self.url, key, timeout=10)


@pytest.fixture(scope="module")
def hub_stack(
    s3,
    moto_endpoint: str,
    redis_url: str,
    peft_adapters: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[HubStack]:
    work = tmp_path_factory.mktemp("hub-stack")
    cache = work / "hf-cache"
    commits = {
        "org/adapter-a": put_in_cache(cache, "org/adapter-a", peft_adapters[0]),
        "org/adapter-b": put_in_cache(
            cache, "org/adapter-b", peft_adapters[1], refs=("main", "v1")
        ),
    }
    pickled = work / "pickled"
    pickled.mkdir()
    shutil.copy(peft_adapters[0] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04never read")
    put_in_cache(cache, "org/pickled", pickled, files=("adapter_config.json", "adapter_model.bin"))
    (work / "tenants.json").write_text(json.dumps(TENANTS))
    # The session's Redis, with a queue and key prefix of this stack's own.
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("COREMERGE_", "HF_"))},
        **AWS_ENV,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "COREMERGE_REDIS_URL": redis_url,
        "COREMERGE_QUEUE": f"coremerge-hub-{port}",
        "COREMERGE_KEY_PREFIX": f"coremerge-hub-{port}",
        "COREMERGE_S3_ENDPOINT_URL": moto_endpoint,
        "COREMERGE_TENANTS_FILE": str(work / "tenants.json"),
        "COREMERGE_DEVICE": "cpu",
        "COREMERGE_WORK_DIR": str(work),
        "COREMERGE_API_URL": f"http://127.0.0.1:{port}",
    }
    cli = [sys.executable, "-m", "worker.cli"]
    logs = work / "worker.log"
    procs = [
        start([*cli, "serve", "--port", str(port)], env, work / "api.log"),
        start([*cli, "worker", "--name", f"hub-{port}"], env, logs),
    ]
    try:
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200,
            "API",
            proc=procs[0],
        )
        wait_until(lambda: "Listening on" in logs.read_text(), "worker", 60, proc=procs[1])
        yield HubStack(f"http://127.0.0.1:{port}", env, commits, logs)
    finally:
        for proc in procs:
            stop(proc)


def _report(s3, uri: str) -> dict:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def test_hub_and_s3_inputs_merge_pinned_to_their_commits(
    hub_stack: HubStack, s3, peft_adapters: list[Path]
) -> None:
    s3_input = upload(s3, peft_adapters[2], "adapters-a", f"hub/{uuid.uuid4().hex}/")
    out = f"s3://merged/team-a/hub-{uuid.uuid4().hex[:8]}/"
    spec = {
        "adapters": [{"uri": "hf://org/adapter-a"}, {"uri": "hf://org/adapter-b@v1"},
                     {"uri": s3_input}],
        "method": "ta",
        "output": {"uri": out},
    }  # fmt: skip
    with hub_stack.client() as client:
        job = client.wait(client.submit(spec)["id"], timeout=120)
    assert job["status"] == "succeeded", job
    assert job["request"]["adapters"][1]["uri"] == "hf://org/adapter-b@v1/"
    report = _report(s3, job["result"]["report_uri"])
    a, b = hub_stack.commits["org/adapter-a"], hub_stack.commits["org/adapter-b"]
    assert [i["uri"] for i in report["inputs"]][:2] == [
        f"hf://org/adapter-a@{a}",
        f"hf://org/adapter-b@{b}",
    ]
    assert [i["name"] for i in report["inputs"]][:2] == ["org/adapter-a", "org/adapter-b"]


def test_hub_is_off_unless_the_tenant_names_it(hub_stack: HubStack) -> None:
    spec = {"adapters": [{"uri": "hf://org/adapter-a"}], "method": "ta",
            "output": {"uri": "s3://merged/team-b/x/"}}  # fmt: skip
    with hub_stack.client(KEY_B) as client, pytest.raises(ApiError) as exc:
        client.submit(spec)
    assert exc.value.status == 403
    with hub_stack.client() as client, pytest.raises(ApiError) as exc:
        client.submit({**spec, "adapters": [{"uri": "hf://elsewhere/adapter"}],
                       "output": {"uri": "s3://merged/team-a/x/"}})  # fmt: skip
    assert exc.value.status == 403
    with hub_stack.client() as client, pytest.raises(ApiError) as exc:
        client.submit({**spec, "output": {"uri": "hf://org/out"}})
    assert exc.value.status == 422 and "input only" in str(exc.value)


def test_pickle_only_repository_fails_the_job_unread(hub_stack: HubStack) -> None:
    spec = {"adapters": [{"uri": "hf://org/pickled"}], "method": "ta",
            "output": {"uri": f"s3://merged/team-a/p-{uuid.uuid4().hex[:8]}/"}}  # fmt: skip
    with hub_stack.client() as client:
        job = client.wait(client.submit(spec)["id"], timeout=60)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "adapter_invalid"
    assert "has adapter_model.bin (pickle)" in job["error"]["message"]
    assert "hf-cache" not in job["error"]["message"]


def test_submit_config_with_hub_models(hub_stack: HubStack, s3, tmp_path: Path) -> None:
    """``coremerge submit --config merge.yml --output …`` as a mergekit user runs it."""
    config = tmp_path / "merge.yml"
    config.write_text(
        "models:\n"
        "  - model: org/adapter-a\n    parameters: {weight: 1.0}\n"
        "  - model: org/adapter-b@v1\n    parameters: {weight: 0.5}\n"
        "merge_method: linear\ndtype: bfloat16\n"
    )
    out = f"s3://merged/team-a/cfg-{uuid.uuid4().hex[:8]}/"
    env = {**hub_stack.env, "COREMERGE_API_KEY": KEY_A}
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "submit", "--config", str(config), "--output", out,
         "--wait"],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout)
    assert job["status"] == "succeeded" and job["request"]["normalize"] is True
    assert job["request"]["output"]["dtype"] == "bfloat16"
    report = _report(s3, job["result"]["report_uri"])
    assert [i["weight"] for i in report["inputs"]] == [1.0, 0.5]

    local = tmp_path / "merge-local.yml"
    local.write_text(config.read_text().replace("org/adapter-a", "./adapters/a"))
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "submit", "--config", str(local), "--output", out],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "is a local path" in proc.stderr, proc.stderr
