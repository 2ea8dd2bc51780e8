"""Issue 14, the API side, against the real app (TestClient) and a real Redis: an output apart
from its inputs, ``read_only`` prefixes, per-tenant quotas (429), listing by status from an
index, the sweep of stranded keyed submissions, one spelling of ``S3://``, no leaks in
messages, and the tenants file re-read while the API runs."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq.serializers import JSONSerializer

from jobs import listing
from jobs.listing import list_jobs
from jobs.queue import make_queue
from jobs.records import ACCEPT_STALE_S, JobStore, job_id_for
from jobs.settings import Settings
from jobs.spec import MergeSpec
from jobs.submission import repair_stranded
from jobs.tenants import Tenant, Tenants, TenantsFileError, hash_key, refusal
from jobs.uris import output_overlap, overlaps, parse_uri
from service.app import create_app
from tests.service.conftest import AUTH_A, AUTH_B, KEY_A, KEY_B, TENANTS, spec

PROBLEM = "application/problem+json"


def submit(client: TestClient, body: dict | None = None, *, key: str | None = None, auth=AUTH_A):
    headers = dict(auth)
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post("/merges", json=spec() if body is None else body, headers=headers)


def b_spec(**changes: object) -> dict:
    """A valid spec for team-b."""
    body = {"adapters": [{"uri": "s3://adapters-b/x/"}], "output": {"uri": "s3://merged/team-b/x/"}}
    return spec(**{**body, **changes})


def queued_ids(settings: Settings, redis: Redis) -> list[str]:
    return make_queue(redis, settings).job_ids


# -- 1. the output must not overlap an input ------------------------------------------------


@pytest.mark.parametrize(
    ("output", "clashing"),
    [
        ("s3://adapters-a/task-0/", 0),  # equal
        ("S3://adapters-a/task-1", 1),  # equal after normalisation (scheme case, slash)
        ("s3://adapters-a/task-0/merged/", 0),  # inside
        ("s3://adapters-a/", 0),  # contains every input
    ],
)
def test_an_output_overlapping_an_input_is_422_naming_output_uri(client, output, clashing):
    r = submit(client, spec(output={"uri": output}))
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == PROBLEM
    problem = r.json()
    assert [e["field"] for e in problem["errors"]] == ["output.uri"]
    assert problem["detail"].startswith("output.uri: ")
    assert f"adapters.{clashing}.uri" in problem["detail"]


def test_overlap_is_compared_segment_by_segment_after_normalisation(client) -> None:
    # task-0 and task-01 share characters, not a path segment.
    r = submit(client, spec(1, output={"uri": "s3://adapters-a/task-01/"}))
    assert r.status_code == 202, r.text
    assert overlaps(parse_uri("s3://b1b/run"), parse_uri("S3://b1b/run/x/"))
    assert overlaps(parse_uri("file://localhost/d/a/"), parse_uri("file:///d/a"))
    assert not overlaps(parse_uri("s3://b1b/run"), parse_uri("s3://b1b/run-2/"))
    assert not overlaps(parse_uri("s3://b1b/a/"), parse_uri("s3://b2b/a/"))
    assert not overlaps(parse_uri("s3://b1b/a/"), parse_uri("file:///b1b/a/"))
    inputs = [parse_uri("s3://b1b/x/"), parse_uri("s3://b1b/y/")]
    assert output_overlap(parse_uri("s3://b1b/y/z/"), inputs) == 1
    assert output_overlap(parse_uri("s3://b1b/z/"), inputs) is None


def _cli_merge(argv: list[str], capsys) -> tuple[int, str]:
    from worker.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


def test_the_cli_refuses_an_output_overlapping_an_input(tmp_path, monkeypatch, capsys) -> None:
    inputs = [tmp_path / "a", tmp_path / "b"]
    for d in inputs:
        d.mkdir()
    (tmp_path / "link").symlink_to(inputs[1])
    monkeypatch.chdir(tmp_path)
    outputs = [
        str(inputs[0]),  # equal
        f"{inputs[0]}/merged",  # inside
        str(tmp_path),  # contains both
        f"file://{inputs[1]}/",  # file:// against a local path
        "./a/../b/out",  # relative, resolved to an absolute path
        "link/out",  # through a symlink into an input
    ]
    for output in outputs:
        code, err = _cli_merge(["merge", "a", str(inputs[1]), "-o", output, "-q"], capsys)
        assert code == 2, (output, err)
        assert len(err.strip().splitlines()) == 1 and "overlaps input" in err, (output, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "link"]  # nothing written


# -- 2. read_only prefixes ------------------------------------------------------------------


READ_ONLY_TENANTS = {
    "tenants": {
        "team-a": {
            "keys_sha256": [hash_key(KEY_A)],
            "allow": ["s3://adapters-a/", "s3://merged/team-a/", "s3://shared/"],
            "read_only": ["s3://shared-catalogue/", "s3://shared/frozen/"],
        },
        "team-b": {"keys_sha256": [hash_key(KEY_B)], "allow": ["s3://merged/team-b/"]},
    }
}


@pytest.fixture
def read_only_client(make_settings, tmp_path) -> TestClient:
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps(READ_ONLY_TENANTS))
    with TestClient(create_app(make_settings(tenants_file=path))) as client:
        yield client


def test_read_only_prefixes_allow_inputs_only(read_only_client) -> None:
    client = read_only_client
    catalogue = [{"uri": "s3://shared-catalogue/snli/"}, {"uri": "s3://shared/frozen/mnli/"}]
    r = submit(client, spec(adapters=catalogue))
    assert r.status_code == 202, r.text
    for output in ("s3://shared-catalogue/out/", "S3://shared-catalogue/", "s3://shared/frozen/x"):
        r = submit(client, spec(output={"uri": output}))
        assert r.status_code == 403, (output, r.text)
        assert r.headers["content-type"] == PROBLEM
        assert r.json()["detail"].startswith("output.uri: ") and "read_only" in r.json()["detail"]
    # an allow prefix around a read-only one still allows writing beside it
    assert submit(client, spec(output={"uri": "s3://shared/results/"})).status_code == 202
    # another tenant gets nothing from team-a's read-only prefixes
    r = submit(client, b_spec(adapters=catalogue[:1]), auth=AUTH_B)
    assert r.status_code == 403


def test_refusal_keeps_its_signature_and_takes_for_output() -> None:
    tenants = Tenants.from_dict(READ_ONLY_TENANTS)
    team_a = tenants.get("team-a")
    assert team_a is not None and team_a.read_only == (
        "s3://shared-catalogue/",
        "s3://shared/frozen/",
    )
    uri = "S3://shared-catalogue/x"
    assert refusal(team_a, uri, allow_file_uris=False) is None  # as an input
    refused = refusal(team_a, uri, allow_file_uris=False, for_output=True)
    assert refused is not None and refused.kind == "forbidden"
    assert refusal(team_a, "s3://merged/team-a/x/", allow_file_uris=False, for_output=True) is None
    assert refusal(Tenant("t", ("s3://okay/",)), "s3://okay/a/", allow_file_uris=False) is None


@pytest.mark.parametrize(
    "prefix", ["s3://shared/a/../b/", "s3://shared//a/", "s3://shared/a%2Fb/", "http://x/"]
)
def test_read_only_prefixes_are_checked_like_allow(prefix: str) -> None:
    raw = {"tenants": {"a": {"keys_sha256": [hash_key("k")], "read_only": [prefix]}}}
    with pytest.raises(TenantsFileError, match="read_only"):
        Tenants.from_dict(raw)


# -- 3. per-tenant quotas -------------------------------------------------------------------


def test_active_jobs_quota_is_429_per_tenant(make_settings, redis) -> None:
    settings = make_settings(max_active_jobs=3)
    with TestClient(create_app(settings)) as client:
        first = submit(client, key="k-0")
        ids = [first.json()["id"]] + [submit(client).json()["id"] for _ in range(2)]
        r = submit(client)
        assert r.status_code == 429, r.text
        assert r.headers["content-type"] == PROBLEM
        assert r.headers["retry-after"] == "5"
        assert "COREMERGE_MAX_ACTIVE_JOBS" in r.json()["detail"]
        r = submit(client, key="k-new")  # a keyed one is refused too, and leaves nothing
        assert r.status_code == 429
        assert (
            JobStore(redis, key_prefix=settings.key_prefix).get(job_id_for("team-a", "k-new"))
            is None
        )
        # an idempotent repeat still gets its job back at the limit
        again = submit(client, key="k-0")
        assert again.status_code == 200 and again.json()["id"] == ids[0]
        # another tenant is not held back
        assert submit(client, b_spec(), auth=AUTH_B).status_code == 202
        assert sorted(queued_ids(settings, redis)) == sorted(
            [*ids, *[j["id"] for j in client.get("/merges", headers=AUTH_B).json()["jobs"]]]
        )
        # a job that ends frees its slot: cancel (queued), and a worker's run to success
        assert client.delete(f"/merges/{ids[1]}", headers=AUTH_A).status_code == 200
        ids.append(submit(client).json()["id"])
        assert submit(client).status_code == 429
        store = JobStore(redis, key_prefix=settings.key_prefix)
        run = store.start(ids[0])
        assert submit(client).status_code == 429  # running still counts
        assert store.succeed(ids[0], {"uri": "s3://merged/team-a/run-1/", "seconds": 1.0}, run=run)
        assert submit(client).status_code == 202


def test_the_active_count_heals_entries_whose_record_moved_on(make_settings, redis) -> None:
    """A record ended by a version of the code that kept no status index (or deleted by hand)
    must not hold a slot for ever: at the limit, the count is checked against the records."""
    settings = make_settings(max_active_jobs=2)
    store = JobStore(redis, key_prefix=settings.key_prefix)
    with TestClient(create_app(settings)) as client:
        ids = [submit(client).json()["id"] for _ in range(2)]
        assert submit(client).status_code == 429
        redis.hset(store.job_key(ids[0]), "status", "succeeded")  # moved without its index
        redis.delete(store.job_key(ids[1]))  # gone
        assert [submit(client).status_code for _ in range(3)] == [202, 202, 429]


def test_submissions_per_minute_quota_is_429_with_retry_after(make_settings) -> None:
    with TestClient(create_app(make_settings(submits_per_minute=2))) as client:
        assert [submit(client).status_code for _ in range(2)] == [202, 202]
        r = submit(client, key="over")
        assert r.status_code == 429 and r.headers["content-type"] == PROBLEM
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert "COREMERGE_SUBMITS_PER_MINUTE" in r.json()["detail"]
        # canceling does not give a submission back, and another tenant is not counted
        assert submit(client).status_code == 429
        assert submit(client, b_spec(), auth=AUTH_B).status_code == 202


def test_a_submission_that_loses_the_race_for_the_last_slot_queues_nothing(
    make_settings, redis, monkeypatch
) -> None:
    """The look before the transaction said yes, the creation inside it said no (another
    submission took the slot in between): the RQ job queued beside it is taken out again."""
    settings = make_settings(max_active_jobs=1)
    with TestClient(create_app(settings)) as client:
        job_id = submit(client).json()["id"]
        monkeypatch.setattr(JobStore, "quota_refusal", lambda self, tenant: None)
        r = submit(client)
        assert r.status_code == 429, r.text
        assert queued_ids(settings, redis) == [job_id]
        assert [j["id"] for j in client.get("/merges", headers=AUTH_A).json()["jobs"]] == [job_id]


def test_openapi_declares_429_for_submissions(client) -> None:
    post = client.get("/openapi.json").json()["paths"]["/merges"]["post"]
    assert PROBLEM in post["responses"]["429"]["content"]


def test_the_client_waits_out_a_429(monkeypatch) -> None:
    """Nothing was created by a 429, so ``submit`` may send the same body again: after the
    answer's Retry-After, within its ``busy_timeout``."""
    import httpx

    import service.client as client_module
    from service.client import ApiError, CoremergeClient

    answers = iter([429, 429, 202, 429])

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(answers)
        if status == 429:
            problem = {"status": 429, "title": "Too Many Requests", "detail": "quota"}
            return httpx.Response(429, json=problem, headers={"Retry-After": "5"})
        return httpx.Response(202, json={"id": "1" * 32, "status": "queued"})

    slept: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", slept.append)
    busy: list[float] = []
    with CoremergeClient("http://api", KEY_A, transport=httpx.MockTransport(handler)) as client:
        job = client.submit(spec(), on_busy=lambda problem, s: busy.append(s))
        assert job["status"] == "queued" and slept == busy == [5.0, 5.0]
        with pytest.raises(ApiError) as info:
            client.submit(spec(), busy_timeout=1)  # shorter than the Retry-After: no wait
        assert info.value.status == 429 and info.value.retry_after == 5.0
        assert slept == [5.0, 5.0]


