"""Issue 14 end to end, through the real API process (uvicorn), a real worker, moto and Redis:
``S3://`` in upper case merges like ``s3://``; an output inside an input is refused before
anything is queued; a keyed submission stranded by a dead API request is queued by the API's
own sweep and then merged."""

from __future__ import annotations

import time
import uuid

import pytest
from redis import Redis

from jobs.records import ACCEPT_STALE_S, JobStore, job_id_for
from jobs.spec import MergeSpec
from service.client import ApiError
from tests.integration.conftest import Stack


def _output() -> str:
    return f"s3://merged/team-a/{uuid.uuid4().hex[:12]}/"


def _wait(stack: Stack, job_id: str, timeout: float = 90) -> dict:
    with stack.client() as client:
        try:
            return client.wait(job_id, poll_interval=0.05, timeout=timeout)
        except TimeoutError:
            raise AssertionError(f"{job_id} did not finish:\n{stack.tail('worker')}") from None


def test_upper_case_s3_scheme_merges_like_lower_case(stack: Stack, tiny: list[str]) -> None:
    output = _output()
    spec = {
        "adapters": [{"uri": "S3" + uri.removeprefix("s3").rstrip("/")} for uri in tiny],
        "method": "ta",
        "output": {"uri": "S3" + output.removeprefix("s3")},
    }
    with stack.client() as client:
        job = client.submit(spec)
    assert [a["uri"] for a in job["request"]["adapters"]] == tiny
    job = _wait(stack, job["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["uri"] == output


def test_an_output_inside_an_input_is_refused_before_queueing(
    stack: Stack, tiny: list[str]
) -> None:
    spec = {"adapters": [{"uri": u} for u in tiny], "output": {"uri": f"{tiny[1]}merged/"}}
    with stack.client() as client, pytest.raises(ApiError) as info:
        client.submit(spec)
    assert info.value.status == 422
    assert [e["field"] for e in info.value.problem["errors"]] == ["output.uri"]


def test_a_stranded_keyed_submission_is_queued_by_the_api_and_merged(
    stack: Stack, tiny: list[str]
) -> None:
    """As an API process killed between creating the record and queueing the job leaves it:
    a record marked accepting, long ago, and nothing in RQ. The running API's sweep (every
    10 s) queues it; the worker merges it; nobody repeated the request."""
    store = JobStore(Redis.from_url(stack.redis_url))
    spec = {"adapters": [{"uri": u} for u in tiny], "method": "ta", "output": {"uri": _output()}}
    request = MergeSpec.model_validate(spec).model_dump(mode="json")
    job_id = job_id_for("team-a", f"stranded-{uuid.uuid4().hex}")
    assert store.create(job_id, "team-a", request) is not None
    then = time.time() - ACCEPT_STALE_S - 1
    store.redis.hset(store.job_key(job_id), "accepting", repr(then))
    store.redis.zadd(store.accepting_key, {store.job_key(job_id): then})
    job = _wait(stack, job_id, timeout=120)
    assert job["status"] == "succeeded", job
    assert store.get(job_id).accepting_since is None
