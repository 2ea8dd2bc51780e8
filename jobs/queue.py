"""Enqueueing merges to RQ: one way to queue a job, and one to take a canceled one out.

RQ's defaults lose or repeat work (a 180 s timeout, results gone after 500 s, pickle), so
every enqueue sets ``job_timeout``, ``result_ttl``, ``failure_ttl`` and ``Retry`` and the queue
and worker both use the JSON serializer. The RQ job id is the job id: hashed from the
Idempotency-Key when there is one, and enqueued with ``unique=True`` so the same id is never
queued twice.

RQ only re-runs a job whose *worker died* (``Retry``): the job function handles every merge
failure itself and returns normally, so a bad adapter is never retried. What happens when a
worker dies is the worker side's business (``worker.rq_worker``); this module names the job
function and the failure hook by their import paths only, so the API never imports the
worker side (nor torch).
"""

from __future__ import annotations

import contextlib
from typing import Any

from rq import Callback, Queue, Retry
from rq.exceptions import DuplicateJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from jobs.fairness import place
from jobs.settings import Settings

__all__ = [
    "JOB_FUNCTION",
    "MAINTENANCE_LOCK_S",
    "DuplicateJobError",
    "MergeQueue",
    "cancel_queued",
    "enqueue_merge",
    "enqueue_merge_once",
    "make_queue",
    "withdraw",
    "workers_listening",
]

#: The RQ job function, by name: the API never imports the worker side.
JOB_FUNCTION = "worker.job.run_job"
#: RQ's failure callback, by name (see ``worker.rq_worker.on_job_failure``).
FAILURE_CALLBACK = "worker.rq_worker.on_job_failure"


#: Seconds a worker holds the lock for cleaning a queue's registries. RQ takes it for 899 s
#: and releases it when done; a worker killed in between would block every other worker's
#: clean-up, and with it the recovery of abandoned jobs, for 15 minutes. A pass takes
#: milliseconds.
MAINTENANCE_LOCK_S = 30


class MergeQueue(Queue):
    """RQ's queue with a short maintenance lock (:data:`MAINTENANCE_LOCK_S`), whose jobs wait
    in fair turns between tenants (``jobs.fairness``): every push at the back goes to the
    job's fair place instead."""

    def acquire_maintenance_lock(self) -> bool:
        return bool(
            self.connection.set(self.registry_cleaning_key, 1, nx=True, ex=MAINTENANCE_LOCK_S)
        )

    def push_job_id(self, job_id: str, pipeline: Any = None, at_front: bool = False) -> None:
        super().push_job_id(job_id, pipeline=pipeline, at_front=at_front)
        if not at_front:
            place(self.connection, self.key, job_id, pipeline=pipeline)


def make_queue(redis: Any, settings: Settings) -> Queue:
    return MergeQueue(settings.queue, connection=redis, serializer=JSONSerializer)


def enqueue_merge(
    queue: Queue,
    job_id: str,
    settings: Settings,
    *,
    tenant: str | None = None,
    pipeline: Any = None,
) -> Job:
    """Queue the merge job ``job_id`` of ``tenant``, at its tenant's fair place
    (``jobs.fairness``). Alone, it is enqueued with ``unique=True`` and raises
    ``DuplicateJobError`` when RQ already holds a job with this id (an Idempotency-Key's id);
    with ``pipeline`` it joins that transaction (RQ ignores ``unique`` in a pipeline, so only
    for ids that cannot collide)."""
    meta = {"key_prefix": settings.key_prefix, "result_ttl": settings.result_ttl}
    if tenant is not None:
        meta["tenant"] = tenant
    job = queue.enqueue_call(
        JOB_FUNCTION,
        args=(job_id,),
        job_id=job_id,
        unique=pipeline is None,
        pipeline=pipeline,
        timeout=settings.job_timeout,
        result_ttl=settings.result_ttl,
        failure_ttl=settings.result_ttl,
        ttl=None,  # a queued merge waits for a worker as long as it takes
        retry=Retry(max=settings.job_retries) if settings.job_retries else None,
        on_failure=Callback(FAILURE_CALLBACK),
        meta=meta,
        description=f"coremerge merge {job_id}",
    )
    if pipeline is None:  # RQ's unique enqueue pushes in a script of its own, not push_job_id
        place(queue.connection, queue.key, job_id)
    return job


def enqueue_merge_once(
    queue: Queue, job_id: str, settings: Settings, *, tenant: str | None = None
) -> None:
    """Queue the merge ``job_id`` unless RQ already has it queued or running: for keyed ids,
    which a submission, its repeat and the API's sweep of stranded submissions may all try
    to queue. A *finished* RQ job under this id (its record expired before RQ's result did)
    is replaced."""
    try:
        enqueue_merge(queue, job_id, settings, tenant=tenant)
    except DuplicateJobError:
        old = Job.fetch(job_id, connection=queue.connection, serializer=JSONSerializer)
        if old.get_status() in ("queued", "started", "deferred", "scheduled"):
            return  # the job is in the queue already
        old.delete()
        enqueue_merge(queue, job_id, settings, tenant=tenant)


def withdraw(queue: Queue, job_id: str) -> None:
    """Delete the RQ job ``job_id`` that went into the queue together with a record the
    same transaction then refused (a quota): no worker should run it (one that already took
    it finds no record and does nothing)."""
    with contextlib.suppress(NoSuchJobError, InvalidJobOperation):
        Job.fetch(job_id, connection=queue.connection, serializer=JSONSerializer).delete()


def cancel_queued(queue: Queue, job_id: str) -> None:
    """Take a canceled job out of RQ's queue (best effort: the worker skips it anyway)."""
    with contextlib.suppress(NoSuchJobError, InvalidJobOperation):
        Job.fetch(job_id, connection=queue.connection, serializer=JSONSerializer).cancel()


def workers_listening(queue: Queue) -> int:
    """How many RQ workers are registered on ``queue`` now (a worker's registration lapses
    when its heartbeats stop)."""
    from rq import Worker

    return Worker.count(connection=queue.connection, queue=queue)
