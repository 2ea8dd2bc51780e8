"""``GET /merges`` lists summaries a page at a time (issue 22 §4): no ``request`` in an item,
``limit`` at most 100, ``next_cursor`` to the next page; and a record's stored size is bounded.

The figures (bytes per listed item, bytes per stored record) are printed with ``-s``."""

from __future__ import annotations

import random
import string

import pytest
from fastapi.testclient import TestClient

from jobs.listing import MAX_PAGE, list_jobs
from jobs.records import MAX_ERROR_MESSAGE, JobStore, job_id_for
from jobs.settings import Settings
from jobs.spec import MAX_ADAPTERS, MergeSpec
from service.app import create_app
from tests.service.conftest import AUTH_A, spec

PROBLEM = "application/problem+json"


def _maximal_request(rng: random.Random) -> dict:
    """A spec at every length limit: 64 adapters, URIs of 2048 random characters (they do not
    compress), 200-character names."""

    def uri(prefix: str) -> str:
        tail = "".join(rng.choices(string.ascii_letters + string.digits, k=2048))
        return (prefix + tail)[:2047] + "/"

    adapters = [
        {"uri": uri("s3://adapters-a/"), "name": "n" * 200, "weight": 1.0}
        for _ in range(MAX_ADAPTERS)
    ]
    body = spec(adapters=adapters, output={"uri": uri("s3://merged/team-a/")})
    return MergeSpec.model_validate(body).model_dump(mode="json")


def test_pages_follow_the_cursor_newest_first_without_repeats(client, settings, redis) -> None:
    ids = [client.post("/merges", json=spec(), headers=AUTH_A).json()["id"] for _ in range(7)]
    seen: list[str] = []
    page = client.get("/merges?limit=3", headers=AUTH_A).json()
    while True:
        assert len(page["jobs"]) <= 3
        seen += [j["id"] for j in page["jobs"]]
        if page["next_cursor"] is None:
            break
        if len(seen) == 3:  # a job created between two pages shows on neither of the next
            client.post("/merges", json=spec(), headers=AUTH_A)
        url = f"/merges?limit=3&cursor={page['next_cursor']}"
        page = client.get(url, headers=AUTH_A).json()
    assert seen == ids[::-1]
    # by status, through the status index, with the same cursor mechanics
    store = JobStore(redis, key_prefix=settings.key_prefix)
    store.cancel(ids[2]), store.cancel(ids[4])
    first = client.get("/merges?status=canceled&limit=1", headers=AUTH_A).json()
    assert [j["id"] for j in first["jobs"]] == [ids[4]]
    url = f"/merges?status=canceled&limit=1&cursor={first['next_cursor']}"
    second = client.get(url, headers=AUTH_A).json()
    assert [j["id"] for j in second["jobs"]] == [ids[2]] and second["next_cursor"] is None


def test_items_are_summaries(client) -> None:
    job = client.post("/merges", json=spec(3), headers=AUTH_A).json()
    (item,) = client.get("/merges", headers=AUTH_A).json()["jobs"]
    assert "request" not in item and "result" not in item
    assert item["id"] == job["id"] and item["status"] == "queued"
    assert (item["method"], item["space"], item["adapters"]) == ("ties", "core", 3)
    assert item["output_uri"] == job["request"]["output"]["uri"]
    assert item["error_code"] is None and item["attempts"] == 0


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (f"limit={MAX_PAGE + 1}", "query.limit"),
        ("limit=0", "query.limit"),
        ("cursor=bm90LWEtY3Vyc29y", "query.cursor"),  # base64 of something else
        ("cursor=not%20base64!", "query.cursor"),
    ],
)
def test_bad_paging_is_422_naming_the_parameter(client, query, field) -> None:
    r = client.get(f"/merges?{query}", headers=AUTH_A)
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    assert r.json()["errors"][0]["field"] == field


def test_a_full_page_of_maximal_records_stays_small(client, settings, redis) -> None:
    """100 records at every length limit (the request alone ~150 KB each): one page is the
    summaries only, a few KiB per item, whatever the records hold."""
    store = JobStore(redis, key_prefix=settings.key_prefix)
    rng = random.Random(0)
    for _ in range(MAX_PAGE):
        job_id = job_id_for("team-a", None)
        store.create(job_id, "team-a", _maximal_request(rng))
        store.fail(job_id, "adapter_invalid", "x" * 10 * MAX_ERROR_MESSAGE)
    r = client.get(f"/merges?limit={MAX_PAGE}", headers=AUTH_A)
    assert r.status_code == 200 and len(r.json()["jobs"]) == MAX_PAGE
    per_item = len(r.content) / MAX_PAGE
    print(
        f"\nlisting: {len(r.content)} bytes for {MAX_PAGE} maximal records, {per_item:.0f} per item"
    )
    assert per_item < 2600  # mostly the 2048-character output URI


def test_a_maximal_record_is_bounded_in_redis(settings, redis) -> None:
    """The largest record a client can cause: a maximal spec and a failure whose message was
    ten times the cap (cut to MAX_ERROR_MESSAGE). Measured with MEMORY USAGE."""
    store = JobStore(redis, key_prefix=settings.key_prefix)
    job_id = job_id_for("team-a", None)
    store.create(job_id, "team-a", _maximal_request(random.Random(1)))
    run = store.start(job_id)
    store.fail(job_id, "adapter_invalid", "é" * 10 * MAX_ERROR_MESSAGE, run=run)
    record = store.get(job_id)
    assert len(record.error["message"]) == MAX_ERROR_MESSAGE
    used = redis.memory_usage(store.job_key(job_id), samples=0)
    print(f"\nmaximal record: {used} bytes in Redis (MEMORY USAGE)")
    assert used < 160_000
    assert list_jobs(store, "team-a").jobs[0].error_code == "adapter_invalid"


def test_submit_then_cancel_cannot_pile_up_records(make_settings, redis) -> None:
    """A tenant keeps at most COREMERGE_MAX_STORED_JOBS records: each submission beyond it
    deletes the tenant's oldest finished record; active jobs and other tenants' stay."""
    settings = make_settings(max_stored_jobs=5, max_active_jobs=2)
    store = JobStore(redis, key_prefix=settings.key_prefix, max_stored_jobs=5, max_active_jobs=2)
    other = job_id_for("team-b", None)
    store.create(other, "team-b", MergeSpec.model_validate(spec()).model_dump(mode="json"))
    store.cancel(other)
    with TestClient(create_app(settings)) as client:
        running = client.post("/merges", json=spec(), headers=AUTH_A).json()["id"]
        store.start(running)
        canceled = []
        for _ in range(20):
            job = client.post("/merges", json=spec(), headers=AUTH_A).json()
            assert client.delete(f"/merges/{job['id']}", headers=AUTH_A).status_code == 200
            canceled.append(job["id"])
        kept = [j["id"] for j in client.get("/merges", headers=AUTH_A).json()["jobs"]]
        assert kept == [*canceled[::-1][:4], running]
        assert client.get(f"/merges/{canceled[0]}", headers=AUTH_A).status_code == 404
    for status in ("canceled", "running"):
        assert redis.zcard(store.status_key("team-a", status)) == (4 if status == "canceled" else 1)
    assert store.get(other) is not None
    assert len([k for k in redis.scan_iter(f"{settings.key_prefix}:job:*")]) == 6


def test_the_stored_cap_holds_the_active_jobs() -> None:
    with pytest.raises(ValueError, match="COREMERGE_MAX_STORED_JOBS"):
        Settings(max_stored_jobs=10, max_active_jobs=50)
