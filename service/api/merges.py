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

from jobs.queue import cancel_queued, enqueue_merge, enqueue_merge_once, withdraw
from jobs.records import (
    ACCEPT_STALE_S,
    JobRecord,
    JobStore,
    QuotaExceeded,
    fingerprint,
    job_id_for,
)
from jobs.settings import Settings
from jobs.spec import MergeSpec
from jobs.status import STATUSES
from jobs.tenants import Tenant, refusal
from jobs.uris import output_overlap, parse_uri
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
    """Configured limits (422 naming the field), well-formed locations (422), an output
    apart from every input (422 naming ``output.uri``) and the tenant's access: inputs under
    its ``allow`` or ``read_only`` prefixes, the output under ``allow`` only (403)."""
    if len(spec.adapters) > settings.max_adapters:
        raise Problem.invalid("adapters", f"at most {settings.max_adapters} adapters per job")
    if spec.output.rank is not None and spec.output.rank > settings.max_output_rank:
        raise Problem.invalid("output.rank", f"at most {settings.max_output_rank}")
    inputs = [(f"adapters.{i}.uri", a.uri, False) for i, a in enumerate(spec.adapters)]
    refusals = []
    for field, uri, for_output in [*inputs, ("output.uri", spec.output.uri, True)]:
        refused = refusal(
            tenant, uri, allow_file_uris=settings.allow_file_uris, for_output=for_output
        )
        if refused is not None:
            refusals.append((field, refused))
    invalid = [{"field": f, "message": r.message} for f, r in refusals if r.kind == "invalid"]
    if invalid:  # a malformed location is a bad request whatever else is wrong with it
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in invalid)
        raise Problem(422, detail, slug="invalid-request", title="Invalid request", errors=invalid)
    output = parse_uri(spec.output.uri)
    clash = output_overlap(output, [parse_uri(a.uri) for a in spec.adapters])
    if clash is not None:
        raise Problem.invalid(
            "output.uri",
            f"{output.normalized!r} overlaps the input adapters.{clash}.uri "
            f"({parse_uri(spec.adapters[clash].uri).normalized!r}): the output must not "
            "equal, contain or lie inside an input location",
        )
    if refusals:
        field, refused = refusals[0]
        raise Problem(403, f"{field}: {refused.message}", slug="forbidden-location")


def _normalized_request(spec: MergeSpec) -> dict:
    """The spec as stored and echoed: validated, defaults filled in, and every location in
    its normal form (``S3://b/p`` → ``s3://b/p/``), so that the worker, the allow-list and an
    idempotent repeat all see one spelling of each location."""
    request = spec.model_dump(mode="json")
    for adapter in request["adapters"]:
        adapter["uri"] = parse_uri(adapter["uri"]).normalized
    request["output"]["uri"] = parse_uri(request["output"]["uri"]).normalized
    return request


def _too_many(exc: QuotaExceeded) -> Problem:
    """A quota's refusal as 429, with when to retry."""
    return Problem(
        429,
        exc.message,
        slug="quota-exceeded",
        headers={"Retry-After": str(exc.retry_after)},
    )


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
        **problem_responses(401, 403, 409, 413, 422, 429, 503),
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
    request = _normalized_request(spec)
    job_id = job_id_for(tenant.name, idempotency_key)
    if idempotency_key is None:
        record = _create_unkeyed(job_id, tenant, request, settings, store, queue)
    else:
        try:
            record, created = _create_keyed(job_id, tenant, request, settings, store, queue)
        except QuotaExceeded as exc:
            raise _too_many(exc) from None
        if not created:
            return _job_response(record, 200)
    metrics.submitted.inc()
    return _job_response(record, 202)


def _create_unkeyed(
    job_id: str, tenant: Tenant, request: dict, settings: Settings, store: JobStore, queue: Queue
) -> JobRecord:
    """Create and queue a job with a random id: the record and the queue entry go in one
    transaction, so both exist or neither does. The quotas are checked by the record's
    creation inside it; a look beforehand keeps a refused submission from queueing a job
    nearly always, and when two submissions race for the last slot, the loser's queue entry
    is taken out again."""
    refused = store.quota_refusal(tenant.name)
    if refused is not None:
        raise _too_many(refused)
    with store.redis.pipeline(transaction=True) as pipe:
        pipe.multi()
        record = store.create(job_id, tenant.name, request, pipeline=pipe)
        enqueue_merge(queue, job_id, settings, pipeline=pipe)
        answers = pipe.execute()
    try:
        store.created(answers[0])
    except QuotaExceeded as exc:
        withdraw(queue, job_id)
        raise _too_many(exc) from None
    assert record is not None
    return record


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
        enqueue_merge_once(queue, job_id, settings)
    except BaseException:
        store.discard(job_id, tenant.name)
        raise
    store.mark_accepted(job_id)
    return replace(record, accepting_since=None), True


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
        enqueue_merge_once(queue, existing.id, settings)
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
    if outcome == "committing":
        raise Problem(
            409, f"job {job_id} is writing its report: its output is final", slug="already-finished"
        )
    if record.status == "canceled":
        return JSONResponse(job_view(record), 200)
    raise Problem(409, f"job {job_id} has already {record.status}", slug="already-finished")
