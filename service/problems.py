"""Errors as RFC 9457 ``application/problem+json``, turned into HTTP in this one place.

Routes raise a :class:`Problem` (or let a validation error, an unknown route, a Redis outage,
a refused submission of ``jobs.submission`` escape); :func:`install` maps each to a body with ``type``, ``title``, ``status``, ``detail``,
and for a validation error an ``errors`` list naming every offending field::

    {"type": "urn:coremerge:problem:invalid-request", "title": "Invalid request",
     "status": 422, "detail": "adapters.0.uri: Field required",
     "errors": [{"field": "adapters.0.uri", "message": "Field required"}]}
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs.schedules import NUMBER_SHAPE
from jobs.submission import IdempotencyKeyReused, QuotaExceeded, RecordContended, StillAccepting

__all__ = [
    "PROBLEM_JSON",
    "PROBLEM_SCHEMA_REF",
    "PROBLEM_TYPES",
    "Problem",
    "ProblemDetails",
    "field_name",
    "install",
    "problem_responses",
    "problem_types_markdown",
    "submission_problem",
]

PROBLEM_JSON = "application/problem+json"
#: Where the OpenAPI schema keeps the one problem schema (``service.openapi``).
PROBLEM_SCHEMA_REF = "#/components/schemas/Problem"
#: A problem ``type`` is ``urn:coremerge:problem:<slug>``.
TYPE_PREFIX = "urn:coremerge:problem:"
log = logging.getLogger("coremerge.api")

#: Every problem type a client can receive: slug → (status, when). docs/service.md's table is
#: generated from it (a test keeps them in step), and a :class:`Problem` of another slug is
#: a bug.
PROBLEM_TYPES: dict[str, tuple[int, str]] = {
    "invalid-request": (422, "the body, a query parameter or a header is malformed, unknown or "
                        "out of range; `errors` names every offending field"),
    "idempotency-key-reused": (422, "the Idempotency-Key was used before with another body"),
    "unauthorized": (401, "no API key, or an unknown one (with keys configured)"),
    "forbidden-location": (403, "a location outside the tenant's allow-list, an output under a "
                           "`read_only` prefix, or `file://` while disabled"),
    "forbidden": (403, "an operation the caller's role does not allow (listing another "
                  "tenant's jobs without the admin role)"),
    "not-found": (404, "no such job (or another tenant's), or no such endpoint"),
    "method-not-allowed": (405, "a method the path does not have; `Allow` lists those it has"),
    "conflict": (409, "the job record changed under the request; send it again"),
    "idempotency-conflict": (409, "the first request with this Idempotency-Key is still being "
                             "accepted; send it again after `Retry-After`"),
    "already-finished": (409, "a cancel of a job that succeeded or failed, or is writing its "
                         "report (its output is final)"),
    "too-large": (413, "a body over `COREMERGE_MAX_REQUEST_BYTES`"),
    "unsupported-media-type": (415, "a body without `Content-Type: application/json`"),
    "quota-exceeded": (429, "the tenant is at `COREMERGE_MAX_ACTIVE_JOBS` or "
                       "`COREMERGE_SUBMITS_PER_MINUTE`; nothing was created; retry after "
                       "`Retry-After`"),
    "internal": (500, "a bug; the API's log has the details"),
    "unavailable": (503, "Redis does not answer; retry after `Retry-After`"),
}  # fmt: skip


class ProblemDetails(BaseModel):
    """The body of every error response (RFC 9457)."""

    model_config = ConfigDict(title="Problem")

    type: str = Field(
        "about:blank",
        description="urn:coremerge:problem:<slug>, one of "
        + ", ".join(PROBLEM_TYPES)
        + " (docs/service.md lists when each is sent)",
    )
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = Field(
        None, description='for 422: [{"field": "adapters.0.uri", "message": "…"}, …]'
    )


class FieldError(BaseModel):
    """One offending field of a 422."""

    field: str = Field(description="adapters.0.uri, query.limit, header.Idempotency-Key, …")
    message: str


ProblemDetails.model_rebuild()


class Problem(Exception):
    """An error response. ``slug`` names the problem type; ``headers`` go on the response."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(detail)
        assert slug is None or slug in PROBLEM_TYPES, slug
        self.status = status
        self.detail = detail
        self.slug = slug
        self.title = title or HTTPStatus(status).phrase
        self.headers = headers
        self.errors = errors

    @classmethod
    def invalid(cls, field: str, message: str) -> Problem:
        """A 422 naming one field of the request."""
        return cls(
            422,
            f"{field}: {message}",
            slug="invalid-request",
            title="Invalid request",
            errors=[{"field": field, "message": message}],
        )

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {
            "type": f"{TYPE_PREFIX}{self.slug}" if self.slug else "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors is not None:
            body["errors"] = self.errors
        return JSONResponse(body, self.status, headers=self.headers, media_type=PROBLEM_JSON)


def field_name(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("body", "adapters", 0, "uri")`` → ``adapters.0.uri``; other sources keep their
    prefix (``query.limit``, ``header.idempotency-key``). A schedule written as a plain
    number (``weight: "0.5"``) is named by its field, not by the shape's tag."""
    parts = [str(x) for x in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    if len(parts) > 1 and parts[-1] == NUMBER_SHAPE:
        parts = parts[:-1]
    return ".".join(parts) or "body"


def _validation_problem(exc: RequestValidationError) -> Problem:
    errors = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            loc, message = ("body",), f"not valid JSON ({err.get('ctx', {}).get('error', message)})"
        elif err.get("type") == "extra_forbidden":
            message = "unknown field"
        errors.append({"field": field_name(loc), "message": message})
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
    return Problem(422, detail, slug="invalid-request", title="Invalid request", errors=errors)


def _allowed_methods(request: Request) -> list[str]:
    """The methods the OpenAPI schema declares for this path. Starlette's own ``Allow`` names
    only those of the first route that matched, while GET and DELETE of one path are two
    routes here."""
    path = request.url.path
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template)), path):
            methods |= {m.upper() for m in operations if m in _HTTP_METHODS}
    return sorted(methods)


