"""The HTTP API against the real app and a real Redis (no worker): docs/job-spec.md."""

from __future__ import annotations

import json
import zlib

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.job import Job as RQJob
from rq.serializers import JSONSerializer

from jobs.records import JobStore
from jobs.settings import Settings
from service.app import create_app
from tests.service.conftest import AUTH_A, AUTH_B, spec

PROBLEM = "application/problem+json"


def rq_queue(settings: Settings, redis: Redis) -> Queue:
    return Queue(settings.queue, connection=redis, serializer=JSONSerializer)


def submit(client: TestClient, body: dict | None = None, *, key: str | None = None, auth=AUTH_A):
    headers = dict(auth)
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post("/merges", json=spec() if body is None else body, headers=headers)


# -- submitting


def test_submit_queues_a_job_with_location(client, settings, redis) -> None:
    r = submit(client)
    assert r.status_code == 202
    job = r.json()
    assert r.headers["location"] == f"/merges/{job['id']}"
    assert job["status"] == "queued"
    assert job["started_at"] is job["finished_at"] is job["result"] is job["error"] is None
    # the request is echoed validated, with defaults filled in
    assert job["request"]["params"] == {
        "alpha": "auto",
        "density": 0.2,
        "isotropize": False,
        "axes": "reference",
    }
    assert job["request"]["output"]["dtype"] == "float32"
    assert client.get(r.headers["location"], headers=AUTH_A).json() == job


def test_enqueue_sets_json_serializer_timeouts_and_retry(client, settings, redis) -> None:
    job_id = submit(client).json()["id"]
    queue = rq_queue(settings, redis)
    assert queue.job_ids == [job_id]
    rq_job = RQJob.fetch(job_id, connection=redis, serializer=JSONSerializer)
    assert rq_job.func_name == "worker.job.run_job"
    assert rq_job.args == [job_id]
    assert rq_job.timeout == settings.job_timeout
    assert rq_job.result_ttl == settings.result_ttl
    assert rq_job.failure_ttl == settings.result_ttl
    assert rq_job.retries_left == settings.job_retries
    raw = zlib.decompress(redis.hget(f"rq:job:{job_id}", "data"))
    assert json.loads(raw)[0] == "worker.job.run_job"  # JSON, not pickle


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (spec(adapters=[{"weight": 1.0}]), "adapters.0.uri"),
        (spec(adapters=[]), "adapters"),
        (spec(adapters=[{"uri": "s3://adapters-a/x/", "wieght": 2}]), "adapters.0.wieght"),
        (spec(outptu={"uri": "s3://merged/team-a/x/"}), "outptu"),
        (spec(method="magic"), "method"),
        (spec(params={"densty": 0.2}), "params"),
        (spec(params={"density": 1.5}), "params"),
        (spec(params={"alpha": "big"}), "params"),
        (spec(params={"axes": "diagonal"}), "params"),
        (spec(space="full", params={"axes": "aligned"}), "params"),
        (spec(output={"uri": "s3://merged/team-a/x/", "rank": 0}), "output.rank"),
        (
            spec(output={"uri": "s3://merged/team-a/x/", "rank": 8, "target": "vllm"}),
            "output.target",
        ),
        (
            spec(output={"uri": "s3://merged/team-a/x/", "rank": "auto", "energy": 0}),
            "output.energy",
        ),
        (spec(output={"uri": "s3://merged/team-a/x/", "dtype": "int8"}), "output.dtype"),
        (spec(seed=-1), "seed"),
        ({"adapters": [{"uri": "s3://adapters-a/x/"}]}, "output"),
    ],
)
def test_malformed_bodies_get_422_problem_naming_the_field(client, body, field) -> None:
    r = submit(client, body)
    assert r.status_code == 422
    assert r.headers["content-type"] == PROBLEM
    problem = r.json()
    assert problem["status"] == 422 and problem["title"] and problem["type"]
    assert field in problem["detail"]
    assert field in [e["field"] for e in problem["errors"]]


def test_unknown_param_message_names_it(client) -> None:
    r = submit(client, spec(params={"densty": 0.2}))
    assert "densty" in r.json()["detail"]