# -- 4. listing by status reads that status's index -----------------------------------------


def test_listing_by_status_reads_only_that_status(client, settings, redis, monkeypatch) -> None:
    store = JobStore(redis, key_prefix=settings.key_prefix)
    failed = submit(client).json()["id"]
    run = store.start(failed)
    store.fail(failed, "adapter_invalid", "bad", run=run)
    queued = [submit(client).json()["id"] for _ in range(30)]
    assert store.redis.zcard(store.status_key("team-a", "queued")) == 30
    assert store.redis.zcard(store.status_key("team-a", "failed")) == 1

    decoded: list[str] = []
    original = listing._summary

    def counting(store, key, values):
        summary = original(store, key, values)
        decoded.append(summary.id)
        return summary

    monkeypatch.setattr(listing, "_summary", counting)
    jobs = client.get("/merges?status=failed", headers=AUTH_A).json()["jobs"]
    assert [j["id"] for j in jobs] == [failed]
    assert decoded == [failed]  # not the 30 queued records

    decoded.clear()
    jobs = client.get("/merges?status=queued&limit=5", headers=AUTH_A).json()["jobs"]
    assert [j["id"] for j in jobs] == queued[::-1][:5] and len(decoded) == 5


def test_status_indexes_follow_every_move_and_drop_expired_records(settings, redis) -> None:
    store = JobStore(redis, key_prefix=settings.key_prefix, result_ttl=3600)
    request = MergeSpec.model_validate(spec()).model_dump(mode="json")

    def members(status: str) -> list[str]:
        keys = redis.zrange(store.status_key("ix", status), 0, -1)
        return [k.decode().rsplit(":", 1)[-1] for k in keys]

    a, b, c, d = (job_id_for("ix", None) for _ in range(4))
    for job_id in (a, b, c, d):
        store.create(job_id, "ix", request)
        store.mark_accepted(job_id)
    run = store.start(a)
    store.requeue(a, "its worker died")
    run = store.start(a)
    store.succeed(a, {"seconds": 1.0}, run=run)
    store.start(b)
    store.cancel(c)
    assert members("queued") == [d]
    assert members("running") == [b]
    assert members("succeeded") == [a] and members("canceled") == [c]
    assert [r.id for r in list_jobs(store, "ix", status="running").jobs] == [b]
    redis.delete(store.job_key(a))  # as if it expired
    assert list_jobs(store, "ix", status="succeeded").jobs == []
    assert members("succeeded") == []
    store.discard(d, "ix")
    assert members("queued") == []