#: FastAPI's 400 for a body it could not decode; a malformed body is a 422 here (docs/job-spec.md).
_BODY_NOT_PARSED = "There was an error parsing the body"
_HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def submission_problem(exc: Exception) -> Problem:
    """A refused submission (``jobs.submission``'s errors) as the status that says why."""
    if isinstance(exc, QuotaExceeded):  # nothing was created: the same request may come again
        return Problem(
            429, exc.message, slug="quota-exceeded", headers={"Retry-After": str(exc.retry_after)}
        )
    if isinstance(exc, IdempotencyKeyReused):
        return Problem(
            422,
            str(exc),
            slug="idempotency-key-reused",
            title="Idempotency-Key reused",
            errors=[{"field": "header.Idempotency-Key", "message": "used with another body"}],
        )
    if isinstance(exc, StillAccepting):
        return Problem(
            409,
            f"{exc}; retry",
            slug="idempotency-conflict",
            headers={"Retry-After": str(exc.retry_after)},
        )
    assert isinstance(exc, RecordContended)
    return Problem(409, f"{exc}", slug="conflict")


#: The domain errors :func:`submission_problem` maps.
SUBMISSION_ERRORS = (QuotaExceeded, IdempotencyKeyReused, StillAccepting, RecordContended)


def install(app: FastAPI) -> None:
    """Register the exception handlers that turn every error into problem+json."""
    import redis.exceptions

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return exc.response()

    for error in SUBMISSION_ERRORS:

        @app.exception_handler(error)
        async def _refused(request: Request, exc: Exception) -> JSONResponse:
            return submission_problem(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_problem(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 400 and detail == _BODY_NOT_PARSED:  # e.g. a body not in UTF-8
            # Said in our words: an exception's own text is no part of a response.
            cause = exc.__cause__
            reason = (
                f"not UTF-8 at byte {cause.start}"
                if isinstance(cause, UnicodeDecodeError)
                else "the body could not be decoded"
            )
            return Problem.invalid("body", f"not valid JSON ({reason})").response()
        slug = None
        if exc.status_code == 404 and detail == "Not Found":
            detail, slug = f"no such endpoint: {request.method} {request.url.path}", "not-found"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
            slug = "method-not-allowed"
            allowed = _allowed_methods(request)  # none for paths outside the schema (/docs)
            if allowed:
                headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        return Problem(exc.status_code, detail, slug=slug, headers=headers).response()

    @app.exception_handler(redis.exceptions.RedisError)
    async def _redis(request: Request, exc: Exception) -> JSONResponse:
        log.error("Redis error on %s %s: %s", request.method, request.url.path, exc)
        return Problem(
            503, "the job store (Redis) is unavailable; retry later", slug="unavailable",
            headers={"Retry-After": "5"},
        ).response()  # fmt: skip

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return Problem(
            500, "internal error; the API's log has the details", slug="internal"
        ).response()


#: Headers that come with a problem of this status, as the OpenAPI schema declares them.
_PROBLEM_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait before sending it again",
                          "schema": {"type": "integer", "minimum": 0}}},
    503: {"Retry-After": {"description": "seconds to wait before sending it again",
                          "schema": {"type": "integer", "minimum": 0}}},
}  # fmt: skip


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries declaring problem+json bodies for these statuses (the
    one ``Problem`` schema, ``service.openapi``), with the headers each comes with."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        response: dict[str, Any] = {
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_JSON: {"schema": {"$ref": PROBLEM_SCHEMA_REF}}},
        }
        if status in _PROBLEM_HEADERS:
            response["headers"] = _PROBLEM_HEADERS[status]
        if status == 409:  # only an idempotency conflict says when to retry
            response["headers"] = {
                "Retry-After": {**_PROBLEM_HEADERS[429]["Retry-After"], "required": False}
            }
        responses[status] = response
    return responses


def problem_types_markdown() -> str:
    """The table of problem types in docs/service.md, generated from :data:`PROBLEM_TYPES`."""
    rows = ["| `type` (after `urn:coremerge:problem:`) | status | when |", "|---|---|---|"]
    rows += [f"| `{slug}` | {status} | {when} |" for slug, (status, when) in PROBLEM_TYPES.items()]
    return "\n".join(rows)
