"""jobs.queue with real RQ objects on a real Redis: a job RQ gives up on by itself (its
worker died between taking it off the queue and starting it) does not leave the record
``queued`` for ever."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
from redis import Redis
from rq.serializers import JSONSerializer

from jobs.queue import enqueue_merge, make_queue
from jobs.records import JobStore, job_id_for
from jobs.settings import Settings
from jobs.spec import MergeSpec
from tests.service.conftest import spec
from worker.rq_worker import ESCAPED, GAVE_UP, MergeWorker, on_job_failure


def _stuck_in_the_intermediate_queue(settings: Settings) -> tuple[JobStore, str]:
    """A queued job as the API leaves it, then what a worker that died right after taking it
    leaves: its id moved to RQ's intermediate list, nothing in the started registry, first
    seen there two minutes ago (RQ cleans it up after one)."""
    redis = Redis.from_url(settings.redis_url)
    store = JobStore(redis, key_prefix=settings.key_prefix, result_ttl=settings.result_ttl)
    job_id = job_id_for("team-a", None)
    store.create(job_id, "team-a", MergeSpec.model_validate(spec()).model_dump(mode="json"))
    queue = make_queue(redis, settings)
    enqueue_merge(queue, job_id, settings)
    store.mark_accepted(job_id)
    intermediate = queue.intermediate_queue
    assert redis.lmove(queue.key, intermediate.key, "RIGHT", "LEFT") == job_id.encode()
    redis.set(intermediate.get_first_seen_key(job_id), time.time() - 120)
    worker = MergeWorker([queue], connection=redis, serializer=JSONSerializer)
    intermediate.cleanup(worker, queue)  # what every worker's maintenance runs
    return store, job_id


@pytest.mark.parametrize("retries", [0, 1])
def test_a_job_stuck_in_the_intermediate_queue_is_retried_or_ends_failed(
    make_settings: Callable[..., Settings], retries: int, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(job_retries=retries)
    with caplog.at_level(logging.ERROR, logger="coremerge.queue"):
        store, job_id = _stuck_in_the_intermediate_queue(settings)
    record = store.get(job_id)
    assert record is not None
    queue = make_queue(store.redis, settings)
    if retries:
        assert record.status == "queued"  # RQ queued it again: a worker will run it
        assert job_id in queue.job_ids
    else:
        assert record.status == "failed", record
        assert record.error is not None and record.error["code"] == "internal"
        assert record.error["message"] == GAVE_UP  # RQ's own text stays in the log
        assert "intermediate queue" in caplog.text
        assert job_id not in queue.job_ids
    assert queue.intermediate_queue.get_job_ids() == []


def test_a_record_already_ended_is_left_alone(make_settings: Callable[..., Settings]) -> None:
    """The callbacks end the record first on every other path; RQ's failure handling after
    them must not overwrite it (here: canceled while RQ still held the job)."""
    settings = make_settings(job_retries=0)
    redis = Redis.from_url(settings.redis_url)
    store = JobStore(redis, key_prefix=settings.key_prefix, result_ttl=settings.result_ttl)
    job_id = job_id_for("team-a", None)
    store.create(job_id, "team-a", MergeSpec.model_validate(spec()).model_dump(mode="json"))
    queue = make_queue(redis, settings)
    job = enqueue_merge(queue, job_id, settings)
    store.mark_accepted(job_id)
    assert store.cancel(job_id) == "canceled"
    MergeWorker([queue], connection=redis, serializer=JSONSerializer).handle_job_failure(
        job, queue, exc_string="Job was stuck in intermediate queue."
    )
    record = store.get(job_id)
    assert record is not None and record.status == "canceled"


def test_an_exception_escaping_the_job_function_is_a_fixed_message(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """Its text can name hosts and paths: it goes to the worker's log, not to the client."""
    settings = make_settings()
    redis = Redis.from_url(settings.redis_url)
    store = JobStore(redis, key_prefix=settings.key_prefix, result_ttl=settings.result_ttl)
    job_id = job_id_for("team-a", None)
    store.create(job_id, "team-a", MergeSpec.model_validate(spec()).model_dump(mode="json"))
    job = enqueue_merge(make_queue(redis, settings), job_id, settings)
    leak = RuntimeError("cannot open /srv/secret on 10.0.0.7:6379")
    with caplog.at_level(logging.ERROR, logger="coremerge.queue"):
        on_job_failure(job, redis, RuntimeError, leak, None)
    record = store.get(job_id)
    assert record.error == {"code": "internal", "message": ESCAPED}
    assert "10.0.0.7:6379" in caplog.text