# -- 5. stranded keyed submissions ----------------------------------------------------------


def _stranded(store: JobStore, key: str, *, age: float = ACCEPT_STALE_S + 5) -> str:
    """A keyed record as an API process that died before queueing it leaves it."""
    job_id = job_id_for("team-a", key)
    request = MergeSpec.model_validate(spec()).model_dump(mode="json")
    assert store.create(job_id, "team-a", request) is not None
    then = time.time() - age
    store.redis.hset(store.job_key(job_id), "accepting", repr(then))
    store.redis.zadd(store.accepting_key, {store.job_key(job_id): then})
    return job_id


def test_the_api_queues_a_stranded_keyed_submission_on_its_own(make_settings, redis) -> None:
    settings = make_settings()
    store = JobStore(redis, key_prefix=settings.key_prefix)
    job_id = _stranded(store, "died-mid-way")
    fresh = _stranded(store, "still-being-accepted", age=0)
    with TestClient(create_app(settings, sweep_interval=0.2)):
        deadline = time.monotonic() + 10
        while job_id not in queued_ids(settings, redis) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert queued_ids(settings, redis) == [job_id]  # the fresh one is left to its request
    record = store.get(job_id)
    assert record.status == "queued" and record.accepting_since is None
    assert store.get(fresh).accepting_since is not None
    assert redis.zrange(store.accepting_key, 0, -1) == [store.job_key(fresh).encode()]


