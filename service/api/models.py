"""Response bodies of the HTTP API (docs/job-spec.md), declared for the OpenAPI schema."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from jobs.errors import ERROR_CODES
from jobs.records import STATUSES
from jobs.spec import MergeSpec

__all__ = ["Job", "JobError", "JobList", "JobProgress", "JobResult", "JobStatus"]

JobStatus = Literal[STATUSES]  # type: ignore[valid-type]
ErrorCode = Literal[ERROR_CODES]  # type: ignore[valid-type]


class JobProgress(BaseModel):
    stage: Literal["download", "plan", "merge", "upload"]
    modules_done: int
    modules_total: int


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


class Job(BaseModel):
    """A merge job."""

    id: str
    status: JobStatus
    created_at: str
    started_at: str | None
    finished_at: str | None
    progress: JobProgress | None
    request: MergeSpec
    result: JobResult | None
    error: JobError | None


class JobList(BaseModel):
    jobs: list[Job] = Field(description="the caller's jobs, newest first")
