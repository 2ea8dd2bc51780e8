"""worker.storage against moto's S3 server: fetching adapters, publishing outputs, error codes.
Faults are injected through botocore's ``before-send`` hook, so they pass through its retries."""

from __future__ import annotations

import json
import struct
import uuid
from pathlib import Path

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ConnectionClosedError, ReadTimeoutError

from jobs.errors import (
    AccessDenied,
    AdapterInvalid,
    AdapterNotFound,
    LimitExceeded,
    OutputExists,
    StorageError,
)
from jobs.settings import Settings
from tests.integration.conftest import AWS_ENV
from tests.storage_helpers import (
    MemoryStore,
    download_adapter,
    fetch_adapters,
    publish,
    published_by,
    read_report,
)
from worker.storage import (
    CLAIM_NAME,
    CONFIG_NAME,
    JOB_ID_META,
    REPORT_NAME,
    WEIGHTS_NAME,
    Owner,
    Storage,
    make_s3_client,
    make_transfer_config,
)
from worker.storage.local import META_DIR
from worker.storage.objects import AlreadyExists


@pytest.fixture
def s3_client(moto_endpoint, s3, monkeypatch):
    """A client built the way the worker builds it (settings + boto3's credential chain)."""
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    settings = Settings(s3_endpoint_url=moto_endpoint, s3_max_attempts=2)
    return make_s3_client(settings)


@pytest.fixture
def prefix() -> str:
    return f"storage-{uuid.uuid4().hex[:8]}/"


def owner(job_id: str) -> Owner:
    """A job as the owner of output objects, with a secret of its own."""
    return Owner(job_id, f"secret-of-{job_id}")


def fake_adapter(directory: Path, payload: bytes = b"\0" * 64) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"__metadata__": {}}).encode()
    (directory / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(header)) + header + payload)
    (directory / CONFIG_NAME).write_text('{"peft_type": "LORA"}')
    return directory


def put_dir(s3, local: Path, bucket: str, prefix: str) -> None:
    for path in local.iterdir():
        s3.upload_file(str(path), bucket, prefix + path.name)


def inject(client, status: int, code: str, *, when=lambda request: True, times: int = 10**9):
    """Answer matching requests with an error response, before they reach the server."""
    calls = []

    def before_send(request, **kwargs):
        if len(calls) < times and when(request):
            calls.append(request.url)
            body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
            return AWSResponse(request.url, status, {}, _Raw(body))
        return None

    client.meta.events.register("before-send.s3", before_send)
    return calls


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **kwargs):
        yield self.body

    def read(self, *args, **kwargs):
        return self.body


