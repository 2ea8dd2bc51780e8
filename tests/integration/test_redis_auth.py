"""A Redis with a password (``requirepass``, as deploy/ runs it): the API and the workers log
in with COREMERGE_REDIS_PASSWORD, a job runs end to end, the password shows in no log, and an
API without it answers 503, not 500."""

from __future__ import annotations

import secrets
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from service.client import CoremergeClient
from tests.integration.conftest import KEY_A, Stack
from tests.processes import RedisServer, Workers, start_api, stop


def test_a_job_runs_against_a_redis_with_a_password(
    stack: Stack, tiny: list[str], tmp_path: Path
) -> None:
    password = secrets.token_hex(16)
    redis_server = RedisServer(tmp_path / "redis", password=password)
    redis_server.start()
    with pytest.raises(redis.AuthenticationError):  # the server really asks for it
        redis.Redis(port=redis_server.port).ping()
    env = {**stack.env, "COREMERGE_REDIS_URL": redis_server.url,
           "COREMERGE_REDIS_PASSWORD": password, "COREMERGE_LOG_LEVEL": "DEBUG"}  # fmt: skip
    api, url = start_api(env, tmp_path / "api.log")
    without = {k: v for k, v in env.items() if k != "COREMERGE_REDIS_PASSWORD"}
    api_without, url_without = start_api(without, tmp_path / "api-without.log")
    workers = Workers(env, tmp_path, 1)
    spec = {"adapters": [{"uri": u} for u in tiny], "method": "ta",
            "output": {"uri": f"s3://merged/team-a/redis-auth-{uuid.uuid4().hex[:8]}/"}}  # fmt: skip
    try:
        workers.start(0)
        with CoremergeClient(url, KEY_A, timeout=10) as client:
            job = client.submit(spec)
            done = client.wait(job["id"], poll_interval=0.1, timeout=90)
        assert done["status"] == "succeeded", (done, workers.tail())

        headers = {"Authorization": f"Bearer {KEY_A}"}
        with httpx.Client(base_url=url_without, headers=headers, timeout=15) as http:
            ready = http.get("/readyz")
            assert ready.status_code == 503, ready.text
            refused = http.get(f"/merges/{job['id']}")
            assert refused.status_code == 503, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
    finally:
        workers.stop_all()
        stop(api)
        stop(api_without)
        redis_server.stop()
    logs = sorted(tmp_path.glob("*.log"))  # both APIs' and the worker's
    assert len(logs) >= 3, logs
    for log in logs:
        assert password not in log.read_text(errors="replace"), log
