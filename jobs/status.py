"""A job's status, and the moves between them (made atomically by ``jobs.scripts.TRANSITION``)::

queued ──▶ running ──▶ succeeded | failed | canceled
   │          └──▶ queued   (its worker died and RQ re-queues it)
   └──▶ canceled            (DELETE before a worker took it)
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ACTIVE", "STATUSES", "TERMINAL", "JobStatus"]


class JobStatus(StrEnum):
    """A job's status; a ``str``, so it is stored and serialised as its value."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


STATUSES: tuple[str, ...] = tuple(s.value for s in JobStatus)
#: Queued or running: counted against a tenant, and the only ones a cancel acts on.
ACTIVE: tuple[JobStatus, ...] = (JobStatus.QUEUED, JobStatus.RUNNING)
#: Ended: the record expires ``result_ttl`` seconds after reaching one of these.
TERMINAL: tuple[JobStatus, ...] = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)
