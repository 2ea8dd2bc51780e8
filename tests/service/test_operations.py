"""What an operator sees (issue 25 §2): workers and waiting jobs in ``/readyz`` and
``/metrics``, with a hint when jobs wait and no worker listens; job outcomes counted by error
code; a job's attempts, last update, percentage and ETA."""

from __future__ import annotations

import re
import time

from redis import Redis
from rq import Worker
from rq.serializers import JSONSerializer

from jobs.queue import make_queue
from jobs.records import JobStore
from service.api.models import progress_view
from tests.service.conftest import AUTH_A, spec


def _metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert match is not None, name + labels
    return float(match.group(1))


def test_readyz_and_metrics_count_workers_and_hint_when_none_listens(client, settings) -> None:
    client.post("/merges", json=spec(), headers=AUTH_A)
    ready = client.get("/readyz").json()
    assert ready["workers"] == 0 and ready["queued"] == 1
    assert "no worker listens on queue" in ready["hint"] and settings.queue in ready["hint"]
    assert _metric(client.get("/metrics").text, "coremerge_workers") == 0
    redis = Redis.from_url(settings.redis_url)
    worker = Worker([make_queue(redis, settings)], connection=redis, serializer=JSONSerializer)
    worker.register_birth()
    try:
        ready = client.get("/readyz").json()
        assert ready["workers"] == 1 and "hint" not in ready
        assert _metric(client.get("/metrics").text, "coremerge_workers") == 1
    finally:
        worker.register_death()


def test_failures_are_counted_by_code(client, settings, redis) -> None:
    store = JobStore(redis, key_prefix=settings.key_prefix)
    ids = [client.post("/merges", json=spec(), headers=AUTH_A).json()["id"] for _ in range(4)]
    for job_id, code in zip(ids[:2], ("adapter_invalid", "adapter_invalid"), strict=True):
        store.fail(job_id, code, "bad", run=store.start(job_id))
    store.fail(ids[2], "timeout", "slow", run=store.start(ids[2]))
    client.delete(f"/merges/{ids[3]}", headers=AUTH_A)  # canceled before it started
    text = client.get("/metrics").text
    assert _metric(text, "coremerge_jobs_failed_total", '{code="adapter_invalid"}') == 2
    assert _metric(text, "coremerge_jobs_failed_total", '{code="timeout"}') == 1
    assert _metric(text, "coremerge_jobs_failed_total", '{code="canceled"}') == 1
    assert _metric(text, "coremerge_jobs_failed_total", '{code="internal"}') == 0


def test_a_job_shows_attempts_its_last_update_and_an_eta(client, settings, redis) -> None:
    store = JobStore(redis, key_prefix=settings.key_prefix)
    job = client.post("/merges", json=spec(), headers=AUTH_A).json()
    assert job["attempts"] == 0 and job["updated_at"] == job["created_at"]
    run = store.start(job["id"])
    time.sleep(0.01)
    store.report_progress(
        job["id"], {"stage": "merge", "modules_done": 10, "modules_total": 40}, run=run
    )
    seen = client.get(f"/merges/{job['id']}", headers=AUTH_A).json()
    assert seen["attempts"] == 1 and seen["updated_at"] > seen["started_at"]
    assert seen["progress"]["percent"] == 25.0 and seen["progress"]["eta_seconds"] is not None
    summary = client.get("/merges", headers=AUTH_A).json()["jobs"][0]
    assert summary["attempts"] == 1 and summary["updated_at"] == seen["updated_at"]


def test_the_eta_follows_the_module_rate() -> None:
    started = "2026-01-01T00:00:00.000Z"
    now = 1767225600.0 + 30  # 30 s after started, 10 of 40 modules done: 90 s to go
    merging = {"stage": "merge", "modules_done": 10, "modules_total": 40}
    assert progress_view(merging, started, now=now)["eta_seconds"] == 90.0
    assert progress_view({**merging, "stage": "upload"}, started, now=now)["eta_seconds"] is None
    planning = {"stage": "plan", "modules_done": 0, "modules_total": 0}
    assert progress_view(planning, started, now=now)["percent"] is None