def test_invalid_json_is_422_problem(client) -> None:
    r = client.post(
        "/merges", content=b"{not json", headers={**AUTH_A, "Content-Type": "application/json"}
    )
    assert r.status_code == 422
    assert r.headers["content-type"] == PROBLEM
    assert r.json()["errors"][0]["field"] == "body"


@pytest.mark.parametrize(
    "uri",
    [
        "http://adapters-a/x/",
        "https://example.com/adapter/",
        "s3://adapters-a/a/../../merged/team-b/",
        "s3://adapters-a/a/./b/",
        "s3://adapters-a//x/",
        "s3://adapters-a/x%2F..%2Fy/",
        "s3://key:secret@adapters-a/x/",
        "s3://adapters-a:9000/x/",
        "/local/path",
        "ftp://adapters-a/x/",
    ],
)
def test_malformed_uris_are_422_naming_the_field(client, uri) -> None:
    r = submit(client, spec(adapters=[{"uri": "s3://adapters-a/ok/"}, {"uri": uri}]))
    assert r.status_code == 422, r.json()
    assert r.json()["errors"][0]["field"] == "adapters.1.uri"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (spec(adapters=[{"uri": "s3://adapters-b/x/"}]), "adapters.0.uri"),
        (spec(output={"uri": "s3://merged/team-b/run/"}), "output.uri"),
        (spec(output={"uri": "s3://merged/team-ab/run/"}), "output.uri"),
        (spec(output={"uri": "s3://merged/"}), "output.uri"),
        (spec(adapters=[{"uri": "file:///data/adapter/"}]), "adapters.0.uri"),
    ],
)
def test_locations_outside_the_allow_list_are_403(client, body, field) -> None:
    r = submit(client, body)
    assert r.status_code == 403
    assert r.headers["content-type"] == PROBLEM
    assert r.json()["detail"].startswith(field)


def test_configured_limits_are_422_naming_the_field(make_settings) -> None:
    settings = make_settings(max_adapters=2, max_output_rank=64, max_request_bytes=2048)
    with TestClient(create_app(settings)) as client:
        r = submit(client, spec(3))
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "adapters"
        r = submit(client, spec(output={"uri": "s3://merged/team-a/x/", "rank": 128}))
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "output.rank"
        auto = {"uri": "s3://merged/team-a/x/", "rank": "auto", "target": "vllm"}
        assert submit(client, spec(output=auto)).status_code == 202  # capped at 64, accepted
        r = submit(client, spec(2, method="ta", params={}, padding="x" * 4096))
        assert r.status_code == 413 and r.headers["content-type"] == PROBLEM
        chunks = iter([b'{"adapters": [', b" " * 4096, b"]}"])  # no Content-Length: chunked
        r = client.post(
            "/merges", content=chunks, headers={**AUTH_A, "Content-Type": "application/json"}
        )
        assert r.status_code == 413 and r.headers["content-type"] == PROBLEM
    with TestClient(create_app(make_settings(max_output_rank=3))) as client:
        auto = {"uri": "s3://merged/team-a/x/", "rank": "auto", "target": "fireworks"}
        r = submit(client, spec(output=auto))
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "output.target"


# -- auth and tenancy


def test_missing_or_unknown_key_is_401(client) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic a2V5"}):
        r = client.post("/merges", json=spec(), headers=headers)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.headers["content-type"] == PROBLEM
    assert client.get("/merges").status_code == 401


def test_a_tenant_sees_and_cancels_only_its_own_jobs(client) -> None:
    job_id = submit(client).json()["id"]
    for method in ("GET", "DELETE"):
        r = client.request(method, f"/merges/{job_id}", headers=AUTH_B)
        assert r.status_code == 404 and r.headers["content-type"] == PROBLEM
    assert client.get("/merges", headers=AUTH_B).json() == {"jobs": [], "next_cursor": None}
    assert [j["id"] for j in client.get("/merges", headers=AUTH_A).json()["jobs"]] == [job_id]
    assert client.get(f"/merges/{job_id}", headers=AUTH_A).json()["status"] == "queued"


