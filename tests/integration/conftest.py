"""Real servers for the integration tests, started once per session and torn down after:

- moto's standalone S3 server on 127.0.0.1 (a subprocess: bind it to loopback),
- the API: ``python -m worker.cli serve`` (uvicorn), with a tenants file,
- one worker: ``python -m worker.cli worker`` (RQ's forking worker),
- the session's own Redis (``tests/redis_db.py``: a private ``redis-server``).

The processes themselves (start, stop, kill) are ``tests/processes.py``, shared with the soak
test; every one is stopped by its pid (and the worker's current work horse, which RQ puts in a
process group of its own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.config import Config

from jobs.settings import Settings
from service.client import CoremergeClient
from tests.processes import (  # noqa: F401  (re-exported for the tests here)
    AWS_ENV,
    ROOT,
    children,
    free_port,
    moto_server,
    start,
    stop,
    wait_until,
)
from tests.tenants import two_tenants
from worker.demo import make_tiny_adapters

KEY_A, KEY_B = "integration-key-a", "integration-key-b"
BUCKETS = ("adapters-a", "adapters-b", "merged")
TENANTS = two_tenants(KEY_A, KEY_B)


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: Modules of the ``big`` adapters (16 layers × q, k, v, o).
BIG_MODULES = 64
#: The stack's limits (tests/integration/test_hostile.py goes over each of them); the ``big``
#: adapters (about 1 MiB and 64 modules each) stay within them.
LIMITS = {
    "COREMERGE_MAX_ADAPTER_BYTES": 2 << 20,
    "COREMERGE_MAX_JOB_BYTES": 8 << 20,
    "COREMERGE_MAX_MODULES": 128,
}


@dataclass
class Stack:
    """The running servers and how to talk to them."""

    api_url: str
    s3_endpoint: str
    env: dict[str, str]
    s3: object
    logs: dict[str, Path]
    worker: subprocess.Popen
    redis_url: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def client(self, key: str = KEY_A) -> CoremergeClient:
        return CoremergeClient(self.api_url, key, timeout=10)

    def tail(self, name: str, lines: int = 40) -> str:
        return "\n".join(self.logs[name].read_text(errors="replace").splitlines()[-lines:])

    def keys(self, bucket: str, prefix: str) -> list[str]:
        listing = self.s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for o in listing.get("Contents", []))


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


@pytest.fixture(scope="session")
def s3(moto_endpoint: str):
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        config=Config(retries={"mode": "standard", "max_attempts": 2}),
    )
    for bucket in BUCKETS:
        client.create_bucket(Bucket=bucket)
    return client


@pytest.fixture(scope="session")
def stack(
    s3, moto_endpoint: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("stack")
    tenants = work / "tenants.json"
    tenants.write_text(json.dumps(TENANTS))
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("COREMERGE_")},
        **AWS_ENV,
        "COREMERGE_REDIS_URL": redis_url,
        "COREMERGE_S3_ENDPOINT_URL": moto_endpoint,
        "COREMERGE_TENANTS_FILE": str(tenants),
        "COREMERGE_DEVICE": "cpu",
        "COREMERGE_JOB_TIMEOUT": "300",
        "COREMERGE_WORKER_TTL": "20",
        "COREMERGE_WORK_DIR": str(work),
        "COREMERGE_API_URL": f"http://127.0.0.1:{port}",
        **{name: str(value) for name, value in LIMITS.items()},
    }
    logs = {"api": work / "api.log", "worker": work / "worker.log"}
    cli = [sys.executable, "-m", "worker.cli"]
    api = start([*cli, "serve", "--port", str(port)], env, logs["api"])
    worker = start([*cli, "worker", "--name", f"it-{port}"], env, logs["worker"])
    stack = Stack(
        f"http://127.0.0.1:{port}", moto_endpoint, env, s3, logs, worker, redis_url,
        [api, worker],
    )  # fmt: skip
    try:
        wait_until(
            lambda: httpx.get(f"{stack.api_url}/readyz", timeout=1).status_code == 200,
            "API",
            proc=api,
        )
        wait_until(lambda: "Listening on" in logs["worker"].read_text(), "worker", 60, proc=worker)
        yield stack
    finally:
        for proc in stack.procs:
            stop(proc)


def inproc_settings(
    stack: Stack, moto_endpoint: str, monkeypatch, work_dir: Path, name: str, **env: str
) -> Settings:
    """Settings of an in-process deployment of its own (prefix and queue ``name``) in the
    stack's Redis database and S3 server, set in the environment too (the job function reads
    its settings from there); ``env`` adds or overrides ``COREMERGE_*`` variables."""
    values = {
        "COREMERGE_REDIS_URL": stack.redis_url,
        "COREMERGE_KEY_PREFIX": name,
        "COREMERGE_QUEUE": name,
        "COREMERGE_S3_ENDPOINT_URL": moto_endpoint,
        "COREMERGE_DEVICE": "cpu",
        "COREMERGE_WORK_DIR": str(work_dir),
        **AWS_ENV,
        **env,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("COREMERGE_TENANTS_FILE", raising=False)
    return Settings()


def upload(s3, local: Path, bucket: str, prefix: str) -> str:
    for name in ADAPTER_FILES:
        s3.upload_file(str(local / name), bucket, f"{prefix}{name}")
    return f"s3://{bucket}/{prefix}"


def make_llama_adapters(workdir: Path, count: int, **model: int) -> list[Path]:
    """Real PEFT LoRA adapters (saved by peft) on a small Llama built from a config."""
    spec = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    return make_tiny_adapters(workdir, [spec] * count, seed=1000, model=model)


@pytest.fixture(scope="session")
def tiny(stack: Stack, peft_adapters: list[Path]) -> list[str]:
    """The three heterogeneous adapters of tests/conftest.py, in team-a's bucket."""
    return [
        upload(stack.s3, d, "adapters-a", f"tiny/task-{i}/") for i, d in enumerate(peft_adapters)
    ]


@pytest.fixture(scope="session")
def big(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three adapters on a wider model (64 modules of 512×512) for a full-space TIES merge
    that takes a few seconds (dense 512×512 updates per module): long enough to watch, to
    cancel and to kill."""
    dirs = make_llama_adapters(
        tmp_path_factory.mktemp("big"), 3, hidden_size=512, intermediate_size=1024,
        num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=8,
    )  # fmt: skip
    return [upload(stack.s3, d, "adapters-a", f"big/task-{i}/") for i, d in enumerate(dirs)]