def test_fetch_downloads_each_adapter_to_its_own_dir(s3_client, s3, prefix, tmp_path) -> None:
    for i in range(2):
        put_dir(
            s3, fake_adapter(tmp_path / f"src{i}", bytes([i]) * 100), "adapters-a", f"{prefix}a{i}/"
        )
    storage = Storage(s3_client, transfer_config=make_transfer_config(Settings()))
    dirs = fetch_adapters(
        storage, [f"s3://adapters-a/{prefix}a0/", f"s3://adapters-a/{prefix}a1"], tmp_path / "in"
    )
    assert dirs == [tmp_path / "in" / "0", tmp_path / "in" / "1"]
    for i, d in enumerate(dirs):
        assert (d / WEIGHTS_NAME).read_bytes() == (tmp_path / f"src{i}" / WEIGHTS_NAME).read_bytes()
        assert sorted(p.name for p in d.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_fetch_file_uris_in_place(tmp_path) -> None:
    src = fake_adapter(tmp_path / "local")
    assert fetch_adapters(Storage(None), [f"file://{src}"], tmp_path / "in") == [src]
    with pytest.raises(AdapterNotFound):
        fetch_adapters(Storage(None), [f"file://{tmp_path}/missing/"], tmp_path / "in2")


def test_missing_adapter_key_or_bucket_is_adapter_not_found(s3_client, prefix, tmp_path) -> None:
    storage = Storage(s3_client)
    with pytest.raises(AdapterNotFound, match=r"adapter_config\.json"):
        fetch_adapters(storage, [f"s3://adapters-a/{prefix}nothing/"], tmp_path / "a")
    with pytest.raises(AdapterNotFound):
        fetch_adapters(storage, ["s3://no-such-bucket-here/x/"], tmp_path / "b")


def test_pickle_weights_and_broken_safetensors_are_adapter_invalid(s3_client, s3, prefix, tmp_path):
    src = fake_adapter(tmp_path / "src")
    s3.upload_file(str(src / CONFIG_NAME), "adapters-a", f"{prefix}pickle/{CONFIG_NAME}")
    s3.put_object(Bucket="adapters-a", Key=f"{prefix}pickle/adapter_model.bin", Body=b"\x80\x04")
    storage = Storage(s3_client)
    with pytest.raises(AdapterInvalid, match="pickle"):
        fetch_adapters(storage, [f"s3://adapters-a/{prefix}pickle/"], tmp_path / "a")

    s3.upload_file(str(src / CONFIG_NAME), "adapters-a", f"{prefix}broken/{CONFIG_NAME}")
    s3.put_object(
        Bucket="adapters-a", Key=f"{prefix}broken/{WEIGHTS_NAME}", Body=struct.pack("<Q", 10**12)
    )
    with pytest.raises(AdapterInvalid, match="safetensors"):
        fetch_adapters(storage, [f"s3://adapters-a/{prefix}broken/"], tmp_path / "b")


def test_size_limit_is_checked_before_downloading(s3_client, s3, prefix, tmp_path) -> None:
    put_dir(s3, fake_adapter(tmp_path / "src", b"\0" * 4096), "adapters-a", f"{prefix}big/")
    storage = Storage(s3_client, max_job_bytes=1000)
    with pytest.raises(LimitExceeded, match="COREMERGE_MAX_JOB_BYTES"):
        fetch_adapters(storage, [f"s3://adapters-a/{prefix}big/"], tmp_path / "in")
    assert not (tmp_path / "in").exists()


def test_403_is_access_denied_at_once(s3_client, s3, prefix, tmp_path) -> None:
    put_dir(s3, fake_adapter(tmp_path / "src"), "adapters-a", f"{prefix}x/")
    calls = inject(s3_client, 403, "AccessDenied")
    with pytest.raises(AccessDenied):
        fetch_adapters(Storage(s3_client), [f"s3://adapters-a/{prefix}x/"], tmp_path / "in")
    assert len(calls) == 1  # permanent: not retried


def test_transient_errors_are_retried_then_storage_error(s3_client, s3, prefix, tmp_path) -> None:
    put_dir(s3, fake_adapter(tmp_path / "src"), "adapters-a", f"{prefix}x/")
    calls = inject(s3_client, 503, "SlowDown", times=1)  # one failure, then through
    dirs = fetch_adapters(Storage(s3_client), [f"s3://adapters-a/{prefix}x/"], tmp_path / "in")
    assert len(calls) == 1 and (dirs[0] / WEIGHTS_NAME).exists()

    calls = inject(s3_client, 500, "InternalError")  # always failing: retried, then given up
    with pytest.raises(StorageError, match="InternalError"):
        fetch_adapters(Storage(s3_client), [f"s3://adapters-a/{prefix}x/"], tmp_path / "in2")
    assert len(calls) >= 2


def _merged_dir(tmp_path: Path, payload: bytes = b"\0" * 64) -> Path:
    out = fake_adapter(tmp_path / "merged", payload)
    (out / REPORT_NAME).write_text('{"output": {"rank": 4, "modules": 1, "bytes": 64}}')
    return out


def test_publish_writes_the_report_last_and_conditionally(s3_client, s3, prefix, tmp_path):
    order = []
    s3_client.meta.events.register(
        "before-parameter-build.s3.PutObject", lambda params, **kw: order.append(params["Key"])
    )
    storage = Storage(s3_client, transfer_config=make_transfer_config(Settings()))
    uri = f"s3://merged/team-a/{prefix}run/"
    assert published_by(storage, uri) is None
    published = publish(storage, _merged_dir(tmp_path), uri, owner=owner("job-1"))
    assert published.uri == uri and published.report_uri == uri + REPORT_NAME
    # the claim first (twice: the second, refused, proves the store honours If-None-Match),
    # the report last; the claim is gone once the report marks completion
    assert [k.rsplit("/", 1)[1] for k in order] == [
        CLAIM_NAME,
        CLAIM_NAME,
        CONFIG_NAME,
        WEIGHTS_NAME,
        REPORT_NAME,
    ]
    assert s3.list_objects_v2(Bucket="merged", Prefix=f"team-a/{prefix}run/")["KeyCount"] == 3
    head = s3.head_object(Bucket="merged", Key=f"team-a/{prefix}run/{REPORT_NAME}")
    assert head["Metadata"][JOB_ID_META] == "job-1"
    assert published_by(storage, uri) == "job-1"
    assert read_report(storage, uri) == {"output": {"rank": 4, "modules": 1, "bytes": 64}}

    # a re-run of the same job finds its own output and writes nothing; another job ends
    # output_exists and writes nothing either: the published weights are never overwritten
    weights_key = f"team-a/{prefix}run/{WEIGHTS_NAME}"
    etag = s3.head_object(Bucket="merged", Key=weights_key)["ETag"]
    order.clear()
    assert publish(storage, _merged_dir(tmp_path / "again"), uri, owner=owner("job-1")).already
    with pytest.raises(OutputExists, match="which this job did not write"):
        publish(storage, _merged_dir(tmp_path / "other", b"\1" * 64), uri, owner=owner("job-2"))
    assert order == []  # not even a claim
    assert s3.head_object(Bucket="merged", Key=weights_key)["ETag"] == etag
    assert published_by(storage, uri) == "job-1"
    assert s3.list_objects_v2(Bucket="merged", Prefix=f"team-a/{prefix}run/")["KeyCount"] == 3


def test_a_job_publishing_keeps_other_jobs_off_the_output(s3_client, s3, prefix, tmp_path):
    """While a run of job-1 holds the claim (it is uploading, or it died uploading), job-2
    ends output_exists and writes nothing, and a second run of job-1 waits; once the worker
    that saw the first run die removes what it left, the second run publishes."""
    storage = Storage(s3_client)
    uri = f"s3://merged/team-a/{prefix}busy/"
    base = f"team-a/{prefix}busy/"
    # job-1's first run (run-a) died after its claim and a partial upload
    for name, body in ((CLAIM_NAME, b"run-a"), (WEIGHTS_NAME, b"partial")):
        meta = owner("job-1").metadata("run-a", base + name)
        s3.put_object(Bucket="merged", Key=base + name, Body=body, Metadata=meta)
    with pytest.raises(OutputExists):
        publish(storage, _merged_dir(tmp_path / "two", b"\2" * 64), uri, owner=owner("job-2"))
    assert s3.get_object(Bucket="merged", Key=base + WEIGHTS_NAME)["Body"].read() == b"partial"
    assert published_by(storage, uri) is None

    second = storage.publisher(uri, owner=owner("job-1"), run="run-b", claim_wait_s=0.5)
    with pytest.raises(StorageError, match="another run of this job has held the output"):
        second.prepare()  # only the claim holder writes
    second.release()
    assert s3.get_object(Bucket="merged", Key=base + CLAIM_NAME)["Body"].read() == b"run-a"

    storage.remove_leftovers(uri, owner("job-1"), "run-a")  # the dead run's supervisor
    assert output_keys(s3, base) == []
    merged = _merged_dir(tmp_path / "one")
    assert not publish(storage, merged, uri, owner=owner("job-1")).already
    body = s3.get_object(Bucket="merged", Key=base + WEIGHTS_NAME)["Body"].read()
    assert body == (merged / WEIGHTS_NAME).read_bytes()
    assert published_by(storage, uri) == "job-1"
    assert output_keys(s3, base) == sorted([CONFIG_NAME, WEIGHTS_NAME, REPORT_NAME])


def output_keys(s3, base: str) -> list[str]:
    listing = s3.list_objects_v2(Bucket="merged", Prefix=base)
    return sorted(o["Key"].removeprefix(base) for o in listing.get("Contents", []))


def test_failed_publish_leaves_nothing(s3_client, s3, prefix, tmp_path) -> None:
    inject(s3_client, 500, "InternalError", when=lambda r: REPORT_NAME in r.url)
    uri = f"s3://merged/team-a/{prefix}fails/"
    with pytest.raises(StorageError):
        publish(Storage(s3_client), _merged_dir(tmp_path), uri, owner=owner("job-1"))
    assert s3.list_objects_v2(Bucket="merged", Prefix=f"team-a/{prefix}").get("KeyCount") == 0


def test_publish_to_a_file_uri_creates_files_conditionally(tmp_path) -> None:
    target = tmp_path / "out" / "run"
    storage = Storage(None)
    assert published_by(storage, f"file://{target}") is None
    publish(storage, _merged_dir(tmp_path), f"file://{target}", owner=owner("j"))
    files = sorted(p.name for p in target.iterdir() if p.is_file())
    assert files == [CONFIG_NAME, WEIGHTS_NAME, REPORT_NAME]  # the claim is gone
    assert sorted(p.name for p in target.iterdir() if p.is_dir()) == [META_DIR]
    assert [p.name for p in target.parent.iterdir()] == ["run"]  # no staging left
    assert published_by(storage, f"file://{target}") == "j"
    before = {name: (target / name).read_bytes() for name in files}
    with pytest.raises(OutputExists):
        publish(
            storage, _merged_dir(tmp_path / "b", b"\3" * 64), f"file://{target}", owner=owner("k")
        )
    assert {name: (target / name).read_bytes() for name in files} == before


# -- faults (issue 6): transient ones are retried with backoff, permanent ones end at once.
# Injected through botocore's before-send hook, on a client built the way the worker builds
# it: a fault answered there goes through botocore's retry logic like one from the network.


class Faults:
    """Counts every attempt of the requests that ``when`` matches, and answers the first
    ``times`` of them with ``fault`` (an HTTP error, or a raised transport error)."""

    def __init__(self, client, fault, *, when=lambda request: True, times: int = 10**9):
        self.fault, self.when, self.times = fault, when, times
        self.attempts: list[str] = []
        client.meta.events.register("before-send.s3", self)

    def __call__(self, request, **kwargs):
        if not self.when(request):
            return None
        self.attempts.append(f"{request.method} {request.url}")
        if len(self.attempts) > self.times:
            return None
        return self.fault(request)


def http_error(status: int, code: str):
    def answer(request):
        body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
        return AWSResponse(request.url, status, {}, _Raw(body))

    return answer


def connection_reset(request):
    raise ConnectionClosedError(endpoint_url=request.url)


def read_timeout(request):
    raise ReadTimeoutError(endpoint_url=request.url)


@pytest.fixture
def retrying_client(moto_endpoint, s3, monkeypatch):
    """The worker's client with 4 attempts per request (botocore 'standard' mode)."""
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    return make_s3_client(Settings(s3_endpoint_url=moto_endpoint, s3_max_attempts=4))


def weights_download(request) -> bool:
    """The download of the weights (s3transfer's ranged GETs), not the header check's short
    ranged GET before it."""
    if request.method != "GET" or WEIGHTS_NAME not in request.url:
        return False
    rng = request.headers.get("Range", b"")
    end = (rng.decode() if isinstance(rng, bytes) else rng).rpartition("-")[2]
    return not end.isdigit() or int(end) >= 1024


TRANSIENT = {
    "503-slowdown": http_error(503, "SlowDown"),
    "500-internal": http_error(500, "InternalError"),
    "connection-reset": connection_reset,
    "read-timeout": read_timeout,
}


@pytest.mark.parametrize("fault", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_transient_faults_are_retried_and_the_fetch_succeeds(
    fault, retrying_client, s3, prefix, tmp_path
) -> None:
    src = fake_adapter(tmp_path / "src", b"\7" * 256)
    put_dir(s3, src, "adapters-a", f"{prefix}x/")
    faults = Faults(retrying_client, fault, when=weights_download, times=2)
    dirs = fetch_adapters(
        Storage(retrying_client), [f"s3://adapters-a/{prefix}x/"], tmp_path / "in"
    )
    assert len(faults.attempts) == 3  # two faults, then through
    assert len(set(faults.attempts)) == 1  # the same request, retried
    assert (dirs[0] / WEIGHTS_NAME).read_bytes() == (src / WEIGHTS_NAME).read_bytes()


@pytest.mark.parametrize("fault", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_transient_faults_while_publishing_are_retried(
    fault, retrying_client, s3, prefix, tmp_path
) -> None:
    faults = Faults(
        retrying_client, fault, times=1,
        when=lambda r: r.method == "PUT" and WEIGHTS_NAME in r.url,
    )  # fmt: skip
    uri = f"s3://merged/team-a/{prefix}retried/"
    merged = _merged_dir(tmp_path)
    publish(Storage(retrying_client), merged, uri, owner=owner("job-1"))
    assert len(faults.attempts) == 2
    body = s3.get_object(Bucket="merged", Key=f"team-a/{prefix}retried/{WEIGHTS_NAME}")["Body"]
    assert body.read() == (merged / WEIGHTS_NAME).read_bytes()
    assert published_by(Storage(retrying_client), uri) == "job-1"


def test_transient_faults_that_persist_end_as_storage_error(
    retrying_client, s3, prefix, tmp_path
) -> None:
    put_dir(s3, fake_adapter(tmp_path / "src"), "adapters-a", f"{prefix}x/")
    faults = Faults(retrying_client, http_error(503, "SlowDown"), when=weights_download)
    with pytest.raises(StorageError, match="SlowDown"):
        fetch_adapters(Storage(retrying_client), [f"s3://adapters-a/{prefix}x/"], tmp_path / "in")
    assert len(faults.attempts) == 4  # COREMERGE_S3_MAX_ATTEMPTS, then given up


PERMANENT = {
    "no-such-key": (404, "NoSuchKey", AdapterNotFound),
    "no-such-bucket": (404, "NoSuchBucket", AdapterNotFound),
    "access-denied": (403, "AccessDenied", AccessDenied),
}


@pytest.mark.parametrize("status,code,error", PERMANENT.values(), ids=PERMANENT.keys())
def test_permanent_faults_end_the_fetch_at_once(
    status, code, error, retrying_client, s3, prefix, tmp_path
) -> None:
    put_dir(s3, fake_adapter(tmp_path / "src"), "adapters-a", f"{prefix}x/")
    faults = Faults(retrying_client, http_error(status, code))  # every request fails
    with pytest.raises(error, match=code):
        fetch_adapters(Storage(retrying_client), [f"s3://adapters-a/{prefix}x/"], tmp_path / "in")
    assert faults.attempts, "no request was made"
    assert len(faults.attempts) == len(set(faults.attempts)), faults.attempts  # none retried
    assert not (tmp_path / "in").exists()  # refused before downloading


def test_access_denied_while_publishing_ends_at_once_and_leaves_nothing(
    retrying_client, s3, prefix, tmp_path
) -> None:
    faults = Faults(
        retrying_client, http_error(403, "AccessDenied"),
        when=lambda r: r.method == "PUT" and WEIGHTS_NAME in r.url,
    )  # fmt: skip
    with pytest.raises(AccessDenied):
        publish(
            Storage(retrying_client),
            _merged_dir(tmp_path),
            f"s3://merged/team-a/{prefix}denied/",
            owner=owner("job-1"),
        )
    assert len(faults.attempts) == 1
    assert s3.list_objects_v2(Bucket="merged", Prefix=f"team-a/{prefix}denied/")["KeyCount"] == 0


def test_a_claim_left_beside_a_published_report_is_dropped_by_the_same_job(
    s3_client, s3, prefix, tmp_path
) -> None:
    """A run killed between its report and dropping its claim: the re-run that finds the
    report (worker/job.py) drops the claim; another job's call leaves it alone."""
    storage = Storage(s3_client)
    uri = f"s3://merged/team-a/{prefix}late/"
    publish(storage, _merged_dir(tmp_path), uri, owner=owner("job-1"))
    claim = f"team-a/{prefix}late/{CLAIM_NAME}"
    meta = owner("job-1").metadata("run-x", claim)
    s3.put_object(Bucket="merged", Key=claim, Body=b"job-1", Metadata=meta)
    storage.drop_claim(uri, owner("job-2"))
    assert s3.head_object(Bucket="merged", Key=claim)
    storage.drop_claim(uri, owner("job-1"))
    assert s3.list_objects_v2(Bucket="merged", Prefix=claim)["KeyCount"] == 0
    assert published_by(storage, uri) == "job-1"


# -- issue 14: reads pinned to what was measured; stores that ignore conditions are refused


def test_an_input_swapped_after_it_was_sized_is_refused(s3_client, s3, prefix, tmp_path):
    """The size limits are checked on the object a HEAD saw; a download reads only that
    object (If-Match on its ETag), so a swap in between cannot slip a bigger one through."""
    from worker.storage.inputs import check_adapter
    from worker.storage.s3 import S3Store

    put_dir(s3, fake_adapter(tmp_path / "src"), "adapters-a", f"{prefix}x/")
    storage = Storage(s3_client)
    store, key_prefix, loc = storage.locate(f"s3://adapters-a/{prefix}x/")
    assert isinstance(store, S3Store)
    checked = check_adapter(store, loc, key_prefix)
    s3.put_object(Bucket="adapters-a", Key=f"{prefix}x/{WEIGHTS_NAME}", Body=b"\0" * 10_000_000)
    with pytest.raises(StorageError, match="changed while this job was reading it"):
        download_adapter(store, checked, tmp_path / "in")


def test_the_s3_server_honours_conditional_writes_and_the_probe_cleans_up(
    s3_client, s3, prefix
) -> None:
    from worker.storage import S3Store, conditional_writes_honoured

    key = f"team-a/{prefix}.probe"
    assert conditional_writes_honoured(S3Store(s3_client, "merged"), key)
    assert s3.list_objects_v2(Bucket="merged", Prefix=key)["KeyCount"] == 0
    assert not conditional_writes_honoured(MemoryStore(honour_conditions=False), key)


def test_a_report_whose_answer_was_lost_counts_as_published(s3_client, s3, prefix, tmp_path):
    """The report's PUT reaches S3 but its answer is lost (the connection drops after S3
    wrote it): the run finds its own report by its metadata and the job is published, not
    failed with its files deleted."""

    def lose_the_answer(http_response, parsed, model, **kwargs):
        if model.name == "PutObject" and REPORT_NAME in kwargs["context"].get("key", ""):
            raise ConnectionClosedError(endpoint_url="the store")

    def remember_key(params, context, **kwargs):
        context["key"] = params.get("Key", "")

    s3_client.meta.events.register("before-parameter-build.s3.PutObject", remember_key)
    s3_client.meta.events.register("after-call.s3.PutObject", lose_the_answer)
    uri = f"s3://merged/team-a/{prefix}lost/"
    published = publish(Storage(s3_client), _merged_dir(tmp_path), uri, owner=owner("job-1"))
    assert not published.already
    assert published_by(Storage(s3_client), uri) == "job-1"
    assert output_keys(s3, f"team-a/{prefix}lost/") == sorted(
        [CONFIG_NAME, WEIGHTS_NAME, REPORT_NAME]
    )


# -- issue 16: the weights go up while the merge runs (S3UploadSink)


def _no_pending_uploads(s3, bucket: str, prefix: str) -> bool:
    return not s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads")


def test_an_upload_sink_sends_parts_as_they_fill_and_completes_conditionally(
    s3_client, s3, prefix
) -> None:
    from worker.storage.s3 import S3Store, S3UploadSink

    key = f"team-a/{prefix}sink/{WEIGHTS_NAME}"
    data = bytes(range(256)) * (12 * 4096)  # 12 MiB: two full 5 MiB parts and a last one
    sink = S3UploadSink(S3Store(s3_client, "merged"), key, {JOB_ID_META: "j"}, part_size=5 << 20)
    for start in range(0, len(data), 1 << 20):
        sink.write(memoryview(data)[start : start + (1 << 20)])
    sink.close()
    obj = s3.get_object(Bucket="merged", Key=key)
    assert obj["Body"].read() == data and obj["Metadata"][JOB_ID_META] == "j"
    assert obj["ETag"].endswith('-3"')  # a multipart object of three parts

    again = S3UploadSink(S3Store(s3_client, "merged"), key, {}, part_size=5 << 20)
    again.write(data)
    with pytest.raises(AlreadyExists):
        again.close()  # never overwrites: the condition is on the completion
    assert s3.get_object(Bucket="merged", Key=key)["Body"].read() == data
    assert _no_pending_uploads(s3, "merged", key)


def test_an_upload_sink_cuts_parts_across_writes_of_any_size(s3_client, s3, prefix) -> None:
    """Writes that straddle part boundaries (and one larger than a part) fill each part
    exactly: the object is the bytes written, in order."""
    from worker.storage.s3 import S3Store, S3UploadSink

    key = f"team-a/{prefix}sink-odd/{WEIGHTS_NAME}"
    data = bytes(range(251)) * 50_000  # ~12 MiB, a prime-length pattern
    sink = S3UploadSink(S3Store(s3_client, "merged"), key, {}, part_size=5 << 20)
    sizes, start = [777_777, 6 << 20, 1, 123_457], 0
    while start < len(data):
        size = sizes[start % len(sizes)]
        assert sink.write(memoryview(data)[start : start + size]) == len(data[start : start + size])
        start += size
    sink.close()
    obj = s3.get_object(Bucket="merged", Key=key)
    assert obj["Body"].read() == data and obj["ETag"].endswith('-3"')


def test_a_ranged_read_fills_one_buffer_of_the_announced_length(s3_client, s3, prefix) -> None:
    from worker.storage.s3 import BODY_CHUNK, S3Store, _read_body

    key = f"team-a/{prefix}ranged/blob"
    data = bytes(range(256)) * (3 * BODY_CHUNK // 256 + 17)
    s3.put_object(Bucket="merged", Key=key, Body=data)
    store = S3Store(s3_client, "merged")
    got = store.read(key, start=BODY_CHUNK - 5, length=2 * BODY_CHUNK + 11)
    assert bytes(got) == data[BODY_CHUNK - 5 : 3 * BODY_CHUNK + 6]

    class Body:  # a stream that ends early, or runs on, against its Content-Length
        def __init__(self, chunks: list[bytes]) -> None:
            self.chunks = chunks

        def iter_chunks(self, size: int):
            return iter(self.chunks)

    with pytest.raises(StorageError, match="returned 3 of the 4 bytes"):
        _read_body(Body([b"abc"]), 4)
    with pytest.raises(StorageError, match="more than the 4 bytes"):
        _read_body(Body([b"abc", b"de"]), 4)
    assert _read_body(Body([b"ab", b"cd"]), 4) == bytearray(b"abcd")


def test_an_aborted_upload_sink_leaves_nothing(s3_client, s3, prefix) -> None:
    from worker.storage.s3 import S3Store, S3UploadSink

    key = f"team-a/{prefix}sink-abort/{WEIGHTS_NAME}"
    sink = S3UploadSink(S3Store(s3_client, "merged"), key, {}, part_size=5 << 20)
    sink.write(b"\1" * (11 << 20))
    sink.abort()
    assert s3.list_objects_v2(Bucket="merged", Prefix=key)["KeyCount"] == 0
    assert _no_pending_uploads(s3, "merged", key)
    small = S3UploadSink(S3Store(s3_client, "merged"), key, {}, part_size=5 << 20)
    small.write(b"tiny")
    small.close()  # one conditional PUT
    assert s3.get_object(Bucket="merged", Key=key)["Body"].read() == b"tiny"


def test_a_large_file_is_created_by_a_conditional_multipart_upload(
    s3_client, s3, prefix, tmp_path
) -> None:
    from worker.storage.s3 import S3Store

    store = S3Store(s3_client, "merged", multipart_threshold=5 << 20, chunk_size=5 << 20)
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(range(256)) * (11 * 4096))  # 11 MiB: three parts
    key = f"team-a/{prefix}big/{WEIGHTS_NAME}"
    store.create(key, path, {JOB_ID_META: "j"})
    obj = s3.get_object(Bucket="merged", Key=key)
    assert obj["ETag"].endswith('-3"') and obj["Body"].read() == path.read_bytes()
    with pytest.raises(AlreadyExists):
        store.create(key, path, {})
    assert _no_pending_uploads(s3, "merged", key)
