"""Errors that end a merge, each with the job error code of docs/job-spec.md.

    MergeError                 (code)
    ├── AdapterNotFound        adapter_not_found
    ├── AdapterInvalid         adapter_invalid
    ├── AdapterIncompatible    adapter_incompatible
    ├── AccessDenied           access_denied
    ├── StorageError           storage_error
    ├── Canceled               canceled
    ├── JobTimeout             timeout
    └── InternalError          internal

They are raised where the cause is known, with a message that names the adapter and the
reason, and turned into a CLI exit status or a job's ``error`` in exactly one place each
(``worker.cli`` and the RQ job function).
"""

from __future__ import annotations

__all__ = [
    "ERROR_CODES",
    "AccessDenied",
    "AdapterIncompatible",
    "AdapterInvalid",
    "AdapterNotFound",
    "Canceled",
    "InternalError",
    "JobTimeout",
    "MergeError",
    "StorageError",
]


#: The closed set of job error codes (docs/job-spec.md).
ERROR_CODES: tuple[str, ...] = (
    "adapter_not_found",
    "adapter_invalid",
    "adapter_incompatible",
    "access_denied",
    "storage_error",
    "canceled",
    "timeout",
    "internal",
)


class MergeError(Exception):
    """A merge failed for a known reason; ``code`` is one of :data:`ERROR_CODES`."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class AdapterNotFound(MergeError):
    code = "adapter_not_found"


class AdapterInvalid(MergeError):
    code = "adapter_invalid"


class AdapterIncompatible(MergeError):
    code = "adapter_incompatible"


class AccessDenied(MergeError):
    code = "access_denied"


class StorageError(MergeError):
    code = "storage_error"


class Canceled(MergeError):
    code = "canceled"


class JobTimeout(MergeError):
    code = "timeout"


class InternalError(MergeError):
    code = "internal"


assert {c.code for c in MergeError.__subclasses__()} == set(ERROR_CODES)
