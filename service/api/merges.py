"""``/merges``: submit, read, list and cancel merge jobs (docs/job-spec.md).

Routes are plain ``def``: RQ and redis-py are synchronous, so FastAPI runs them in its
thread pool instead of blocking the event loop.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import JSONResponse
from rq import Queue

from jobs.queue import DuplicateJobError, cancel_queued, enqueue_merge
from jobs.records import ACCEPT_STALE_S, JobRecord, JobStore, fingerprint, job_id_for
from jobs.settings import Settings
from jobs.spec import MergeSpec
from jobs.status import STATUSES
from jobs.tenants import Tenant, refusal
from service.api.deps import (
    MetricsDep,
    QueueDep,
    SettingsDep,
    StoreDep,
    TenantDep,
    reject_unknown_query,
)
from service.api.models import Job, JobList, job_view
from service.problems import Problem, problem_responses

__all__ = ["router"]

router = APIRouter(prefix="/merges", tags=["merges"], dependencies=[Depends(reject_unknown_query)])

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_LOCATION = {"Location": {"description": "the job's URL", "schema": {"type": "string"}}}


def _job_response(record: JobRecord, status: int) -> JSONResponse:
    return JSONResponse(job_view(record), status, headers={"Location": f"/merges/{record.id}"})


def _check_limits_and_access(spec: MergeSpec, tenant: Tenant, settings: Settings) -> None:
    """Configured limits (422 naming the field) and the tenant's allow-list (403)."""
    if len(spec.adapters) > settings.max_adapters:
        raise Problem.invalid("adapters", f"at most {settings.max_adapters} adapters per job")
    if spec.output.rank is not None and spec.output.rank > settings.max_output_rank:
        raise Problem.invalid("output.rank", f"at most {settings.max_output_rank}")
    fields = [(f"adapters.{i}.uri", a.uri) for i, a in enumerate(spec.adapters)]
    refusals = []
    for field, uri in [*fields, ("output.uri", spec.output.uri)]:
        refused = refusal(tenant, uri, allow_file_uris=settings.allow_file_uris)
        if refused is not None:
            refusals.append((field, refused))
    invalid = [{"field": f, "message": r.message} for f, r in refusals if r.kind == "invalid"]
    if invalid:  # a malformed location is a bad request whatever else is wrong with it
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in invalid)
        raise Problem(422, detail, slug="invalid-request", title="Invalid request", errors=invalid)
    if refusals:
        field, refused = refusals[0]
        raise Problem(403, f"{field}: {refused.message}", slug="forbidden-location")


def _own_job(store: JobStore, tenant: Tenant, job_id: str) -> JobRecord:
    """The tenant's job, or 404 (also for another tenant's job: its existence is not told)."""
    record = store.get(job_id) if _JOB_ID.match(job_id) else None
    if record is None or record.tenant != tenant.name:
        raise Problem(404, f"no job {job_id!r}", slug="not-found")
    return record


@router.post(
    "",
    status_code=202,
    response_model=Job,
    summary="Submit a merge job",
    responses={
        202: {"description": "the job was queued", "headers": _LOCATION},
        200: {"model": Job, "description": "a repeat (same Idempotency-Key, same body)",
              "headers": _LOCATION},
        **problem_responses(401, 403, 409, 413, 422, 503),
    },
)  # fmt: skip
def submit_merge(
    spec: MergeSpec,
    tenant: TenantDep,
    settings: SettingsDep,
    store: StoreDep,
    queue: QueueDep,
    metrics: MetricsDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            pattern=r"^[\x21-\x7e]+$",
            description="makes a retried submission return the same job instead of a new one",
        ),
    ] = None,
) -> JSONResponse:
    _check_limits_and_access(spec, tenant, settings)
    request = spec.model_dump(mode="json")
    job_id = job_id_for(tenant.name, idempotency_key)
    if idempotency_key is None:
        # A random id cannot collide: the record and the queue entry go in one transaction.
        with store.redis.pipeline(transaction=True) as pipe:
            pipe.multi()
            record = store.create(job_id, tenant.name, request, pipeline=pipe)
            enqueue_merge(queue, job_id, settings, pipeline=pipe)
            pipe.execute()
    else:
        record, created = _create_keyed(job_id, tenant, request, settings, store, queue)
        if not created:
            return _job_response(record, 200)
    metrics.submitted.inc()
    assert record is not None
    return _job_response(record, 202)


