"""A small Python client for the coremerge HTTP API (what ``coremerge submit`` and the tests use).

>>> with CoremergeClient("http://127.0.0.1:8000", api_key="…") as client:  # doctest: +SKIP
...     job = client.submit(spec, idempotency_key="run-42")
...     job = client.wait(job["id"], on_progress=lambda j: print(j["progress"]))
...     job["status"], job["result"]["uri"]
('succeeded', 's3://merged/team-a/run-42/')

Errors: every non-2xx answer raises :class:`ApiError` carrying the status and the
problem+json body; transport failures raise ``httpx.HTTPError`` as they come.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from jobs.status import TERMINAL

__all__ = ["TERMINAL", "ApiError", "CoremergeClient"]


class ApiError(Exception):
    """A non-2xx answer. ``problem`` is its RFC 9457 body (or a stand-in for a non-JSON one)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
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
        raise ApiError(response.status_code, problem)

    def submit(self, spec: Any, *, idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a job spec (a dict, or a ``MergeSpec``); returns the job."""
        body = spec.model_dump(mode="json") if hasattr(spec, "model_dump") else spec
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/merges", json=body, headers=headers)

    def get(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/merges/{job_id}")

    def list(self, *, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if status is not None:
            params["status"] = status
        return self._call("GET", "/merges", params=params)["jobs"]

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
    ) -> dict[str, Any]:
        """Poll until the job is succeeded, failed or canceled; return it. ``on_progress`` is
        called with the job whenever its status or progress changed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = None
        while True:
            job = self.get(job_id)
            state = (job["status"], job.get("progress"))
            if on_progress is not None and state != seen:
                on_progress(job)
            seen = state
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout} s")
            time.sleep(poll_interval)
