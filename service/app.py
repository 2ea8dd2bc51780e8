"""The FastAPI application: ``create_app(settings)`` wires settings, tenants, the job store,
the queue and the metrics into one app. ``coremerge serve`` runs it under uvicorn.

While it runs, the app re-reads a changed tenants file (``jobs.tenants.TenantsFile``) and,
at start-up and every :data:`SWEEP_INTERVAL_S` seconds, queues the keyed submissions whose
API request died before queueing them (``jobs.submission.repair_stranded``).

It never imports torch (the API image has none, and it starts in well under a second);
``tests/service/test_import.py`` holds it to that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from redis import Redis
from starlette.concurrency import run_in_threadpool

from jobs.notify import Notifier
from jobs.queue import make_queue
from jobs.records import JobStore
from jobs.settings import Settings
from jobs.submission import repair_stranded
from jobs.tenants import TenantsFile
from jobs.version import VERSION
from service.api import health, merges
from service.metrics import RequestMetricsMiddleware, ServiceMetrics
from service.openapi import install_docs, openapi_schema
from service.problems import Problem, install

__all__ = ["create_app"]

log = logging.getLogger("coremerge.api")

#: Seconds between two sweeps of stranded keyed submissions by one API process.
SWEEP_INTERVAL_S = 10.0


class _BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413: by their Content-Length, or, for a
    chunked body that announces none, by buffering it up to the limit before the app sees it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = Problem(413, f"request body over {self.limit} bytes", slug="too-large")
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                await too_large.response()(scope, receive, send)
                return
            await self.app(scope, receive, send)  # the server holds the body to its length
            return
        buffered, size = [], 0
        while True:
            message = await receive()
            buffered.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                await too_large.response()(scope, receive, send)
                return
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> dict[str, Any]:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)


async def _sweep_forever(app: FastAPI, interval: float) -> None:
    """Repair stranded keyed submissions now and then every ``interval`` seconds, for as long
    as the app runs. A failed pass (Redis away) is logged and tried again next time."""
    state = app.state
    while True:
        try:
            await run_in_threadpool(repair_stranded, state.store, state.queue, state.settings)
        except Exception as exc:
            log.warning("the sweep of stranded submissions failed: %s", type(exc).__name__)
        await asyncio.sleep(interval)


def create_app(
    settings: Settings | None = None,
    *,
    redis: Redis | None = None,
    sweep_interval: float = SWEEP_INTERVAL_S,
) -> FastAPI:
    """The API for ``settings`` (default: from the environment)."""
    settings = settings or Settings()
    redis = redis or Redis.from_url(settings.redis_url, **settings.redis_kwargs)
    store = JobStore(
        redis,
        key_prefix=settings.key_prefix,
        result_ttl=settings.result_ttl,
        max_active_jobs=settings.max_active_jobs,
        submits_per_minute=settings.submits_per_minute,
        max_stored_jobs=settings.max_stored_jobs,
        # a queued job canceled here is notified from a thread: the DELETE answers at once
        on_final=Notifier(settings, background=True),
    )
    queue = make_queue(redis, settings)
    metrics = ServiceMetrics(store, queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(_sweep_forever(app, sweep_interval))
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    app = FastAPI(
        lifespan=lifespan,
        title="coremerge",
        version=VERSION,
        summary="Merge many LoRA adapters into one, in Core Space.",
        description="Submit merge jobs over adapter URIs; poll them; fetch the merged adapter "
        "from the output URI. Errors are RFC 9457 application/problem+json.",
        docs_url=None,  # served from the package by install_docs: no CDN
        redoc_url=None,
    )
    app.openapi = lambda: openapi_schema(app, open_mode=settings.tenants_file is None)  # type: ignore[method-assign]
    install_docs(app)
    app.state.settings = settings
    app.state.tenants_file = TenantsFile(settings.tenants_file)
    app.state.store = store
    app.state.queue = queue
    app.state.metrics = metrics
    install(app)
    app.include_router(merges.router)
    app.include_router(health.router)
    # Outermost first: metrics see every response, including a 413 from the body limit.
    app.add_middleware(_BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app
