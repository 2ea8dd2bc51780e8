"""Ownership of output objects cannot be forged, and ``file://`` outputs are no way around it
(issue 22 §3): a report planted for a keyed job before it exists is not adopted (the real
API and worker over moto), a claim whose PUT landed but whose answer was lost does not
strand the output, a ``.coremerge-meta`` of anyone else is refused and never followed, and
the allow-list holds for where a ``file://`` location really is."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path

import boto3
import pytest
from botocore.awsrequest import AWSResponse

from jobs.errors import StorageError
from jobs.records import job_id_for
from jobs.settings import Settings
from tests.integration.conftest import AWS_ENV, inproc_settings
from tests.integration.test_storage import _Raw
from tests.integration.test_worker_job import run_one
from tests.storage_helpers import publish
from worker.storage import CLAIM_NAME, JOB_ID_META, REPORT_NAME, RUN_META, Storage, make_s3_client
from worker.storage.local import META_DIR, LocalStore
from worker.storage.ownership import Owner

OWNER = Owner("job-1", "secret-of-job-1")


def test_a_report_planted_for_a_keyed_job_is_not_adopted(stack, tiny: list[str]) -> None:
    """A keyed job's id is sha256(tenant, key), known before the job exists: a report planted
    at its output with that id (and a run) in its metadata ends the job output_exists, and
    the planted report stays as it was; nothing is merged "successfully" without merging."""
    key = f"planted-{uuid.uuid4().hex[:8]}"
    job_id = job_id_for("team-a", key)
    prefix = f"team-a/{key}/"
    body = json.dumps({"output": {"rank": 1, "modules": 1, "bytes": 1}}).encode()
    stack.s3.put_object(
        Bucket="merged", Key=prefix + REPORT_NAME, Body=body,
        Metadata={JOB_ID_META: job_id, RUN_META: "forged"},
    )  # fmt: skip
    spec = {"adapters": [{"uri": tiny[0]}], "output": {"uri": f"s3://merged/{prefix}"}}
    with stack.client() as client:
        submitted = client.submit(spec, idempotency_key=key)
        assert submitted["id"] == job_id
        job = client.wait(job_id, poll_interval=0.05, timeout=120)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "output_exists", job["error"]
    assert "'merge_report.json', which this job did not write" in job["error"]["message"]
    assert stack.keys("merged", prefix) == [prefix + REPORT_NAME]
    assert stack.s3.get_object(Bucket="merged", Key=prefix + REPORT_NAME)["Body"].read() == body


@pytest.fixture
def s3_client(moto_endpoint, s3, monkeypatch):
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    return make_s3_client(Settings(s3_endpoint_url=moto_endpoint, s3_max_attempts=2))


def lose_claim_answers(client, moto_endpoint: str, times: int) -> list[str]:
    """The first ``times`` PUTs of a claim reach the server (sent by another client), and
    their answers are lost: the client sees a 500, as after a reset connection."""
    courier = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    lost: list[str] = []

    def before_send(request, **kwargs):
        if request.method != "PUT" or CLAIM_NAME not in request.url or len(lost) >= times:
            return None
        key = request.url.split("/merged/", 1)[1].split("?")[0]
        meta = {
            k[len("x-amz-meta-") :]: v.decode() if isinstance(v, bytes) else v
            for k, v in request.headers.items()
            if k.lower().startswith("x-amz-meta-")
        }
        with contextlib.suppress(courier.exceptions.ClientError):  # taken: the retry's answer
            courier.put_object(Bucket="merged", Key=key, Body=request.body, Metadata=meta,
                               IfNoneMatch="*")  # fmt: skip
        lost.append(key)
        body = b"<Error><Code>InternalError</Code><Message>lost</Message></Error>"
        return AWSResponse(request.url, 500, {}, _Raw(body))

    client.meta.events.register("before-send.s3", before_send)
    return lost


@pytest.mark.parametrize("lost", [1, 2], ids=["retry-finds-it", "every-answer-lost"])
def test_a_claim_whose_answer_was_lost_does_not_strand_the_output(
    s3_client, s3, moto_endpoint, tmp_path: Path, lost: int
) -> None:
    for name, value in AWS_ENV.items():
        os.environ.setdefault(name, value)
    uri = f"s3://merged/team-a/lost-{uuid.uuid4().hex[:8]}/"
    prefix = uri.removeprefix("s3://merged/")
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "adapter_config.json").write_text("{}")
    (merged / REPORT_NAME).write_text('{"output": {"rank": 4, "modules": 1, "bytes": 64}}')
    answers = lose_claim_answers(s3_client, moto_endpoint, lost)
    published = publish(Storage(s3_client), merged, uri, owner=OWNER)
    assert answers and not published.already
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="merged", Prefix=prefix)["Contents"]]
    assert sorted(keys) == sorted(prefix + n for n in ("adapter_config.json", REPORT_NAME))
    # the next job is not kept off by a stranded claim: it is refused by the adapter there
    with pytest.raises(Exception, match="which this job did not write"):
        publish(Storage(s3_client), merged, uri, owner=Owner("job-2", "s2"))


# -- file:// outputs


@pytest.fixture
def file_settings(stack, moto_endpoint, monkeypatch, tmp_path) -> Settings:
    (tmp_path / "work").mkdir()
    return inproc_settings(
        stack, moto_endpoint, monkeypatch, tmp_path / "work", f"own{uuid.uuid4().hex[:8]}",
        COREMERGE_ALLOW_FILE_URIS="true",
    )  # fmt: skip


def _job(settings: Settings, inputs: list[Path], out: Path) -> dict:
    return run_one(
        settings,
        {"adapters": [{"uri": f"file://{d}"} for d in inputs], "output": {"uri": f"file://{out}"}},
    )


@pytest.mark.parametrize("plant", ["link-to-a-file", "empty-folder", "folder-is-a-link"])
def test_a_planted_coremerge_meta_is_refused_and_never_followed(
    file_settings, peft_adapters: list[Path], tmp_path: Path, plant: str
) -> None:
    victim = tmp_path / "elsewhere" / "precious.txt"
    victim.parent.mkdir()
    victim.write_text("another folder's file")
    out = tmp_path / "out"
    meta = out / META_DIR
    out.mkdir()
    if plant == "link-to-a-file":  # the name the job's config metadata would be written to
        meta.mkdir()
        (meta / "adapter_config.json.json").symlink_to(victim)
    elif plant == "empty-folder":
        meta.mkdir()
    else:
        meta.symlink_to(victim.parent, target_is_directory=True)
    job = _job(file_settings, [peft_adapters[0]], out)
    assert job["status"] == "failed" and job["error"]["code"] == "output_exists", job
    assert META_DIR in job["error"]["message"]
    assert victim.read_text() == "another folder's file"
    assert sorted(p.name for p in out.iterdir()) == [META_DIR]
    assert sorted(p.name for p in victim.parent.iterdir()) == ["precious.txt"]


def test_a_link_planted_after_the_check_is_not_followed(tmp_path: Path) -> None:
    """Between the emptiness check and a write: the metadata name is taken by a link; the
    write is refused and the link's target untouched."""
    victim = tmp_path / "precious.txt"
    victim.write_text("keep")
    out = tmp_path / "out"
    (out / META_DIR).mkdir(parents=True)
    (out / META_DIR / "weights.bin.json").symlink_to(victim)
    key = str(out / "weights.bin")[1:]
    with pytest.raises(StorageError, match=r"metadata name in \.coremerge-meta is taken"):
        LocalStore().create(key, b"data", OWNER.metadata("r", key))
    assert victim.read_text() == "keep" and not (out / "weights.bin").exists()
    assert LocalStore().head(str(out / META_DIR / "weights.bin.json")[1:]).metadata == {}


