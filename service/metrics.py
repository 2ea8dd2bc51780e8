"""Prometheus metrics of one API process, plus the job numbers every process shares.

HTTP request counts and latencies are per process (a fresh registry per app, so tests and
several apps in one process do not collide). Job counts by status, the queue depth and the
merge-time histogram live in Redis (``JobStore`` keeps them as jobs move), so they are read
at scrape time and agree whichever API process answers and however many workers there are.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from jobs.errors import ERROR_CODES
from jobs.queue import workers_listening
from jobs.records import MERGE_SECONDS_BUCKETS, JobStore
from jobs.status import ACTIVE, STATUSES

__all__ = ["RequestMetricsMiddleware", "ServiceMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _JobsCollector(Collector):
    """Job numbers read from Redis at scrape time."""

    def __init__(self, store: JobStore, queue: Any) -> None:
        self.store, self.queue = store, queue

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("coremerge_redis_up", "whether the job store answered")
        try:
            stats = self.store.stats()
            depth = self.queue.count
            workers = workers_listening(self.queue)
        except Exception:  # a scrape must not fail because Redis is down: report it instead
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        active = GaugeMetricFamily(
            "coremerge_jobs", "jobs currently queued or running", labels=["status"]
        )
        for status in ACTIVE:
            active.add_metric([status], max(stats.get(f"active:{status}", 0), 0))
        yield active

        entered = CounterMetricFamily(
            "coremerge_jobs_entered", "jobs that entered each status", labels=["status"]
        )
        for status in STATUSES:
            entered.add_metric([status], stats.get(f"entered:{status}", 0))
        yield entered

        yield GaugeMetricFamily(
            "coremerge_queue_depth", "jobs waiting in the RQ queue", value=depth
        )
        yield GaugeMetricFamily(
            "coremerge_workers", "RQ workers listening on the queue (heartbeating)", value=workers
        )
        failed = CounterMetricFamily(
            "coremerge_jobs_failed",
            "jobs that ended failed or canceled, by error code (job outcomes, whatever RQ "
            "counts: a merge that fails returns normally, so RQ reports it as OK)",
            labels=["code"],
        )
        for code in ERROR_CODES:
            failed.add_metric([code], stats.get(f"error:{code}", 0))
        yield failed

        count = stats.get("merge_seconds_count", 0)
        buckets = [
            (str(float(b)), stats.get(f"merge_seconds_le:{b}", 0)) for b in MERGE_SECONDS_BUCKETS
        ]
        yield HistogramMetricFamily(
            "coremerge_merge_seconds",
            "worker time of succeeded merges (download, merge, upload)",
            buckets=[*buckets, ("+Inf", count)],
            sum_value=stats.get("merge_seconds_sum", 0.0),
        )


class ServiceMetrics:
    """The registry of one app: request metrics, submissions, and the Redis-backed job numbers."""

    def __init__(self, store: JobStore, queue: Any) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "coremerge_http_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "coremerge_http_request_seconds",
            "HTTP request latency by method and route template",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.submitted = Counter(
            "coremerge_jobs_submitted",
            "merge jobs accepted by this process (repeats excluded)",
            registry=self.registry,
        )
        self.registry.register(_JobsCollector(store, queue))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """A plain ASGI middleware (cheaper than ``BaseHTTPMiddleware``) that counts and times
    every request, labelled by its route template so that job ids do not explode the labels."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            # The router stores the matched route in the scope it was given (this one).
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)