def test_unknown_job_is_404(client) -> None:
    assert client.get("/merges/" + "0" * 32, headers=AUTH_A).status_code == 404
    assert client.get("/merges/not-an-id", headers=AUTH_A).status_code == 404


def test_open_mode_accepts_any_s3_location(make_settings) -> None:
    with TestClient(create_app(make_settings(tenants_file=None))) as client:
        r = client.post("/merges", json=spec(output={"uri": "s3://anything/else/"}))
        assert r.status_code == 202
        r = client.post("/merges", json=spec(output={"uri": "file:///tmp/out/"}))
        assert r.status_code == 403  # file:// stays off unless enabled, and says who refused
        assert "disabled in the API (coremerge serve)" in r.json()["detail"]
        assert "COREMERGE_ALLOW_FILE_URIS=true" in r.json()["detail"]
    settings = make_settings(tenants_file=None, allow_file_uris=True)
    with TestClient(create_app(settings)) as client:
        r = client.post("/merges", json=spec(output={"uri": "file:///tmp/out/"}))
        assert r.status_code == 202


# -- idempotency


def test_idempotent_repeat_returns_the_same_job(client, settings, redis) -> None:
    first = submit(client, key="run-42")
    again = submit(client, key="run-42")
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert rq_queue(settings, redis).count == 1
    # the same key from another tenant is another job
    other = submit(client, spec(adapters=[{"uri": "s3://adapters-b/x/"}],
                                output={"uri": "s3://merged/team-b/x/"}), key="run-42", auth=AUTH_B)  # fmt: skip
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


def test_idempotency_key_with_another_body_is_422(client) -> None:
    assert submit(client, key="k1").status_code == 202
    r = submit(client, spec(seed=1), key="k1")
    assert r.status_code == 422
    assert r.headers["content-type"] == PROBLEM
    assert "Idempotency-Key" in r.json()["detail"]


def test_idempotency_key_still_being_accepted_is_409(client, settings, redis) -> None:
    from jobs.records import job_id_for
    from jobs.spec import MergeSpec

    store = JobStore(redis, key_prefix=settings.key_prefix)
    request = MergeSpec.model_validate(spec()).model_dump(mode="json")
    job_id = job_id_for("team-a", "k-busy")
    assert store.create(job_id, "team-a", request) is not None  # a first request, mid-way
    r = submit(client, key="k-busy")
    assert r.status_code == 409 and r.headers["content-type"] == PROBLEM

    # A first request that died mid-way (stale) is finished by the repeat.
    redis.hset(store.job_key(job_id), "accepting", "1.0")
    r = submit(client, key="k-busy")
    assert r.status_code == 200 and r.json()["id"] == job_id
    assert rq_queue(settings, redis).job_ids == [job_id]
    assert store.get(job_id).accepting_since is None


def test_bad_idempotency_key_is_422(client) -> None:
    r = submit(client, key="x" * 300)
    assert r.status_code == 422 and "idempotency" in r.json()["detail"].lower()


# -- listing and cancelling


def test_list_is_newest_first_with_status_filter_and_limit(client) -> None:
    ids = [submit(client).json()["id"] for _ in range(3)]
    client.delete(f"/merges/{ids[1]}", headers=AUTH_A)
    jobs = client.get("/merges", headers=AUTH_A).json()["jobs"]
    assert [j["id"] for j in jobs] == ids[::-1]
    queued = client.get("/merges?status=queued", headers=AUTH_A).json()["jobs"]
    assert [j["id"] for j in queued] == [ids[2], ids[0]]
    assert [j["id"] for j in client.get("/merges?limit=1", headers=AUTH_A).json()["jobs"]] == [
        ids[2]
    ]
    r = client.get("/merges?status=done", headers=AUTH_A)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "query.status"


def test_cancel_queued_job_is_immediate(client, settings, redis) -> None:
    job_id = submit(client).json()["id"]
    r = client.delete(f"/merges/{job_id}", headers=AUTH_A)
    assert r.status_code == 200
    job = r.json()
    assert job["status"] == "canceled" and job["error"]["code"] == "canceled"
    assert job["finished_at"] is not None
    assert rq_queue(settings, redis).count == 0  # taken out of RQ's queue too
    assert client.delete(f"/merges/{job_id}", headers=AUTH_A).status_code == 200  # idempotent


