"""Errors that end a merge, each with the job error code of docs/job-spec.md.

    MergeError                 (code)
    ├── AdapterNotFound        adapter_not_found
    ├── AdapterInvalid         adapter_invalid
    ├── AdapterIncompatible    adapter_incompatible
    ├── AccessDenied           access_denied
    ├── OutputExists           output_exists
    ├── OutputNotFinite        output_not_finite
    ├── LimitExceeded          limit_exceeded
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
    "LimitExceeded",
    "MergeError",
    "OutputExists",
    "OutputNotFinite",
    "StorageError",
    "reason",
]


#: The closed set of job error codes (docs/job-spec.md).
ERROR_CODES: tuple[str, ...] = (
    "adapter_not_found",
    "adapter_invalid",
    "adapter_incompatible",
    "access_denied",
    "output_exists",
    "output_not_finite",
    "limit_exceeded",
    "storage_error",
    "canceled",
    "timeout",
    "internal",
)


def reason(exc: BaseException) -> str:
    """An exception's text for a job error message, without what only the worker should see:
    an ``OSError`` names its file (a path on the worker), so only its kind and strerror are
    kept; the other exceptions met while reading adapters describe the data, not the host."""
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or 'I/O error'}"
    return str(exc)


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


class OutputExists(MergeError):
    """The output location holds objects this job did not write; nothing there is touched."""

    code = "output_exists"


class OutputNotFinite(MergeError):
    """A merged factor is NaN or inf once cast to ``output.dtype``; nothing is published."""

    code = "output_not_finite"


class LimitExceeded(MergeError):
    """A configured limit (adapters, bytes, modules, work memory, patterns) is exceeded."""

    code = "limit_exceeded"


class StorageError(MergeError):
    code = "storage_error"


class Canceled(MergeError):
    code = "canceled"


class JobTimeout(MergeError):
    code = "timeout"


class InternalError(MergeError):
    code = "internal"


assert {c.code for c in MergeError.__subclasses__()} == set(ERROR_CODES)
