"""Keyed submissions stranded between their record and their queue entry, found and queued.

A submission with an ``Idempotency-Key`` creates its record (marked *accepting*), queues the
job on RQ, then clears the mark. An API process that dies between the first two steps leaves
a ``queued`` record that no worker will ever see: only a repeat of the same request (with the
same key) used to finish it, and a client that never repeats it left the job ``queued`` for
ever. The API therefore sweeps: at start-up and every :data:`SWEEP_INTERVAL_S` seconds it
claims the records marked accepting for over ``ACCEPT_STALE_S`` seconds
(``JobStore.claim_stale_accepting``, one claimant per record however many API processes
sweep) and queues each one that is still ``queued``: the request was validated and accepted
when it was made, so the job is repaired, not failed.
"""

from __future__ import annotations

import logging
from typing import Any

from jobs.queue import enqueue_merge_once
from jobs.records import ACCEPT_STALE_S, JobStore
from jobs.settings import Settings
from jobs.status import JobStatus

__all__ = ["SWEEP_INTERVAL_S", "repair_stranded"]

log = logging.getLogger("coremerge.api")

#: Seconds between two sweeps of one API process.
SWEEP_INTERVAL_S = 10.0


def repair_stranded(
    store: JobStore, queue: Any, settings: Settings, *, older_than: float = ACCEPT_STALE_S
) -> int:
    """Queue every keyed job left *accepting* for over ``older_than`` seconds and still
    ``queued``; clear the mark of the others (gone, canceled meanwhile, or queued after all
    by a repeat). Returns how many were queued. Queueing one that RQ already holds (its API
    died after queueing it but before clearing the mark) changes nothing."""
    repaired = 0
    for job_id in store.claim_stale_accepting(older_than):
        record = store.get(job_id)
        stranded = (
            record is not None
            and record.accepting_since is not None
            and record.status == JobStatus.QUEUED
        )
        if stranded:
            enqueue_merge_once(queue, job_id, settings)
            repaired += 1
            log.warning("job %s: its submission stopped before queueing it; queued it now", job_id)
        store.mark_accepted(job_id)
    return repaired
