"""Structured logs (``jobs.logs``): ``coremerge serve`` writes one JSON object per line, its
access log included, and never an API key, valid or not. (The worker's lines carry job_id and
tenant: ``tests/integration/test_hostile.py`` reads them from the worker of the stack.)"""

from __future__ import annotations

import doctest
import json
import logging
import os
import uuid
from pathlib import Path

import httpx

import jobs.logs
from jobs.logs import JsonFormatter, bind_log_context, log_context
from tests.processes import CLI, free_port, start, stop, wait_until
from tests.service.conftest import KEY_A, KEY_B, spec


def test_serve_logs_json_lines_and_never_an_api_key(
    redis_url: str, tenants_file: Path, tmp_path: Path
) -> None:
    name = f"logs{uuid.uuid4().hex[:8]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("COREMERGE_")},
        "COREMERGE_REDIS_URL": redis_url,
        "COREMERGE_TENANTS_FILE": str(tenants_file),
        "COREMERGE_KEY_PREFIX": name,
        "COREMERGE_QUEUE": name,
        "COREMERGE_LOG_LEVEL": "DEBUG",  # the most a deployment would ever log
    }
    port, log = free_port(), tmp_path / "api.log"
    proc = start([*CLI, "serve", "--port", str(port), "--access-log"], env, log)
    url = f"http://127.0.0.1:{port}"
    wrong_key = f"not-a-key-{uuid.uuid4().hex}"
    try:
        wait_until(
            lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, "API", 30, proc
        )
        auth = {"Authorization": f"Bearer {KEY_A}"}
        with httpx.Client(base_url=url, timeout=10) as client:
            keyed = {**auth, "Idempotency-Key": f"logs-{uuid.uuid4().hex}"}
            job = client.post("/merges", json=spec(), headers=keyed)
            assert job.status_code == 202, job.text
            assert client.post("/merges", json=spec(), headers=keyed).status_code == 200
            assert client.get(f"/merges/{job.json()['id']}", headers=auth).status_code == 200
            assert client.post("/merges", json=spec(seed=-1), headers=auth).status_code == 422
            assert client.delete(f"/merges/{job.json()['id']}", headers=auth).status_code == 200
            for key in (wrong_key, KEY_B):  # an unknown key; another tenant's on a 404
                r = client.get(
                    f"/merges/{job.json()['id']}", headers={"Authorization": f"Bearer {key}"}
                )
                assert r.status_code in (401, 404)
            client.get("/merges", headers={"Authorization": f"Basic {KEY_A}"})
    finally:
        stop(proc)
    text = log.read_text()
    for secret in (KEY_A, KEY_B, wrong_key):
        assert secret not in text
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines), text
    access = [line["message"] for line in lines if line["logger"] == "uvicorn.access"]
    assert any('"POST /merges HTTP/1.1" 202' in message for message in access), access
    assert any(line["logger"] == "uvicorn.error" for line in lines), text  # startup lines too


def test_docstring_example() -> None:
    result = doctest.testmod(jobs.logs)
    assert result.attempted > 0 and result.failed == 0


def test_context_fields_and_tracebacks_in_json() -> None:
    def line(record: logging.LogRecord) -> dict:
        return json.loads(JsonFormatter().format(record))

    record = logging.LogRecord("coremerge.worker", logging.INFO, "", 0, "job %s", ("j",), None)
    assert "job_id" not in line(record)
    with log_context(job_id="j1"):
        bind_log_context(tenant="team-a")
        assert line(record) | {"time": None} == {
            "time": None, "level": "INFO", "logger": "coremerge.worker", "message": "job j",
            "job_id": "j1", "tenant": "team-a",
        }  # fmt: skip
    assert "tenant" not in line(record)  # the block's fields end with it
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord("x", logging.ERROR, "", 0, "failed", (), sys.exc_info())
    assert "ValueError: boom" in line(failed)["exception"]
