"""Submitting a job: its record and its RQ queue entry, both or neither, and the repair of
keyed submissions stranded between the two.

    submit(...) ─┬─ no Idempotency-Key: record + queue entry in ONE Redis transaction
                 │     (the id is random, so it cannot collide)
                 └─ with a key (the id is derived from it, so a repeat finds the job):
                       create the record marked *accepting* ──▶ queue it ──▶ clear the mark
                       a repeat: same body → the same job; another body → IdempotencyKeyReused;
                       the first request still accepting → StillAccepting (retry)

    repair_stranded(...)   a keyed record left *accepting* (its API process died between
                           the two steps) is queued by whoever sweeps first

The HTTP layer validates the request and checks the tenant's access first, then calls
:func:`submit` and turns what it raises into a status code (``service.problems``): this module
knows Redis and RQ, never HTTP. Errors::

    QuotaExceeded          (jobs.records) the tenant is at a quota; nothing was created
    IdempotencyKeyReused   the key was used with another request body
    StillAccepting         the first request with this key is still being accepted
    RecordContended        the record kept changing under the request (expiring meanwhile)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from jobs.queue import enqueue_merge, enqueue_merge_once, withdraw
from jobs.records import ACCEPT_STALE_S, JobRecord, JobStore, QuotaExceeded, fingerprint
from jobs.settings import Settings
from jobs.status import JobStatus

__all__ = [
    "IdempotencyKeyReused",
    "QuotaExceeded",
    "RecordContended",
    "StillAccepting",
    "Submitted",
    "repair_stranded",
    "submit",
]

log = logging.getLogger("coremerge.submission")

#: A repeat whose record expires while it is being looked at creates it afresh; this many tries.
_CREATE_TRIES = 3


class IdempotencyKeyReused(Exception):
    """The Idempotency-Key was used before with another request body (HTTP 422)."""


class StillAccepting(Exception):
    """The first request with this Idempotency-Key is still being accepted (HTTP 409);
    ``retry_after`` seconds."""

    retry_after = 1


class RecordContended(Exception):
    """The job's record kept appearing and vanishing under the request (HTTP 409; retry)."""


@dataclass(frozen=True)
class Submitted:
    """The job, and whether this call created it (False: an idempotent repeat)."""

    record: JobRecord
    created: bool


def submit(
    store: JobStore,
    queue: Any,
    settings: Settings,
    *,
    job_id: str,
    tenant: str,
    request: dict[str, Any],
    keyed: bool,
) -> Submitted:
    """Create the job ``job_id`` of ``tenant`` for a validated ``request`` and queue it.
    ``keyed``: the id derives from an Idempotency-Key (``jobs.records.job_id_for``), so it
    may exist already. Raises the errors of the module docstring."""
    if not keyed:
        return Submitted(_create_unkeyed(store, queue, settings, job_id, tenant, request), True)
    return _create_keyed(store, queue, settings, job_id, tenant, request)


def _create_unkeyed(
    store: JobStore,
    queue: Any,
    settings: Settings,
    job_id: str,
    tenant: str,
    request: dict[str, Any],
) -> JobRecord:
    """Record and queue entry in one transaction, so both exist or neither does. The quotas
    are checked by the record's creation inside it; a look beforehand keeps a refused
    submission from queueing a job nearly always, and when two submissions race for the last
    slot, the loser's queue entry is taken out again."""
    refused = store.quota_refusal(tenant)
    if refused is not None:
        raise refused
    with store.redis.pipeline(transaction=True) as pipe:
        pipe.multi()
        record = store.create(job_id, tenant, request, pipeline=pipe)
        enqueue_merge(queue, job_id, settings, tenant=tenant, pipeline=pipe)
        answers = pipe.execute()
    try:
        store.created(answers[0])
    except QuotaExceeded:
        withdraw(queue, job_id)
        raise
    assert record is not None
    return record


def _create_keyed(
    store: JobStore,
    queue: Any,
    settings: Settings,
    job_id: str,
    tenant: str,
    request: dict[str, Any],
) -> Submitted:
    """Create and queue the job of an Idempotency-Key, or return the existing one after
    checking that this is a true repeat."""
    for _ in range(_CREATE_TRIES):
        record = store.create(job_id, tenant, request)
        if record is not None:
            break
        existing = store.get(job_id)
        if existing is not None:
            return Submitted(_repeat(store, queue, settings, existing, request), False)
    else:
        raise RecordContended("the job record is changing under this request; retry")
    try:
        enqueue_merge_once(queue, job_id, settings, tenant=tenant)
    except BaseException:
        store.discard(job_id, tenant)
        raise
    store.mark_accepted(job_id)
    return Submitted(replace(record, accepting_since=None), True)


def _repeat(
    store: JobStore, queue: Any, settings: Settings, existing: JobRecord, request: dict[str, Any]
) -> JobRecord:
    """The same Idempotency-Key again: the same body gets the same job; another body is
    refused; a first request still being accepted is waited for, unless it died doing so,
    in which case this request finishes its work."""
    if existing.fingerprint != fingerprint(request):
        raise IdempotencyKeyReused("this Idempotency-Key was used with a different request body")
    if existing.accepting_since is not None:
        if time.time() - existing.accepting_since < ACCEPT_STALE_S:
            raise StillAccepting("a request with this Idempotency-Key is still being accepted")
        enqueue_merge_once(queue, existing.id, settings, tenant=existing.tenant)
        store.mark_accepted(existing.id)
        existing = store.get(existing.id) or existing
    return replace(existing, accepting_since=None)


def repair_stranded(
    store: JobStore, queue: Any, settings: Settings, *, older_than: float = ACCEPT_STALE_S
) -> int:
    """Queue every keyed job left *accepting* for over ``older_than`` seconds and still
    ``queued``; clear the mark of the others (gone, canceled meanwhile, or queued after all
    by a repeat). Returns how many were queued.

    The request was validated and accepted when it was made, so such a job is repaired, not
    failed. Each stale record goes to one caller only (``JobStore.claim_stale_accepting``),
    however many API processes sweep; queueing one that RQ already holds (its API died after
    queueing it but before clearing the mark) changes nothing."""
    repaired = 0
    for job_id in store.claim_stale_accepting(older_than):
        record = store.get(job_id)
        stranded = (
            record is not None
            and record.accepting_since is not None
            and record.status == JobStatus.QUEUED
        )
        if stranded:
            enqueue_merge_once(queue, job_id, settings, tenant=record.tenant)
            repaired += 1
            log.warning("job %s: its submission stopped before queueing it; queued it now", job_id)
        store.mark_accepted(job_id)
    return repaired
