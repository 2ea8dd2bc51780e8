"""Redis restart (issue 6): while Redis is away the API answers 503 problem+json with
Retry-After (``/healthz`` stays 200, ``/readyz`` is 503), and it recovers by itself when Redis
is back, without a restart; a job queued before the restart survives it (AOF) and runs."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx

from service.client import CoremergeClient
from tests.integration.conftest import KEY_A, Stack
from tests.processes import RedisServer, Workers, start_api, stop, wait_until

PROBLEM_JSON = "application/problem+json"


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.headers["retry-after"].isdigit()
    body = response.json()
    assert body["status"] == 503 and body["type"] == "urn:coremerge:problem:unavailable"


def test_api_rides_out_a_redis_restart_and_a_queued_job_survives_it(
    stack: Stack, tiny: list[str], tmp_path: Path
) -> None:
    redis_server = RedisServer(tmp_path / "redis")  # our own: the machine's keeps no AOF
    redis_server.start()
    env = {**stack.env, "COREMERGE_REDIS_URL": redis_server.url, "COREMERGE_WORKER_TTL": "15"}
    api, url = start_api(env, tmp_path / "api.log")
    workers = Workers(env, tmp_path, 1)
    headers = {"Authorization": f"Bearer {KEY_A}"}
    spec = {"adapters": [{"uri": u} for u in tiny], "method": "ta",
            "output": {"uri": f"s3://merged/team-a/redis-restart-{uuid.uuid4().hex[:8]}/"}}  # fmt: skip
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=15) as http:
            job = http.post("/merges", json=spec).json()
            assert job["status"] == "queued"  # no worker is running

            redis_server.kill()  # kill -9: what survives is what AOF wrote
            assert_unavailable(http.get(f"/merges/{job['id']}"))
            assert_unavailable(http.post("/merges", json=spec))
            assert_unavailable(http.get("/merges"))
            assert_unavailable(http.get("/readyz"))
            assert http.get("/healthz").status_code == 200

            redis_server.start()  # same port, same directory: it replays its AOF
            assert wait_until(lambda: http.get("/readyz").status_code == 200, "readyz", 20)
            again = http.get(f"/merges/{job['id']}")
            assert again.status_code == 200 and again.json()["status"] == "queued"
            assert api.poll() is None  # the same API process throughout

        workers.start(0)
        with CoremergeClient(url, KEY_A, timeout=10) as client:
            done = client.wait(job["id"], poll_interval=0.1, timeout=90)
        assert done["status"] == "succeeded", (done, workers.tail())
    finally:
        workers.stop_all()
        stop(api)
        redis_server.stop()
