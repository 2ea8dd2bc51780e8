"""``/healthz`` (the process answers; never touches Redis), ``/readyz`` (Redis answers) and
``/metrics`` (Prometheus)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from jobs.queue import workers_listening
from service.api.deps import MetricsDep, QueueDep, StoreDep
from service.problems import Problem, problem_responses

__all__ = ["router"]

router = APIRouter(tags=["operations"])
log = logging.getLogger("coremerge.api")


@router.get("/healthz", operation_id="healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz", operation_id="readyz", summary="Redis answers", responses=problem_responses(503)
)
def readyz(store: StoreDep, queue: QueueDep) -> dict[str, Any]:
    """Ready when Redis answers. The body says how many workers listen and how many jobs
    wait, with a hint when jobs wait and no worker listens (the API is ready all the same:
    it accepts jobs, they run when a worker starts)."""
    try:
        store.redis.ping()
        workers, queued = workers_listening(queue), queue.count
    except Exception as exc:
        # The cause names Redis's host and port: it goes to the log, never to the caller.
        log.warning("readyz: the job store (Redis) does not answer: %s", exc)
        raise Problem(
            503,
            "the job store (Redis) does not answer",
            slug="unavailable",
            headers={"Retry-After": "5"},
        ) from None
    body: dict[str, Any] = {"status": "ready", "workers": workers, "queued": queued}
    if queued and not workers:
        body["hint"] = (
            f"{queued} jobs are waiting and no worker listens on queue {queue.name!r}: start "
            "`coremerge worker` with the same COREMERGE_REDIS_URL and COREMERGE_QUEUE"
        )
    return body


@router.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "text exposition"}},
)
def metrics(request: Request, metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
