"""``jobs.submission``: the submission protocol without HTTP, on the session's Redis and a real
RQ queue. Record and queue entry appear together; a keyed repeat finds its job; refusals are
domain errors (the HTTP layer maps them) and leave nothing queued."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

from jobs.listing import list_jobs
from jobs.queue import make_queue
from jobs.records import JobStore, QuotaExceeded, job_id_for
from jobs.spec import MergeSpec
from jobs.submission import IdempotencyKeyReused, StillAccepting, Submitted, submit
from tests.service.conftest import spec

ROOT = Path(__file__).resolve().parents[2]


def _request(**changes: object) -> dict:
    return MergeSpec.model_validate(spec(**changes)).model_dump(mode="json")


def _submit(store, queue, settings, key: str | None, request: dict) -> Submitted:
    return submit(
        store, queue, settings, job_id=job_id_for("team-a", key), tenant="team-a",
        request=request, keyed=key is not None,
    )  # fmt: skip


def test_an_unkeyed_job_is_recorded_and_queued_together(settings, redis) -> None:
    store, queue = JobStore(redis, key_prefix=settings.key_prefix), make_queue(redis, settings)
    first = _submit(store, queue, settings, None, _request())
    second = _submit(store, queue, settings, None, _request())
    assert first.created and second.created and first.record.id != second.record.id
    assert queue.job_ids == [first.record.id, second.record.id]
    assert store.get(first.record.id).status == "queued"


def test_a_keyed_repeat_finds_its_job_and_another_body_is_refused(settings, redis) -> None:
    store, queue = JobStore(redis, key_prefix=settings.key_prefix), make_queue(redis, settings)
    first = _submit(store, queue, settings, "run-1", _request())
    again = _submit(store, queue, settings, "run-1", _request())
    assert first.created and not again.created and again.record.id == first.record.id
    assert again.record.accepting_since is None
    with pytest.raises(IdempotencyKeyReused):
        _submit(store, queue, settings, "run-1", _request(seed=7))
    assert queue.job_ids == [first.record.id]


def test_a_repeat_while_the_first_is_accepting_is_told_to_retry(settings, redis) -> None:
    store, queue = JobStore(redis, key_prefix=settings.key_prefix), make_queue(redis, settings)
    job_id = job_id_for("team-a", "slow")
    assert store.create(job_id, "team-a", _request()) is not None  # marked accepting, not queued
    with pytest.raises(StillAccepting):
        _submit(store, queue, settings, "slow", _request())
    stale = time.time() - 3600  # the first request died long ago: the repeat finishes its work
    redis.hset(store.job_key(job_id), "accepting", repr(stale))
    again = _submit(store, queue, settings, "slow", _request())
    assert not again.created and queue.job_ids == [job_id]


def test_a_quota_refusal_creates_and_queues_nothing(make_settings, redis) -> None:
    settings = make_settings(max_active_jobs=1)
    store = JobStore(redis, key_prefix=settings.key_prefix, max_active_jobs=1)
    queue = make_queue(redis, settings)
    kept = _submit(store, queue, settings, None, _request())
    for key in (None, "keyed"):
        with pytest.raises(QuotaExceeded) as refused:
            _submit(store, queue, settings, key, _request())
        assert refused.value.limit == "max_active_jobs" and refused.value.retry_after > 0
    assert queue.job_ids == [kept.record.id]
    assert [r.id for r in list_jobs(store, "team-a").jobs] == [kept.record.id]


def test_the_http_layer_does_not_import_rq() -> None:
    """The protocol lives in jobs/; service/ reaches RQ only through it."""
    for path in sorted((ROOT / "service").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not [n for n in names if n == "rq" or n.startswith("rq.")], path
