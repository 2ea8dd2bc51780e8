"""The RQ worker that runs merges, and what happens when a worker dies under a job.

When a worker dies, the job record is moved back to ``queued`` (RQ's ``Retry`` runs it again)
or, on the last attempt, to ``failed`` with ``internal`` and the output claim its run may have
left is released. Crash recovery is RQ's own (docs/service.md, "Crash safety"): a work horse
that dies under a live worker is reported at once (:func:`on_work_horse_killed`); a whole
worker that vanishes stops heartbeating, and the next maintenance pass of any other worker
finds its job abandoned in the ``StartedJobRegistry`` and retries or fails it
(:func:`on_job_failure`). Two adjustments to RQ: a dead worker's job is abandoned
``COREMERGE_WORKER_TTL`` seconds after its last heartbeat (RQ hard-codes 60 s more than the
heartbeat interval, :class:`MergeWorker`), and the maintenance lock lasts seconds, not RQ's 15
minutes (``jobs.queue.MergeQueue``), so a worker killed while cleaning does not stall
everybody's recovery.

This module imports RQ and boto3 but never torch: the worker's parent process uses it.
"""

from __future__ import annotations

import logging
from typing import Any

from rq import Queue, Worker
from rq.job import Job
from rq.utils import now

from jobs.fairness import took
from jobs.notify import Notifier
from jobs.records import JobRecord, JobStore
from jobs.settings import Settings
from worker.workdir import sweep_attempts

__all__ = [
    "MergeWorker",
    "heartbeat_interval",
    "on_job_failure",
    "on_work_horse_killed",
]

log = logging.getLogger("coremerge.queue")

#: The job errors of failures RQ reports in its own words (which stay in the worker's log).
GAVE_UP = (
    "the job could not be run (RQ gave up on it, no retries left); the worker's log has the details"
)
ESCAPED = "the job ended unexpectedly; nothing was published and the worker's log has the details"


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
        # has already ended the record through a callback: fail() then changes nothing. RQ's
        # text goes to the log only: the client sees a fixed message.
        if final and _store_for(job, self.connection).fail(job.id, "internal", GAVE_UP):
            log.error("job %s: RQ gave up on it (%s); marked failed", job.id, exc_string.strip())

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run ``job``; first record that its round is being served, so that jobs queued
        from now on take their turns after it (``jobs.fairness``)."""
        try:
            took(self.connection, queue.key, job.id)
        except Exception:  # fairness is bookkeeping: a failure to note it must not lose a job
            log.warning("job %s: could not record its fair round", job.id, exc_info=True)
        super().execute_job(job, queue)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        interval = float(self.job_monitoring_interval)
        if job.timeout and job.timeout > 0:
            interval = min(interval, job.timeout - working_time)
        return max(1, int(interval)) + self.worker_ttl


def heartbeat_interval(settings: Settings) -> int:
    """Seconds between a busy worker's heartbeats: a quarter of COREMERGE_WORKER_TTL."""
    return max(1, settings.worker_ttl // 4)


def _store_for(job: Job, connection: Any) -> JobStore:
    meta = job.meta or {}
    return JobStore(
        connection,
        key_prefix=meta.get("key_prefix", "coremerge"),
        result_ttl=int(meta.get("result_ttl", 604_800)),
        on_final=Notifier(Settings()),  # a timeout or a give-up is notified in line
    )


def _record_worker_death(job: Job, connection: Any, what: str) -> None:
    store = _store_for(job, connection)
    record = store.get(job.id)
    dead_run = record.run if record else None  # read before the record lets it go
    if job.retries_left:
        store.requeue(job.id, what)
        log.warning(
            "job %s: %s; RQ runs it again (%d retries left)", job.id, what, job.retries_left
        )
        _remove_leftovers(record, dead_run)
    else:
        store.fail(job.id, "internal", f"{what}; no retries left")
        log.error("job %s: %s; marked failed", job.id, what)
        _remove_leftovers(record, None)  # no run of it is left: every object of the job


def _remove_leftovers(record: JobRecord | None, run: str | None) -> None:
    """What the dead run left at the output: its claim, a partial upload (only objects that
    run wrote, or with ``run`` None that the job wrote; ``worker.storage.publish``)."""
    uri = ((record.request if record else {}).get("output") or {}).get("uri")
    if record is None or not uri:
        return
    from worker.storage import remove_dead_run_leftovers  # boto3, no torch; only on this rare path

    try:
        remove_dead_run_leftovers(Settings(), record.id, uri, run, secret=record.output_secret)
    except Exception:  # best effort: a claim left is waited for, then the job fails
        log.warning("job %s: could not remove what its dead run left at its output", record.id,
                    exc_info=True)  # fmt: skip


def on_job_failure(job: Job, connection: Any, exc_type: Any, exc_value: Any, tb: Any) -> None:
    """RQ's failure callback. The job function catches every merge error itself, so this runs
    for an abandoned job (its worker vanished) or an exception that escaped the function
    (its type and text go to the log; the client sees a fixed message)."""
    name = getattr(exc_type, "__name__", str(exc_type))
    if name == "AbandonedJobError":
        _record_worker_death(job, connection, "its worker died")
    else:
        log.error("job %s: the job function raised %s: %s", job.id, name, exc_value)
        _store_for(job, connection).fail(job.id, "internal", ESCAPED)


def on_work_horse_killed(job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
    """The forked work horse died under a job (killed, out of memory, segfault): its local
    scratch folders go at once, then the record and the output are seen to. A horse that
    died past the job's timeout ran out of time (it ended itself, stuck in a native call,
    or RQ killed it): the job ends ``timeout`` and is not retried."""
    sweep_attempts(Settings().work_dir, job.id)
    if _ran_out_of_time(job):
        _record_timeout(job, job.connection)
        return
    _record_worker_death(
        job, job.connection, f"the merge process died (wait status {ret_val}; out of memory?)"
    )


def _ran_out_of_time(job: Job) -> bool:
    if not job.timeout or job.timeout <= 0 or job.started_at is None:
        return False
    return (now() - job.started_at).total_seconds() >= job.timeout


def _record_timeout(job: Job, connection: Any) -> None:
    """End the job ``timeout``, remove what its run left at the output, and keep RQ from
    running it again (a retry would run out of time the same way)."""
    job.retries_left = 0  # RQ's failure handling, next, then fails it instead of retrying
    store = _store_for(job, connection)
    record = store.get(job.id)
    message = (
        f"the merge ran over its {job.timeout} s (COREMERGE_JOB_TIMEOUT) inside one long "
        "computation and was stopped; nothing was published"
    )
    _remove_leftovers(record, None)  # first: once the job reads failed, its output is clean
    if store.fail(job.id, "timeout", message):
        log.warning("job %s: ran over its %s s timeout; stopped, not retried", job.id, job.timeout)