def _create_keyed(
    job_id: str, tenant: Tenant, request: dict, settings: Settings, store: JobStore, queue: Queue
) -> tuple[JobRecord, bool]:
    """Create and queue the job of an Idempotency-Key (True), or return the existing one
    after checking that this is a true repeat (False)."""
    for _ in range(3):  # a repeat whose record expires meanwhile creates it afresh
        record = store.create(job_id, tenant.name, request)
        if record is not None:
            break
        existing = store.get(job_id)
        if existing is not None:
            return _repeat(existing, request, settings, store, queue), False
    else:
        raise Problem(409, "the job record is changing under this request; retry", slug="conflict")
    try:
        _enqueue(queue, job_id, settings)
    except BaseException:
        store.discard(job_id, tenant.name)
        raise
    store.mark_accepted(job_id)
    return replace(record, accepting_since=None), True


def _enqueue(queue: Queue, job_id: str, settings: Settings) -> None:
    try:
        enqueue_merge(queue, job_id, settings)
    except DuplicateJobError:
        # RQ still holds a finished job under this id (its record expired first): replace it.
        from rq.job import Job as RQJob
        from rq.serializers import JSONSerializer

        old = RQJob.fetch(job_id, connection=queue.connection, serializer=JSONSerializer)
        if old.get_status() in ("queued", "started", "deferred", "scheduled"):
            return  # the job is in the queue already
        old.delete()
        enqueue_merge(queue, job_id, settings)


def _repeat(
    existing: JobRecord, request: dict, settings: Settings, store: JobStore, queue: Queue
) -> JobRecord:
    """The same Idempotency-Key again: same body → the same job (200); another body → 422;
    the first request still being accepted → 409."""
    if existing.fingerprint != fingerprint(request):
        raise Problem(
            422,
            "this Idempotency-Key was used with a different request body",
            slug="idempotency-key-reused",
            title="Idempotency-Key reused",
            errors=[{"field": "header.Idempotency-Key", "message": "used with another body"}],
        )
    if existing.accepting_since is not None:
        if time.time() - existing.accepting_since < ACCEPT_STALE_S:
            raise Problem(
                409,
                "a request with this Idempotency-Key is still being accepted; retry",
                slug="idempotency-conflict",
                headers={"Retry-After": "1"},
            )
        # The first request died between creating the record and queueing it: finish its work.
        _enqueue(queue, existing.id, settings)
        store.mark_accepted(existing.id)
        existing = store.get(existing.id) or existing
    return replace(existing, accepting_since=None)


@router.get(
    "/{job_id}",
    response_model=Job,
    summary="Read a job",
    responses=problem_responses(401, 404, 503),
)
def get_merge(job_id: str, tenant: TenantDep, store: StoreDep) -> JSONResponse:
    return JSONResponse(job_view(_own_job(store, tenant, job_id)))


@router.get(
    "",
    response_model=JobList,
    summary="List the caller's jobs, newest first",
    responses=problem_responses(401, 422, 503),
)
def list_merges(
    tenant: TenantDep,
    store: StoreDep,
    status: Annotated[
        Literal[STATUSES] | None, Query(description="only jobs in this status")
    ] = None,  # type: ignore[valid-type]
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JSONResponse:
    records = store.list(tenant.name, status=status, limit=limit)
    return JSONResponse({"jobs": [job_view(r) for r in records]})


@router.delete(
    "/{job_id}",
    response_model=Job,
    summary="Cancel a queued or running job",
    responses={
        200: {"description": "the job is canceled (it had not started, or was canceled before)"},
        202: {"model": Job, "description": "the running job stops at its next module boundary"},
        **problem_responses(401, 404, 409, 503),
    },
)
def cancel_merge(job_id: str, tenant: TenantDep, store: StoreDep, queue: QueueDep) -> JSONResponse:
    _own_job(store, tenant, job_id)
    outcome = store.cancel(job_id)
    record = _own_job(store, tenant, job_id)
    if outcome == "canceled":
        cancel_queued(queue, job_id)
        return JSONResponse(job_view(record), 200)
    if outcome == "requested":
        return JSONResponse(job_view(record), 202)
    if record.status == "canceled":
        return JSONResponse(job_view(record), 200)
    raise Problem(409, f"job {job_id} has already {record.status}", slug="already-finished")