def test_the_sweep_repairs_once_and_leaves_ended_jobs_alone(make_settings, redis) -> None:
    settings = make_settings()
    store = JobStore(redis, key_prefix=settings.key_prefix)
    queue = make_queue(redis, settings)
    stranded, canceled = _stranded(store, "s1"), _stranded(store, "s2")
    assert store.cancel(canceled) == "canceled"
    assert repair_stranded(store, queue, settings) == 1
    assert repair_stranded(store, queue, settings) == 0  # claimed and cleared: not twice
    assert queue.job_ids == [stranded]
    assert store.get(canceled).status == "canceled"
    assert redis.zcard(store.accepting_key) == 0
    # an API that died after queueing but before clearing the mark: queued once, not twice
    again = _stranded(store, "s3")
    from jobs.queue import enqueue_merge

    enqueue_merge(queue, again, settings, tenant="team-a")
    assert repair_stranded(store, queue, settings) == 1
    assert queue.job_ids == [stranded, again]
    from rq.job import Job

    assert Job.fetch(again, connection=redis, serializer=JSONSerializer).get_status() == "queued"


def test_of_two_sweepers_only_one_gets_a_stranded_job(make_settings, redis) -> None:
    settings = make_settings()
    store = JobStore(redis, key_prefix=settings.key_prefix)
    job_id = _stranded(store, "contested")
    assert store.claim_stale_accepting(ACCEPT_STALE_S) == [job_id]
    assert store.claim_stale_accepting(ACCEPT_STALE_S) == []  # the other sweeper


