"""Response bodies of the HTTP API (docs/job-spec.md), declared for the OpenAPI schema."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from jobs.errors import ERROR_CODES
from jobs.records import JobRecord
from jobs.spec import MergeSpec
from jobs.status import STATUSES

#: A job id (the pattern the OpenAPI schema declares; ``service.openapi``).
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"

__all__ = [
    "Job",
    "JobError",
    "JobList",
    "JobNotification",
    "JobProgress",
    "JobResult",
    "JobStatus",
    "JobSummary",
    "job_view",
]

JobStatus = Literal[STATUSES]  # type: ignore[valid-type]
ErrorCode = Literal[ERROR_CODES]  # type: ignore[valid-type]


class JobProgress(BaseModel):
    stage: Literal["download", "plan", "merge", "upload"]
    modules_done: int
    modules_total: int
    percent: float | None = Field(
        None, description="modules_done of modules_total, in %; null before the plan"
    )
    eta_seconds: float | None = Field(
        None,
        description="while merging: seconds left at the module rate since the job started "
        "(an estimate); null otherwise",
    )


class JobResult(BaseModel):
    uri: str = Field(description="where the merged adapter is")
    rank: int
    modules: int
    bytes: int = Field(description="size of adapter_model.safetensors")
    report_uri: str
    seconds: float = Field(description="worker time: download, merge and upload")


class JobError(BaseModel):
    code: ErrorCode
    message: str


class JobNotification(BaseModel):
    """How the completion notification (``request.notify``) went; its failure never changes
    the job's status."""

    url: str
    outcome: Literal["delivered", "failed", "refused"] = Field(
        description="delivered: a 2xx answer; failed: no 2xx after every attempt; refused: "
        "the URL is no longer allowed (checked again before sending)"
    )
    attempts: int = Field(description="POSTs made")
    last_status: int | None = Field(description="the last answer's HTTP status; null: none")
    last_error: str | None = Field(description="why the last attempt did not deliver")
    delivered_at: datetime | None


class Job(BaseModel):
    """A merge job."""

    id: str = Field(pattern=JOB_ID_PATTERN)
    status: JobStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime | None = Field(description="the last change of status or progress")
    attempts: int = Field(description="runs started so far (more than one after a worker died)")
    progress: JobProgress | None
    request: MergeSpec
    result: JobResult | None
    error: JobError | None
    notification: JobNotification | None = Field(
        None, description="with request.notify, once the job ended: the delivery's outcome"
    )


class JobSummary(BaseModel):
    """A job as a listing shows it: where it stands, not what it asked for (the full job,
    request included, is ``GET /merges/{id}``)."""

    id: str = Field(pattern=JOB_ID_PATTERN)
    status: JobStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime | None
    attempts: int = Field(description="runs started so far (more than one after a worker died)")
    method: str | None
    space: str | None
    adapters: int | None = Field(description="how many input adapters")
    output_uri: str | None
    progress: JobProgress | None
    error_code: ErrorCode | None


class JobList(BaseModel):
    jobs: list[JobSummary] = Field(description="the caller's jobs, newest first")
    next_cursor: str | None = Field(
        description="pass as ?cursor= for the next page; null on the last page"
    )


def progress_view(
    progress: dict[str, Any] | None, started_at: str | None, *, now: float | None = None
) -> dict[str, Any] | None:
    """Progress with its percentage and, while merging, an ETA from the module rate since the
    job started (download and plan included, so it errs long early on)."""
    if progress is None:
        return None
    done, total = progress.get("modules_done", 0), progress.get("modules_total", 0)
    view = {**progress, "percent": round(100.0 * done / total, 1) if total else None}
    view["eta_seconds"] = None
    if progress.get("stage") == "merge" and started_at and 0 < done < total:
        elapsed = (now or time.time()) - datetime.fromisoformat(started_at).timestamp()
        view["eta_seconds"] = round(max(elapsed, 0.0) / done * (total - done), 1)
    return view


def job_view(record: JobRecord) -> dict[str, Any]:
    """The job as the API shows it (a :class:`Job`; docs/job-spec.md): the record less its
    bookkeeping (tenant, fingerprint, run token)."""
    return {
        "id": record.id,
        "status": record.status,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "updated_at": record.updated_at,
        "attempts": record.attempts,
        "progress": progress_view(record.progress, record.started_at),
        "request": record.request,
        "result": record.result,
        "error": record.error,
        "notification": record.notification,
    }
