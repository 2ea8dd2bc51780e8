"""``/merges``: submit, read, list and cancel merge jobs (docs/job-spec.md).

Routes are plain ``def``: RQ and redis-py are synchronous, so FastAPI runs them in its
thread pool instead of blocking the event loop.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse

from jobs.listing import MAX_PAGE, InvalidCursor, list_jobs
from jobs.notify import refusal as notify_refusal
from jobs.queue import cancel_queued
from jobs.records import JobRecord, JobStore, job_id_for
from jobs.servers import server_rank, server_rule
from jobs.settings import Settings
from jobs.spec import MergeSpec
from jobs.status import STATUSES, JobStatus
from jobs.submission import submit
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
from service.api.models import JOB_ID_PATTERN, Job, JobList, job_view
from service.problems import Problem, problem_responses

__all__ = ["router"]

router = APIRouter(prefix="/merges", tags=["merges"], dependencies=[Depends(reject_unknown_query)])

_JOB_ID = re.compile(JOB_ID_PATTERN)
_LOCATION = {
    "Location": {
        "description": "the job's URL",
        "schema": {"type": "string", "format": "uri-reference"},
    }
}
#: From a submission to the job it created: what a client (or a stateful fuzzer) does next.
_JOB_LINKS = {
    "GetMerge": {"operationId": "getMerge", "parameters": {"job_id": "$response.body#/id"},
                 "description": "read the job"},
    "CancelMerge": {"operationId": "cancelMerge", "parameters": {"job_id": "$response.body#/id"},
                    "description": "cancel the job"},
}  # fmt: skip
#: The job id in a path: its shape is declared, but a malformed one is a 404, like any id
#: that names no job of the caller's (never a 422).
JobIdPath = Annotated[
    str, Path(description="the job's id", json_schema_extra={"pattern": JOB_ID_PATTERN})
]


def _job_response(record: JobRecord, status: int) -> JSONResponse:
    return JSONResponse(job_view(record), status, headers={"Location": f"/merges/{record.id}"})


def _check_limits_and_access(spec: MergeSpec, tenant: Tenant, settings: Settings) -> None:
    """Configured limits (422 naming the field), well-formed locations (422), an output
    apart from every input (422 naming ``output.uri``) and the tenant's access: inputs under
    its ``allow`` or ``read_only`` prefixes, the output under ``allow`` only (403)."""
    if len(spec.adapters) > settings.max_adapters:
        raise Problem.invalid("adapters", f"at most {settings.max_adapters} adapters per job")
    if isinstance(spec.output.rank, int) and spec.output.rank > settings.max_output_rank:
        raise Problem.invalid("output.rank", f"at most {settings.max_output_rank}")
    if spec.output.rank == "auto":  # the chosen rank is capped by the limit: is there one?
        try:
            server_rank(server_rule(spec.output.target), 1, settings.max_output_rank)
        except ValueError as exc:
            raise Problem.invalid("output.target", str(exc)) from None
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
    if spec.notify is not None:
        refused_notify = notify_refusal(spec.notify.url, tenant, settings)
        if refused_notify is not None:
            raise Problem.invalid("notify.url", refused_notify)


def _normalized_request(spec: MergeSpec) -> dict:
    """The spec as stored and echoed: validated, defaults filled in, and every location in
    its normal form (``S3://b/p`` → ``s3://b/p/``), so that the worker, the allow-list and an
    idempotent repeat all see one spelling of each location."""
    request = spec.model_dump(mode="json")
    for adapter in request["adapters"]:
        adapter["uri"] = parse_uri(adapter["uri"]).normalized
    request["output"]["uri"] = parse_uri(request["output"]["uri"]).normalized
    return request


def _own_job(store: JobStore, tenant: Tenant, job_id: str, *, reading: bool = False) -> JobRecord:
    """The tenant's job, or 404 (also for another tenant's job: its existence is not told).
    An admin may read (``reading``) any tenant's job."""
    record = store.get(job_id) if _JOB_ID.match(job_id) else None
    if record is None or (record.tenant != tenant.name and not (reading and tenant.admin)):
        raise Problem(404, f"no job {job_id!r}", slug="not-found")
    return record