# -- 6. S3:// in any case -------------------------------------------------------------------


def test_scheme_case_is_normalised_before_storing(make_settings, redis) -> None:
    settings = make_settings()
    with TestClient(create_app(settings)) as client:
        body = spec(
            adapters=[{"uri": "S3://adapters-a/task-0"}, {"uri": "s3://adapters-a/task-1"}],
            output={"uri": "S3://merged/team-a/run-9"},
        )
        r = submit(client, body, key="upper")
        assert r.status_code == 202, r.text
        request = r.json()["request"]
        assert [a["uri"] for a in request["adapters"]] == [
            "s3://adapters-a/task-0/",
            "s3://adapters-a/task-1/",
        ]
        assert request["output"]["uri"] == "s3://merged/team-a/run-9/"
        # what the worker reads
        stored = JobStore(redis, key_prefix=settings.key_prefix).get(r.json()["id"])
        assert stored.request == request
        # the same job whichever spelling a repeat uses
        body["output"]["uri"] = "s3://merged/team-a/run-9/"
        assert submit(client, body, key="upper").status_code == 200
    open_settings = make_settings(tenants_file=None, allow_file_uris=True)
    with TestClient(create_app(open_settings)) as client:
        r = submit(client, spec(output={"uri": "FILE:///srv/out"}))
        assert r.status_code == 202 and r.json()["request"]["output"]["uri"] == "file:///srv/out/"


def test_a_spec_read_anywhere_has_a_lower_case_scheme() -> None:
    """The worker validates the stored request again (a record stored before the API
    normalised its URIs included): it must see ``s3://`` however the client spelt it."""
    spec_ = MergeSpec.model_validate(
        {"adapters": [{"uri": "S3://b1b/x"}, {"uri": "rel/Path"}], "output": {"uri": "FILE:///o"}}
    )
    assert [a.uri for a in spec_.adapters] == ["s3://b1b/x", "rel/Path"]
    assert spec_.output.uri == "file:///o"


# -- 7. no hosts, ports, paths or exception texts in responses ------------------------------

_LEAKS = ("127.0.0.1", ":1", "6379", "Errno", "Error ", "refused", "codec", "Traceback", "/tmp")


def _assert_no_leak(text: str) -> None:
    for leak in _LEAKS:
        assert leak not in text, (leak, text)


