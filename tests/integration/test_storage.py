"""worker.storage against moto's S3 server: fetching adapters, publishing outputs, error codes.
Faults are injected through botocore's ``before-send`` hook, so they pass through its retries."""

from __future__ import annotations

import json
import struct
import uuid
from pathlib import Path

import pytest
from botocore.awsrequest import AWSResponse

from service.config import Settings
from tests.integration.conftest import AWS_ENV
from worker.errors import AccessDenied, AdapterInvalid, AdapterNotFound, StorageError
from worker.storage import (
    CONFIG_NAME,
    JOB_ID_META,
    REPORT_NAME,
    WEIGHTS_NAME,
    Storage,
    make_s3_client,
    make_transfer_config,
)


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
    dirs = storage.fetch_adapters(
        [f"s3://adapters-a/{prefix}a0/", f"s3://adapters-a/{prefix}a1"], tmp_path / "in"
    )
    assert dirs == [tmp_path / "in" / "0", tmp_path / "in" / "1"]
    for i, d in enumerate(dirs):
        assert (d / WEIGHTS_NAME).read_bytes() == (tmp_path / f"src{i}" / WEIGHTS_NAME).read_bytes()
        assert sorted(p.name for p in d.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_fetch_file_uris_in_place(tmp_path) -> None:
    src = fake_adapter(tmp_path / "local")
    assert Storage(None).fetch_adapters([f"file://{src}"], tmp_path / "in") == [src]
    with pytest.raises(AdapterNotFound):
        Storage(None).fetch_adapters([f"file://{tmp_path}/missing/"], tmp_path / "in2")


def test_missing_adapter_key_or_bucket_is_adapter_not_found(s3_client, prefix, tmp_path) -> None:
    storage = Storage(s3_client)
    with pytest.raises(AdapterNotFound, match=r"adapter_config\.json"):
        storage.fetch_adapters([f"s3://adapters-a/{prefix}nothing/"], tmp_path / "a")
    with pytest.raises(AdapterNotFound):
        storage.fetch_adapters(["s3://no-such-bucket-here/x/"], tmp_path / "b")


def test_pickle_weights_and_broken_safetensors_are_adapter_invalid(s3_client, s3, prefix, tmp_path):
    src = fake_adapter(tmp_path / "src")
    s3.upload_file(str(src / CONFIG_NAME), "adapters-a", f"{prefix}pickle/{CONFIG_NAME}")
    s3.put_object(Bucket="adapters-a", Key=f"{prefix}pickle/adapter_model.bin", Body=b"\x80\x04")
    storage = Storage(s3_client)
    with pytest.raises(AdapterInvalid, match="pickle"):
        storage.fetch_adapters([f"s3://adapters-a/{prefix}pickle/"], tmp_path / "a")

    s3.upload_file(str(src / CONFIG_NAME), "adapters-a", f"{prefix}broken/{CONFIG_NAME}")
    s3.put_object(
        Bucket="adapters-a", Key=f"{prefix}broken/{WEIGHTS_NAME}", Body=struct.pack("<Q", 10**12)
    )
    with pytest.raises(AdapterInvalid, match="safetensors"):
        storage.fetch_adapters([f"s3://adapters-a/{prefix}broken/"], tmp_path / "b")


def test_size_limit_is_checked_before_downloading(s3_client, s3, prefix, tmp_path) -> None:
    put_dir(s3, fake_adapter(tmp_path / "src", b"\0" * 4096), "adapters-a", f"{prefix}big/")
    storage = Storage(s3_client, max_job_bytes=1000)
    with pytest.raises(AdapterInvalid, match="COREMERGE_MAX_JOB_BYTES"):
        storage.fetch_adapters([f"s3://adapters-a/{prefix}big/"], tmp_path / "in")
    assert not (tmp_path / "in").exists()


def test_403_is_access_denied_at_once(s3_client, s3, prefix, tmp_path) -> None:
    put_dir(s3, fake_adapter(tmp_path / "src"), "adapters-a", f"{prefix}x/")
    calls = inject(s3_client, 403, "AccessDenied")
    with pytest.raises(AccessDenied):
        Storage(s3_client).fetch_adapters([f"s3://adapters-a/{prefix}x/"], tmp_path / "in")
    assert len(calls) == 1  # permanent: not retried


def test_transient_errors_are_retried_then_storage_error(s3_client, s3, prefix, tmp_path) -> None:
    put_dir(s3, fake_adapter(tmp_path / "src"), "adapters-a", f"{prefix}x/")
    calls = inject(s3_client, 503, "SlowDown", times=1)  # one failure, then through
    dirs = Storage(s3_client).fetch_adapters([f"s3://adapters-a/{prefix}x/"], tmp_path / "in")
    assert len(calls) == 1 and (dirs[0] / WEIGHTS_NAME).exists()

    calls = inject(s3_client, 500, "InternalError")  # always failing: retried, then given up
    with pytest.raises(StorageError, match="InternalError"):
        Storage(s3_client).fetch_adapters([f"s3://adapters-a/{prefix}x/"], tmp_path / "in2")
    assert len(calls) >= 2


def _merged_dir(tmp_path: Path) -> Path:
    out = fake_adapter(tmp_path / "merged")
    (out / REPORT_NAME).write_text('{"output": {"rank": 4}}')
    return out


def test_publish_writes_the_report_last_and_conditionally(s3_client, s3, prefix, tmp_path):
    order = []
    s3_client.meta.events.register(
        "before-parameter-build.s3.PutObject", lambda params, **kw: order.append(params["Key"])
    )
    storage = Storage(s3_client, transfer_config=make_transfer_config(Settings()))
    uri = f"s3://merged/team-a/{prefix}run/"
    assert storage.published_by(uri) is None
    published = storage.publish(_merged_dir(tmp_path), uri, job_id="job-1")
    assert published.uri == uri and published.report_uri == uri + REPORT_NAME
    assert [k.rsplit("/", 1)[1] for k in order] == [CONFIG_NAME, WEIGHTS_NAME, REPORT_NAME]
    head = s3.head_object(Bucket="merged", Key=f"team-a/{prefix}run/{REPORT_NAME}")
    assert head["Metadata"][JOB_ID_META] == "job-1"
    assert storage.published_by(uri) == "job-1"
    assert storage.read_report(uri) == {"output": {"rank": 4}}

    # a re-run of the same job finds its own output; another job may not overwrite it
    assert storage.publish(_merged_dir(tmp_path / "again"), uri, job_id="job-1").already
    with pytest.raises(StorageError, match="another job"):
        storage.publish(_merged_dir(tmp_path / "other"), uri, job_id="job-2")
    assert storage.published_by(uri) == "job-1"


def test_failed_publish_leaves_nothing(s3_client, s3, prefix, tmp_path) -> None:
    inject(s3_client, 500, "InternalError", when=lambda r: REPORT_NAME in r.url)
    uri = f"s3://merged/team-a/{prefix}fails/"
    with pytest.raises(StorageError):
        Storage(s3_client).publish(_merged_dir(tmp_path), uri, job_id="job-1")
    assert s3.list_objects_v2(Bucket="merged", Prefix=f"team-a/{prefix}").get("KeyCount") == 0


def test_publish_to_file_uri_is_atomic(tmp_path) -> None:
    target = tmp_path / "out" / "run"
    storage = Storage(None)
    assert storage.published_by(f"file://{target}") is None
    storage.publish(_merged_dir(tmp_path), f"file://{target}", job_id="j")
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, REPORT_NAME]
    assert [p.name for p in target.parent.iterdir()] == ["run"]  # no staging left
    assert storage.published_by(f"file://{target}") == ""
    with pytest.raises(StorageError, match="not empty"):
        storage.publish(_merged_dir(tmp_path / "b"), f"file://{target}", job_id="j")