def test_cancel_running_job_raises_the_flag(client, settings, redis) -> None:
    store = JobStore(redis, key_prefix=settings.key_prefix)
    job_id = submit(client).json()["id"]
    assert store.start(job_id)  # as a worker would
    assert not store.should_stop(job_id)
    r = client.delete(f"/merges/{job_id}", headers=AUTH_A)
    assert r.status_code == 202 and r.json()["status"] == "running"
    assert store.should_stop(job_id)
    store.fail(job_id, "canceled", "canceled after 3 of 8 modules")
    assert client.get(f"/merges/{job_id}", headers=AUTH_A).json()["status"] == "canceled"


def test_cancel_finished_job_is_409(client, settings, redis) -> None:
    store = JobStore(redis, key_prefix=settings.key_prefix)
    job_id = submit(client).json()["id"]
    store.start(job_id)
    store.succeed(job_id, {"uri": "s3://merged/team-a/run-1/", "seconds": 1.0})
    r = client.delete(f"/merges/{job_id}", headers=AUTH_A)
    assert r.status_code == 409 and r.headers["content-type"] == PROBLEM


def test_cancel_while_the_report_is_written_is_409(client, settings, redis) -> None:
    """Once the worker has committed to writing the report, the output is final: a cancel is
    refused (it used to answer 202 while the job went on to succeed)."""
    store = JobStore(redis, key_prefix=settings.key_prefix)
    job_id = submit(client).json()["id"]
    run = store.start(job_id)
    assert run is not None and store.commit(job_id, run=run)
    r = client.delete(f"/merges/{job_id}", headers=AUTH_A)
    assert r.status_code == 409 and r.headers["content-type"] == PROBLEM
    assert "writing its report" in r.json()["detail"]
    assert not store.should_stop(job_id, run=run)


# -- operations


def test_healthz_readyz_and_redis_outage(make_settings) -> None:
    with TestClient(create_app(make_settings())) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready", "workers": 0, "queued": 0}
    dead = make_settings(redis_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    with TestClient(create_app(dead)) as client:
        assert client.get("/healthz").status_code == 200  # never touches Redis
        r = client.get("/readyz")
        assert r.status_code == 503 and r.headers["content-type"] == PROBLEM
        r = submit(client)
        assert r.status_code == 503 and r.headers["content-type"] == PROBLEM
        assert "retry-after" in r.headers
        assert "coremerge_redis_up 0.0" in client.get("/metrics").text


def test_metrics(client, settings, redis) -> None:
    submit(client)
    client.get("/merges/" + "0" * 32, headers=AUTH_A)
    text = client.get("/metrics").text
    assert 'coremerge_http_requests_total{method="POST",route="/merges",status="202"} 1.0' in text
    assert (
        'coremerge_http_requests_total{method="GET",route="/merges/{job_id}",status="404"} 1.0'
        in text
    )
    assert "coremerge_http_request_seconds_bucket" in text
    assert 'coremerge_jobs{status="queued"} 1.0' in text
    assert "coremerge_queue_depth 1.0" in text
    assert "coremerge_jobs_submitted_total 1.0" in text
    assert "coremerge_merge_seconds_count 0.0" in text


def test_wrong_method_is_405_with_allow(client) -> None:
    r = client.put("/merges", headers=AUTH_A)
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert r.headers["content-type"] == PROBLEM


def test_openapi_declares_statuses_problems_and_location(client) -> None:
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/merges"]["post"]
    assert {"200", "202", "401", "403", "409", "413", "422", "503"} <= set(post["responses"])
    assert "Location" in post["responses"]["202"]["headers"]
    assert "application/problem+json" in post["responses"]["422"]["content"]
    assert "Idempotency-Key" in [p["name"] for p in post["parameters"]]
    assert set(schema["paths"]["/merges/{job_id}"]) == {"get", "delete"}
    assert client.get("/docs").status_code == 200
