"""A small Python client for the coremerge HTTP API (what ``coremerge submit`` and the tests use).

>>> with CoremergeClient("http://127.0.0.1:8000", api_key="…") as client:  # doctest: +SKIP
...     job = client.submit(spec, idempotency_key="run-42")
...     job = client.wait(job["id"], on_progress=lambda j: print(j["progress"]))
...     job["status"], job["result"]["uri"]
('succeeded', 's3://merged/team-a/run-42/')

Errors: every non-2xx answer raises :class:`ApiError` carrying the status and the
problem+json body; transport failures raise ``httpx.HTTPError`` as they come. A submission
refused by a quota (429: nothing was created) is retried after its ``Retry-After`` for up to
``busy_timeout`` seconds before that error is raised.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from jobs.status import TERMINAL

__all__ = ["TERMINAL", "ApiError", "CoremergeClient"]


def _seconds(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds (the API sends whole seconds, never an HTTP date)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class ApiError(Exception):
    """A non-2xx answer. ``problem`` is its RFC 9457 body (or a stand-in for a non-JSON one)."""

    def __init__(
        self, status: int, problem: dict[str, Any], *, retry_after: float | None = None
    ) -> None:
        self.status = status
        self.problem = problem
        #: The answer's ``Retry-After`` in seconds (429, 409, 503), when it had one.
        self.retry_after = retry_after
        super().__init__(f"HTTP {status}: {problem.get('detail') or problem.get('title')}")


class CoremergeClient:
    """Submit, read, list, cancel and wait for merge jobs. ``transport`` is an optional httpx
    transport (tests pass ``httpx.ASGITransport(app)`` or a mock)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> CoremergeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.is_success:
            return response.json()
        try:
            problem = response.json()
        except ValueError:
            problem = {"title": response.reason_phrase, "detail": response.text[:500]}
        raise ApiError(
            response.status_code, problem, retry_after=_seconds(response.headers.get("Retry-After"))
        )

    def submit(
        self,
        spec: Any,
        *,
        idempotency_key: str | None = None,
        busy_timeout: float = 600.0,
        on_busy: Callable[[dict[str, Any], float], None] | None = None,
    ) -> dict[str, Any]:
        """Submit a job spec (a dict, or a ``MergeSpec``); returns the job.

        A 429 (the tenant is at a quota; nothing was created, so a retry cannot make a second
        job) is retried after the answer's ``Retry-After`` while ``busy_timeout`` seconds
        last, calling ``on_busy(problem, seconds)`` before each wait; then it is raised."""
        body = spec.model_dump(mode="json") if hasattr(spec, "model_dump") else spec
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                return self._call("POST", "/merges", json=body, headers=headers)
            except ApiError as exc:
                wait = exc.retry_after
                if exc.status != 429 or wait is None or time.monotonic() + wait > deadline:
                    raise
                if on_busy is not None:
                    on_busy(exc.problem, wait)
                time.sleep(wait)

    def ready(self) -> dict[str, Any]:
        """``GET /readyz``: Redis answers; how many workers listen, how many jobs wait, and a
        hint when jobs wait with no worker."""
        return self._call("GET", "/readyz")

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: the API process answers (it does not look at Redis)."""
        return self._call("GET", "/healthz")

    def get(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/merges/{job_id}")

    def page(
        self, *, status: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page of the caller's jobs, newest first: ``{"jobs": [summary, …],
        "next_cursor": …}`` (``limit`` at most 100; pass ``next_cursor`` back for the next)."""
        params: dict[str, Any] = {"limit": limit}
        if status is not None:
            params["status"] = status
        if cursor is not None:
            params["cursor"] = cursor
        return self._call("GET", "/merges", params=params)

    def list(self, *, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Up to ``limit`` of the caller's jobs (summaries), newest first, page after page."""
        jobs: list[dict[str, Any]] = []
        cursor = None
        while len(jobs) < limit:
            page = self.page(status=status, limit=min(limit - len(jobs), 100), cursor=cursor)
            jobs += page["jobs"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        return jobs

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued job (at once) or a running one (at its next module boundary)."""
        return self._call("DELETE", f"/merges/{job_id}")

    def wait(
        self,
        job_id: str,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        poll_interval: float = 0.5,
        timeout: float | None = None,
        notify_every: float | None = None,
    ) -> dict[str, Any]:
        """Poll until the job is succeeded, failed or canceled; return it. ``on_progress`` is
        called with the job whenever its status or progress changed (and, with
        ``notify_every``, at least that often); raises ``TimeoutError`` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen, notified = None, 0.0
        while True:
            job = self.get(job_id)
            state = (job["status"], (job.get("progress") or {}).get("modules_done"),
                     (job.get("progress") or {}).get("stage"))  # fmt: skip
            due = notify_every is not None and time.monotonic() - notified >= notify_every
            if on_progress is not None and (state != seen or due):
                on_progress(job)
                notified = time.monotonic()
            seen = state
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout} s")
            time.sleep(poll_interval)
