"""Dependencies of the routes, as ``Annotated`` aliases: the settings, the calling tenant,
the job store and the queue (all built once by ``service.app.create_app``).

They are ``async def`` although they never await: FastAPI runs a plain ``def`` dependency in
its thread pool, and five thread hops per request cost more CPU than the request itself.
None of them blocks for long: the tenant check is a few sha256 compares in memory, and at
most once a second a ``stat`` of the tenants file (re-read only when it changed)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from jobs.records import JobStore
from jobs.settings import Settings
from jobs.tenants import Tenant
from service.metrics import ServiceMetrics
from service.problems import Problem

__all__ = [
    "MetricsDep",
    "QueueDep",
    "SettingsDep",
    "StoreDep",
    "TenantDep",
    "reject_unknown_query",
]

_bearer = HTTPBearer(auto_error=False, description="an API key from the tenants file")


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _store(request: Request) -> JobStore:
    return request.app.state.store


async def _queue(request: Request) -> Any:
    return request.app.state.queue


async def _metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


async def _tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    key = credentials.credentials if credentials is not None else None
    tenant = request.app.state.tenants_file.current().authenticate(key)
    if tenant is None:
        raise Problem(
            401,
            "a valid API key is required: Authorization: Bearer <key>"
            if key is None
            else "unknown API key",
            slug="unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


async def reject_unknown_query(request: Request) -> None:
    """422 naming every query parameter the route does not declare: a typo
    (``?statsu=failed``) must not silently widen a listing, as an unknown body field must not
    silently change a merge."""
    if not request.query_params:
        return
    declared: set[str] = set()
    pending = [getattr(request.scope.get("route"), "dependant", None)]
    while pending:  # the route's own parameters and its dependencies'
        dependant = pending.pop()
        if dependant is not None:
            declared |= {field.alias for field in dependant.query_params}
            pending.extend(dependant.dependencies)
    unknown = sorted(set(request.query_params) - declared)
    if unknown:
        errors = [
            {"field": f"query.{name}", "message": "unknown query parameter"} for name in unknown
        ]
        raise Problem(
            422,
            "; ".join(f"{e['field']}: {e['message']}" for e in errors),
            slug="invalid-request",
            title="Invalid request",
            errors=errors,
        )


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[JobStore, Depends(_store)]
QueueDep = Annotated[Any, Depends(_queue)]
MetricsDep = Annotated[ServiceMetrics, Depends(_metrics)]
TenantDep = Annotated[Tenant, Depends(_tenant)]