def test_no_response_carries_a_host_port_or_exception_text(make_settings, monkeypatch) -> None:
    dead = make_settings(redis_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    with TestClient(create_app(dead)) as client:
        for r in (
            client.get("/readyz"),
            submit(client),
            client.get("/merges", headers=AUTH_A),
            client.get("/merges/" + "0" * 32, headers=AUTH_A),
        ):
            assert r.status_code == 503 and r.headers["content-type"] == PROBLEM, r.text
            _assert_no_leak(r.text)
    with TestClient(create_app(make_settings()), raise_server_exceptions=False) as client:
        r = client.post(
            "/merges", content=b"b\xff", headers={**AUTH_A, "Content-Type": "application/json"}
        )
        assert r.status_code == 422
        _assert_no_leak(r.text)

        def broken(self, job_id):
            raise RuntimeError("cannot open /tmp/secret on 10.1.2.3:6379")

        monkeypatch.setattr(JobStore, "get", broken)
        r = client.get("/merges/" + "0" * 32, headers=AUTH_A)
        assert r.status_code == 500 and r.headers["content-type"] == PROBLEM
        _assert_no_leak(r.text)
        assert "10.1.2.3" not in r.text and "RuntimeError" not in r.text


# -- 9. the tenants file is re-read while the API runs --------------------------------------


def test_a_revoked_key_stops_working_without_a_restart(make_settings, tmp_path, caplog) -> None:
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps(TENANTS))
    with TestClient(create_app(make_settings(tenants_file=path))) as client:
        assert client.get("/merges", headers=AUTH_B).status_code == 200
        revoked = json.loads(json.dumps(TENANTS))
        revoked["tenants"]["team-b"]["keys_sha256"] = [hash_key("team-b-new-key")]
        _replace(path, revoked)
        assert _within(3.0, lambda: client.get("/merges", headers=AUTH_B).status_code == 401)
        new_b = {"Authorization": "Bearer team-b-new-key"}
        assert client.get("/merges", headers=new_b).status_code == 200
        assert client.get("/merges", headers=AUTH_A).status_code == 200

        # a file that turns invalid keeps the last good tenants, and says so in the log
        with caplog.at_level(logging.ERROR, logger="coremerge.auth"):
            path.write_text('{"tenants": {"team-a": {"keys_sha256": ["not-a-hash"]}}}')
            time.sleep(1.2)
            assert client.get("/merges", headers=new_b).status_code == 200
            assert client.get("/merges", headers=AUTH_A).status_code == 200
        assert any("keeping the last good" in r.getMessage() for r in caplog.records)
        path.unlink()
        time.sleep(1.2)
        assert client.get("/merges", headers=new_b).status_code == 200


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b'{"tenants": {"team-a\xff": {}}}', "not UTF-8 at byte 20"),
        (b"[" * 200_000 + b"]" * 200_000, "nested too deeply to parse"),
        (b'{"tenants": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001, "nested too deeply to parse"),
    ],
)
def test_a_tenants_file_that_turns_unparsable_keeps_the_last_good_one(
    make_settings, tmp_path, caplog, content: bytes, said: str
) -> None:
    """Invalid UTF-8 or nesting deeper than the parser's recursion limit: no 500, the last
    good tenants stay, one clear line in the log."""
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps(TENANTS))
    with TestClient(create_app(make_settings(tenants_file=path))) as client:
        assert client.get("/merges", headers=AUTH_A).status_code == 200
        with caplog.at_level(logging.ERROR, logger="coremerge.auth"):
            tmp = path.with_suffix(".new")
            tmp.write_bytes(content)
            tmp.replace(path)
            time.sleep(1.2)
            for _ in range(3):
                assert client.get("/merges", headers=AUTH_A).status_code == 200
                assert (
                    client.get("/merges", headers={"Authorization": "Bearer x"}).status_code == 401
                )
    lines = [r.getMessage() for r in caplog.records if r.name == "coremerge.auth"]
    assert len(lines) == 1, lines
    assert said in lines[0] and "keeping the last good tenants" in lines[0]
    assert "\n" not in lines[0] and len(lines[0]) < 300


def _replace(path: Path, content: dict) -> None:
    """Write a new version of ``path`` the way an editor or a Secret volume does: rename."""
    tmp = path.with_suffix(".new")
    tmp.write_text(json.dumps(content))
    tmp.replace(path)


def _within(seconds: float, check: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_an_admin_reads_and_lists_every_tenants_jobs_but_cancels_none(
    make_settings, tmp_path
) -> None:
    """The tenants file's ``"role": "admin"``: read any job, list any tenant's jobs with
    ?tenant=; no cancel of another's job; a plain tenant may not list another's."""
    path = tmp_path / "tenants.json"
    tenants = json.loads(json.dumps(TENANTS))
    tenants["tenants"]["ops"] = {"keys_sha256": [hash_key("ops-key")], "role": "admin"}
    path.write_text(json.dumps(tenants))
    admin = {"Authorization": "Bearer ops-key"}
    with TestClient(create_app(make_settings(tenants_file=path))) as client:
        job = client.post("/merges", json=spec(), headers=AUTH_A).json()
        assert client.get(f"/merges/{job['id']}", headers=admin).json()["id"] == job["id"]
        listed = client.get("/merges?tenant=team-a", headers=admin).json()["jobs"]
        assert [j["id"] for j in listed] == [job["id"]]
        assert client.get("/merges", headers=admin).json()["jobs"] == []  # its own: none
        assert client.delete(f"/merges/{job['id']}", headers=admin).status_code == 404
        refused = client.get("/merges?tenant=team-a", headers=AUTH_B)
        assert refused.status_code == 403
        assert refused.json()["type"] == "urn:coremerge:problem:forbidden"
        assert client.get(f"/merges/{job['id']}", headers=AUTH_B).status_code == 404
    bad = json.loads(json.dumps(tenants))
    bad["tenants"]["ops"]["role"] = "root"
    with pytest.raises(TenantsFileError, match="role must be"):
        Tenants.from_dict(bad)
