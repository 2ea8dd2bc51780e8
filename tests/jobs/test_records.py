"""The job record's status machine, progress and counters (jobs.records) on a real Redis."""

from __future__ import annotations

import pytest

from jobs.listing import list_jobs
from jobs.records import JobStore, fingerprint, job_id_for

REQUEST = {"adapters": [{"uri": "s3://a/x/"}], "output": {"uri": "s3://a/out/"}}


@pytest.fixture
def store(redis, settings) -> JobStore:
    return JobStore(redis, key_prefix=settings.key_prefix, result_ttl=3600)


def new_job(store: JobStore, tenant: str = "t") -> str:
    job_id = job_id_for(tenant, None)
    assert store.create(job_id, tenant, REQUEST) is not None
    store.mark_accepted(job_id)
    return job_id


def test_job_ids() -> None:
    assert job_id_for("a", "k") == job_id_for("a", "k") != job_id_for("b", "k")
    assert job_id_for("a", None) != job_id_for("a", None)
    assert len(job_id_for("a", "k")) == 32
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})


def test_happy_path_and_terminal_ttl(store, redis) -> None:
    job_id = new_job(store)
    assert store.create(job_id, "t", REQUEST) is None  # ids are unique
    assert redis.ttl(store.job_key(job_id)) == -1  # active records do not expire
    assert store.start(job_id)
    assert not store.start(job_id)  # only from queued
    assert not store.report_progress(
        job_id, {"stage": "merge", "modules_done": 1, "modules_total": 4}
    )
    assert store.get(job_id).progress["modules_done"] == 1
    assert store.succeed(job_id, {"uri": "s3://a/out/", "seconds": 2.5})
    record = store.get(job_id)
    assert record.status == "succeeded" and record.result["seconds"] == 2.5
    assert record.started_at and record.finished_at and record.attempts == 1
    assert 3590 < redis.ttl(store.job_key(job_id)) <= 3600
    # terminal is final
    assert not store.fail(job_id, "internal", "late")
    assert store.cancel(job_id) == "succeeded"
    assert store.report_progress(job_id, {"stage": "merge", "modules_done": 9, "modules_total": 9})
    assert store.get(job_id).progress["modules_done"] == 1


def test_cancel_queued_and_running(store) -> None:
    queued, running = new_job(store), new_job(store)
    assert store.cancel(queued) == "canceled"
    assert not store.start(queued)  # a worker that picks it up later does nothing
    store.start(running)
    assert store.cancel(running) == "requested"
    assert store.get(running).status == "running"
    assert store.should_stop(running)
    assert store.report_progress(running, {"stage": "merge", "modules_done": 2, "modules_total": 4})
    assert store.fail(running, "canceled", "stopped")
    assert store.get(running).status == "canceled"
    assert store.cancel("0" * 32) is None


def test_worker_death_requeues_then_fails(store) -> None:
    job_id = new_job(store)
    store.start(job_id)
    assert store.requeue(job_id, "its worker died")
    record = store.get(job_id)
    assert record.status == "queued" and record.progress is None
    assert store.start(job_id)
    assert store.get(job_id).attempts == 2
    assert store.fail(job_id, "internal", "no retries left")
    assert store.get(job_id).error == {"code": "internal", "message": "no retries left"}


def test_counters(store) -> None:
    a, b, c = new_job(store), new_job(store), new_job(store)
    store.start(a)
    store.succeed(a, {"seconds": 3.0})
    store.start(b)
    store.cancel(c)
    stats = store.stats()
    assert stats["active:queued"] == 0 and stats["active:running"] == 1
    assert stats["entered:queued"] == 3 and stats["entered:succeeded"] == 1
    assert stats["entered:canceled"] == 1
    assert stats["merge_seconds_count"] == 1 and stats["merge_seconds_sum"] == 3.0
    assert stats["merge_seconds_le:5"] == 1 and "merge_seconds_le:2" not in stats


def test_discard_undoes_create(store) -> None:
    job_id = job_id_for("t", "k")
    store.create(job_id, "t", REQUEST)
    store.discard(job_id, "t")
    assert store.get(job_id) is None
    assert list_jobs(store, "t").jobs == []
    assert store.stats().get("active:queued", 0) == 0


def test_list_drops_expired_records(store, redis) -> None:
    ids = [new_job(store, "lister") for _ in range(4)]
    redis.delete(store.job_key(ids[1]))  # as if it expired
    assert [r.id for r in list_jobs(store, "lister").jobs] == [ids[3], ids[2], ids[0]]
    assert redis.zcard(store.tenant_key("lister")) == 3
    assert [r.id for r in list_jobs(store, "lister", limit=2).jobs] == [ids[3], ids[2]]
    assert list_jobs(store, "lister", status="running").jobs == []


def test_a_cancel_is_honoured_until_the_report_and_refused_after(store: JobStore) -> None:
    """The worker commits right before it writes the report; a cancel and a commit cannot
    cross: whichever comes first decides."""
    first = new_job(store)
    run = store.start(first)
    assert run is not None
    assert store.cancel(first) == "requested"
    assert not store.commit(first, run=run)  # canceled first: the worker stops

    second = new_job(store)
    run = store.start(second)
    assert run is not None
    assert store.commit(second, run=run)  # the report is being written
    assert store.cancel(second) == "committing"  # too late: the API answers 409
    assert not store.should_stop(second, run=run)
    assert not store.commit(second, run="another-run")  # a replaced run never commits
