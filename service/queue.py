"""RQ glue: one way to enqueue a merge, and what happens when a worker dies under a job.

FIELD-NOTES decide the details: RQ's defaults lose or repeat work (180 s timeout, results
gone after 500 s, pickle), so every enqueue sets ``job_timeout``, ``result_ttl``,
``failure_ttl`` and ``Retry`` and the queue and worker both use the JSON serializer. The RQ
job id is the job id: hashed from the Idempotency-Key when there is one, and enqueued with
``unique=True`` so the same id is never queued twice.

RQ only re-runs a job whose *worker died* (``Retry``): the job function handles every merge
failure itself and returns normally, so a bad adapter is never retried. When a worker dies,
the record is moved back to ``queued`` (a retry follows) or to ``failed`` with ``internal``.

Crash recovery is RQ's own (docs/service.md, "Crash safety"): a work horse that dies under a
live worker is reported at once (``on_work_horse_killed``); a whole worker that vanishes stops
heartbeating, and the next maintenance pass of any other worker finds its job abandoned in the
``StartedJobRegistry`` and retries or fails it (``on_job_failure``). Two adjustments, both in
:class:`MergeWorker` / :class:`MergeQueue`: a dead worker's job is abandoned
``COREMERGE_WORKER_TTL`` seconds after its last heartbeat (RQ hard-codes 60 s more than the
heartbeat interval), and the maintenance lock lasts seconds, not RQ's 15 minutes, so a worker
killed while cleaning does not stall everybody's recovery.

This module imports RQ but never torch; ``worker.job`` is named by its import path only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from rq import Callback, Queue, Retry, Worker
from rq.exceptions import DuplicateJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from service.config import Settings
from service.jobs import JobStore

__all__ = [
    "JOB_FUNCTION",
    "DuplicateJobError",
    "MergeQueue",
    "MergeWorker",
    "cancel_queued",
    "enqueue_merge",
    "make_queue",
    "on_job_failure",
    "on_work_horse_killed",
]

log = logging.getLogger("coremerge.queue")

#: The RQ job function, by name: the API never imports the worker side.
JOB_FUNCTION = "worker.job.run_job"

#: Called with (job id, output URI) when a job has just ended ``failed`` because its worker
#: died on the last attempt. ``coremerge worker`` sets it to release the output claim that a
#: run killed while publishing leaves (``worker.storage.release_claim``); the API, which
#: never fails a job this way, leaves it unset.
on_final_worker_death: Callable[[str, str], None] | None = None


#: Seconds a worker holds the lock for cleaning a queue's registries. RQ takes it for 899 s
#: and releases it when done; a worker killed in between would block every other worker's
#: clean-up, and with it the recovery of abandoned jobs, for 15 minutes. A pass takes
#: milliseconds.
MAINTENANCE_LOCK_S = 30


class MergeQueue(Queue):
    """RQ's queue with a short maintenance lock (:data:`MAINTENANCE_LOCK_S`)."""

    def acquire_maintenance_lock(self) -> bool:
        return bool(
            self.connection.set(self.registry_cleaning_key, 1, nx=True, ex=MAINTENANCE_LOCK_S)
        )


class MergeWorker(Worker):
    """RQ's forking worker; a job is abandoned ``worker_ttl`` seconds after its worker's last
    heartbeat. RQ extends a running job's entry in the ``StartedJobRegistry`` at every
    heartbeat (every ``job_monitoring_interval`` seconds) to the next one plus a fixed 60 s;
    here the margin is ``worker_ttl`` (COREMERGE_WORKER_TTL), so a deployment chooses how
    soon a dead worker's job is retried, at the price of a duplicate run should a live
    worker's heartbeat be late by that much (the job is idempotent: docs/service.md)."""

    def handle_job_failure(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: Any = None,
        exc_string: str = "",
        execution: Any = None,
    ) -> None:
        """RQ's, then the job record's. A worker that died between taking a job off the queue
        and registering it leaves the job in RQ's intermediate queue, whose clean-up (any
        worker's maintenance, a minute later) ends here and calls none of our callbacks: with
        retries left RQ queues it again (the record is still ``queued``: right), on the last
        one RQ fails it, and so must the record, or it would stay ``queued`` for ever."""
        final = not job.should_retry
        super().handle_job_failure(
            job, queue, started_job_registry=started_job_registry, exc_string=exc_string,
            execution=execution,
        )  # fmt: skip
        # Every other way here (a killed work horse, an exception out of the job function)
        # has already ended the record through a callback: fail() then changes nothing.
        if final and _store_for(job, self.connection).fail(
            job.id, "internal", f"RQ gave up on it ({exc_string.strip()}); no retries left"
        ):
            log.error("job %s: RQ gave up on it (%s); marked failed", job.id, exc_string.strip())

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        interval = float(self.job_monitoring_interval)
        if job.timeout and job.timeout > 0:
            interval = min(interval, job.timeout - working_time)
        return max(1, int(interval)) + self.worker_ttl