def test_the_job_s_own_meta_folder_is_its_own(
    file_settings, peft_adapters: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    job = _job(file_settings, [peft_adapters[0]], out)
    assert job["status"] == "succeeded", job["error"]
    assert sorted(p.name for p in (out / META_DIR).iterdir()) == [
        "README.md.json", "adapter_config.json.json", "adapter_model.safetensors.json",
        "merge_report.json.json",
    ]  # fmt: skip
    # another job refused, the published output intact
    job = _job(file_settings, [peft_adapters[1]], out)
    assert job["error"]["code"] == "output_exists"


def test_the_allow_list_holds_for_where_a_file_location_really_is(
    file_settings, peft_adapters: list[Path], tmp_path: Path, monkeypatch
) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps({"tenants": {"open": {"keys_sha256": ["0" * 64],
                                                        "allow": [f"file://{allowed}/"]}}}))  # fmt: skip
    monkeypatch.setenv("COREMERGE_TENANTS_FILE", str(tenants))
    settings = Settings()
    good = allowed / "good"
    good.mkdir()
    for f in peft_adapters[0].iterdir():
        (good / f.name).write_bytes(f.read_bytes())
    assert _job(settings, [good], allowed / "out-ok")["status"] == "succeeded"

    secret = outside / "secret"  # an adapter the tenant may not read
    secret.mkdir()
    for f in peft_adapters[1].iterdir():
        (secret / f.name).write_bytes(f.read_bytes())
    linked_file = allowed / "linked-file"
    linked_file.mkdir()
    (linked_file / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
    (linked_file / "adapter_model.safetensors").symlink_to(secret / "adapter_model.safetensors")
    (allowed / "linked-folder").symlink_to(secret, target_is_directory=True)
    (allowed / "out-link").symlink_to(outside, target_is_directory=True)
    cases = [
        ([linked_file], allowed / "o1"),
        ([allowed / "linked-folder"], allowed / "o2"),
        ([good], allowed / "out-link" / "o3"),
    ]
    for inputs, out in cases:
        job = _job(settings, inputs, out)
        assert job["status"] == "failed" and job["error"]["code"] == "access_denied", job
        assert "resolves (through a symbolic link) to a location" in job["error"]["message"]
        assert str(outside) not in job["error"]["message"]
    assert list(outside.iterdir()) == [secret]
