"""S3's errors as job errors: where the cause is known, at once and without retrying.

A missing key or bucket is ``AdapterNotFound``, a 403 (or a credential problem) is
``AccessDenied``; anything else that went wrong talking to the store, after botocore's own
retries, is ``StorageError``. A message names the object (its URI) and S3's error code, never
an endpoint, a host or a client library's exception text.
"""

from __future__ import annotations

from typing import NoReturn

from jobs.errors import AccessDenied, AdapterNotFound, MergeError, StorageError

__all__ = ["error_code", "is_storage_failure", "mapped", "raise_mapped"]

NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
DENIED = {
    "403",
    "AccessDenied",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "AccountProblem",
    "InvalidToken",
    "ExpiredToken",
}
#: A conditional request's condition failed: the key exists (If-None-Match) or the object
#: changed (If-Match).
PRECONDITION_FAILED = {"412", "PreconditionFailed"}
#: A concurrent conditional write on the same key; S3 asks the client to retry.
CONDITIONAL_CONFLICT = {"409", "ConditionalRequestConflict"}


def error_code(exc: BaseException) -> str | None:
    """S3's error code (or HTTP status) behind ``exc``. boto3's transfer helpers wrap the
    client error (raised while handling it, so it is the ``__context__``): follow the chain,
    or an AccessDenied upload would read as a bare storage error."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            return code or status
        seen = seen.__cause__ or seen.__context__
    return None


def is_storage_failure(exc: BaseException) -> bool:
    """An error from talking to the store (botocore, s3transfer, the socket or the local
    disk), as opposed to anything else (a timeout signal, a bug) that must pass through."""
    module = type(exc).__module__ or ""
    return isinstance(exc, OSError) or module.startswith(("botocore", "boto3", "s3transfer"))


def mapped(exc: Exception, what: str) -> Exception:
    """The job error for a failed call on ``what`` (an object's URI); exceptions that are not
    storage failures are returned unchanged, to be re-raised."""
    if isinstance(exc, MergeError) or not is_storage_failure(exc):
        return exc
    code = error_code(exc)
    if code in NOT_FOUND:
        return AdapterNotFound(f"{what}: not found ({code})")
    if code in DENIED:
        return AccessDenied(f"{what}: access denied ({code})")
    # The exception's class names the failure (a timeout, a reset connection) without its
    # text, which can carry the endpoint's address.
    return StorageError(f"{what}: {code or type(exc).__name__}")


def raise_mapped(exc: Exception, what: str) -> NoReturn:
    error = mapped(exc, what)
    if error is exc:
        raise exc
    raise error from None