def heartbeat_interval(settings: Settings) -> int:
    """Seconds between a busy worker's heartbeats: a quarter of COREMERGE_WORKER_TTL."""
    return max(1, settings.worker_ttl // 4)


def make_queue(redis: Any, settings: Settings) -> Queue:
    return MergeQueue(settings.queue, connection=redis, serializer=JSONSerializer)


def enqueue_merge(queue: Queue, job_id: str, settings: Settings, *, pipeline: Any = None) -> Job:
    """Queue the merge job ``job_id``. Alone, it is enqueued with ``unique=True`` and raises
    ``DuplicateJobError`` when RQ already holds a job with this id (an Idempotency-Key's id);
    with ``pipeline`` it joins that transaction (RQ ignores ``unique`` in a pipeline, so only
    for ids that cannot collide)."""
    return queue.enqueue_call(
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
        on_failure=Callback(on_job_failure),
        meta={"key_prefix": settings.key_prefix, "result_ttl": settings.result_ttl},
        description=f"coremerge merge {job_id}",
    )


def cancel_queued(queue: Queue, job_id: str) -> None:
    """Take a canceled job out of RQ's queue (best effort: the worker skips it anyway)."""
    with contextlib.suppress(NoSuchJobError, InvalidJobOperation):
        Job.fetch(job_id, connection=queue.connection, serializer=JSONSerializer).cancel()


def _store_for(job: Job, connection: Any) -> JobStore:
    meta = job.meta or {}
    return JobStore(
        connection,
        key_prefix=meta.get("key_prefix", "coremerge"),
        result_ttl=int(meta.get("result_ttl", 604_800)),
    )


def _record_worker_death(job: Job, connection: Any, what: str) -> None:
    store = _store_for(job, connection)
    if job.retries_left:
        store.requeue(job.id, what)
        log.warning(
            "job %s: %s; RQ runs it again (%d retries left)", job.id, what, job.retries_left
        )
    else:
        store.fail(job.id, "internal", f"{what}; no retries left")
        log.error("job %s: %s; marked failed", job.id, what)
        _release_output(store, job.id)


def _release_output(store: JobStore, job_id: str) -> None:
    record = store.get(job_id)
    uri = ((record.request if record else {}).get("output") or {}).get("uri")
    if on_final_worker_death is None or not uri:
        return
    try:
        on_final_worker_death(job_id, uri)
    except Exception:  # best effort: a claim left is refused to later jobs by name
        log.warning("job %s: could not release its claim on %s", job_id, uri, exc_info=True)


def on_job_failure(job: Job, connection: Any, exc_type: Any, exc_value: Any, tb: Any) -> None:
    """RQ's failure callback. The job function catches every merge error itself, so this runs
    for an abandoned job (its worker vanished) or an exception that escaped the function."""
    name = getattr(exc_type, "__name__", str(exc_type))
    if name == "AbandonedJobError":
        _record_worker_death(job, connection, "its worker died")
    else:
        _store_for(job, connection).fail(job.id, "internal", f"the job function raised {name}")


def on_work_horse_killed(job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
    """The forked work horse died under a job (killed, out of memory, segfault)."""
    _record_worker_death(
        job, job.connection, f"the merge process died (wait status {ret_val}; out of memory?)"
    )