async def require_json(request: Request) -> None:
    """415 for a body that does not say it is JSON: FastAPI would read one without a
    ``Content-Type`` as JSON, and answer 422 for any other type."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        said = f"Content-Type {media!r}" if media else "no Content-Type"
        raise Problem(
            415,
            f"the body must be sent with Content-Type: application/json ({said})",
            slug="unsupported-media-type",
        )


@router.post(
    "",
    status_code=202,
    response_model=Job,
    operation_id="submitMerge",
    summary="Submit a merge job",
    dependencies=[Depends(require_json)],
    responses={
        202: {"description": "the job was queued", "headers": _LOCATION, "links": _JOB_LINKS},
        200: {"model": Job, "description": "a repeat (same Idempotency-Key, same body)",
              "headers": _LOCATION, "links": _JOB_LINKS},
        **problem_responses(401, 403, 409, 413, 415, 422, 429, 503),
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
    submitted = submit(
        store, queue, settings,
        job_id=job_id_for(tenant.name, idempotency_key), tenant=tenant.name,
        request=_normalized_request(spec), keyed=idempotency_key is not None,
    )  # fmt: skip
    if not submitted.created:
        return _job_response(submitted.record, 200)
    metrics.submitted.inc()
    return _job_response(submitted.record, 202)


@router.get(
    "/{job_id}",
    response_model=Job,
    operation_id="getMerge",
    summary="Read a job",
    responses=problem_responses(401, 404, 503),
)
def get_merge(job_id: JobIdPath, tenant: TenantDep, store: StoreDep) -> JSONResponse:
    return JSONResponse(job_view(_own_job(store, tenant, job_id, reading=True)))


@router.get(
    "",
    response_model=JobList,
    operation_id="listMerges",
    summary="List the caller's jobs, newest first, a page at a time",
    responses=problem_responses(401, 403, 422, 503),
)
def list_merges(
    tenant: TenantDep,
    store: StoreDep,
    status: Annotated[
        Literal[STATUSES] | None, Query(description="only jobs in this status")
    ] = None,  # type: ignore[valid-type]
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="jobs per page")] = 50,
    cursor: Annotated[
        str | None,
        Query(
            max_length=512,
            pattern=r"^[A-Za-z0-9_-]+$",
            description="the previous page's next_cursor",
        ),
    ] = None,
    of_tenant: Annotated[
        str | None,
        Query(
            alias="tenant",
            pattern=r"^[A-Za-z0-9_.-]{1,64}$",
            description="admins only: list this tenant's jobs instead of the caller's",
        ),
    ] = None,
) -> JSONResponse:
    if of_tenant is not None and of_tenant != tenant.name and not tenant.admin:
        raise Problem(
            403, "query.tenant: only an admin may list another tenant's jobs", slug="forbidden"
        )
    try:
        page = list_jobs(store, of_tenant or tenant.name, status=status, limit=limit, cursor=cursor)
    except InvalidCursor as exc:
        raise Problem.invalid("query.cursor", str(exc)) from None
    return JSONResponse({"jobs": [j.to_dict() for j in page.jobs], "next_cursor": page.next_cursor})


@router.delete(
    "/{job_id}",
    response_model=Job,
    operation_id="cancelMerge",
    summary="Cancel a queued or running job",
    responses={
        200: {"description": "the job is canceled (it had not started, or was canceled before)"},
        202: {"model": Job, "description": "the running job stops at its next module boundary"},
        **problem_responses(401, 404, 409, 503),
    },
)
def cancel_merge(
    job_id: JobIdPath, tenant: TenantDep, store: StoreDep, queue: QueueDep
) -> JSONResponse:
    _own_job(store, tenant, job_id)
    outcome = store.cancel(job_id)
    record = _own_job(store, tenant, job_id)
    if outcome == JobStatus.CANCELED:
        cancel_queued(queue, job_id)
        return JSONResponse(job_view(record), 200)
    if outcome == "requested":
        return JSONResponse(job_view(record), 202)
    if outcome == "committing":
        raise Problem(
            409, f"job {job_id} is writing its report: its output is final", slug="already-finished"
        )
    if record.status == JobStatus.CANCELED:
        return JSONResponse(job_view(record), 200)
    raise Problem(409, f"job {job_id} has already {record.status}", slug="already-finished")
