"""The job function in this process (RQ's ``SimpleWorker``, burst mode): the timeout path and
``file://`` locations, on a real Redis, without the API or the worker processes."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from redis import Redis
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from jobs.queue import enqueue_merge, make_queue
from jobs.records import JobStore, job_id_for
from jobs.settings import Settings
from jobs.spec import MergeSpec
from jobs.tenants import OPEN_TENANT
from service.api.models import job_view
from tests.integration.conftest import inproc_settings


@pytest.fixture
def settings(stack, moto_endpoint, monkeypatch, tmp_path) -> Settings:
    """Settings of a deployment of its own (prefix, queue) in the stack's Redis database,
    set in the environment too: the job function reads its settings from there."""
    return inproc_settings(
        stack, moto_endpoint, monkeypatch, tmp_path, f"inproc{uuid.uuid4().hex[:8]}",
        COREMERGE_ALLOW_FILE_URIS="true", COREMERGE_JOB_TIMEOUT="1",
    )  # fmt: skip


def run_one(settings: Settings, spec: dict) -> dict:
    """Create, enqueue and run one job in this process; return its record as the API shows it."""
    redis = Redis.from_url(settings.redis_url)
    store = JobStore(redis, key_prefix=settings.key_prefix)
    request = MergeSpec.model_validate(spec).model_dump(mode="json")
    job_id = job_id_for(OPEN_TENANT.name, None)
    store.create(job_id, OPEN_TENANT.name, request)
    queue = make_queue(redis, settings)
    enqueue_merge(queue, job_id, settings)
    store.mark_accepted(job_id)
    SimpleWorker([queue], connection=redis, serializer=JSONSerializer).work(burst=True)
    return job_view(store.get(job_id))


def test_a_merge_over_its_timeout_fails_with_timeout(settings, big, stack) -> None:
    output = f"s3://merged/team-a/{uuid.uuid4().hex[:8]}/"
    job = run_one(settings, {"adapters": [{"uri": u} for u in big], "method": "ties",
                             "space": "full", "output": {"uri": output}})  # fmt: skip
    assert job["status"] == "failed"
    assert job["error"]["code"] == "timeout"
    assert "COREMERGE_JOB_TIMEOUT" in job["error"]["message"]
    assert stack.keys("merged", output.removeprefix("s3://merged/")) == []


def test_file_uris_in_and_out(
    settings, peft_adapters: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fixture's 1 s timeout is for the timeout test; on a busy machine this merge can
    # take longer than that.
    monkeypatch.setenv("COREMERGE_JOB_TIMEOUT", "300")
    settings = Settings()
    out = tmp_path / "merged" / "run"
    job = run_one(settings, {"adapters": [{"uri": f"file://{d}"} for d in peft_adapters],
                             "method": "ta", "output": {"uri": f"file://{out}"}})  # fmt: skip
    assert job["status"] == "succeeded", job
    assert job["result"]["uri"] == f"file://{out}/"
    report = json.loads((out / "merge_report.json").read_text())
    assert report["output"]["rank"] == job["result"]["rank"]
    # a second job may not publish over it: it ends output_exists before reading an input
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    job = run_one(settings, {"adapters": [{"uri": f"file://{peft_adapters[0]}"}],
                             "output": {"uri": f"file://{out}"}})  # fmt: skip
    assert job["status"] == "failed" and job["error"]["code"] == "output_exists", job
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_rank_auto_through_the_queue(
    settings, peft_adapters: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``output.rank: "auto"`` through the record and the worker: the job's rank is the one
    the report says was chosen for the target."""
    monkeypatch.setenv("COREMERGE_JOB_TIMEOUT", "300")
    out = tmp_path / "auto"
    job = run_one(Settings(), {"adapters": [{"uri": f"file://{d}"} for d in peft_adapters],
                               "output": {"uri": f"file://{out}", "rank": "auto",
                                          "target": "lorax", "energy": 0.5}})  # fmt: skip
    assert job["status"] == "succeeded", job
    auto = json.loads((out / "merge_report.json").read_text())["output"]["rank_auto"]
    assert auto["target"] == "lorax" and auto["rank"] in (8, 16, 32, 64)
    assert job["result"]["rank"] == min(auto["rank"], job["result"]["rank"])


def test_worker_rechecks_access(settings, monkeypatch, tmp_path, peft_adapters) -> None:
    """A job whose location the (worker's) tenants file no longer allows is refused."""
    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps({"tenants": {"x": {"keys_sha256": ["0" * 64], "allow": []}}}))
    monkeypatch.setenv("COREMERGE_TENANTS_FILE", str(tenants))
    job = run_one(settings, {"adapters": [{"uri": f"file://{peft_adapters[0]}"}],
                             "output": {"uri": f"file://{tmp_path}/out"}})  # fmt: skip
    assert job["status"] == "failed" and job["error"]["code"] == "access_denied"


def test_a_worker_without_file_uris_says_so(settings, monkeypatch, tmp_path, peft_adapters) -> None:
    """The API allowed file:// but this worker does not: the error names the worker and the
    variable it lacks (the quickstart used to set it for the API only)."""
    monkeypatch.setenv("COREMERGE_ALLOW_FILE_URIS", "false")
    job = run_one(settings, {"adapters": [{"uri": f"file://{peft_adapters[0]}"}],
                             "output": {"uri": f"file://{tmp_path}/out"}})  # fmt: skip
    assert job["status"] == "failed" and job["error"]["code"] == "access_denied"
    assert "disabled in the worker (coremerge worker)" in job["error"]["message"]
    assert "COREMERGE_ALLOW_FILE_URIS=true" in job["error"]["message"]


@pytest.mark.parametrize(
    ("env", "changes", "said"),
    [
        ({"COREMERGE_MAX_ADAPTERS": "2"}, {}, "COREMERGE_MAX_ADAPTERS"),
        ({"COREMERGE_MAX_OUTPUT_RANK": "4"}, {"rank": 8}, "COREMERGE_MAX_OUTPUT_RANK"),
    ],
)
def test_the_worker_holds_a_record_to_its_own_limits(
    settings, monkeypatch, tmp_path, peft_adapters, env, changes, said
) -> None:
    """A record the API would have refused (written by an older or another API) ends
    limit_exceeded before any input is read."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    job = run_one(settings, {"adapters": [{"uri": f"file://{d}"} for d in peft_adapters],
                             "output": {"uri": f"file://{tmp_path}/out", **changes}})  # fmt: skip
    assert job["status"] == "failed" and job["error"]["code"] == "limit_exceeded", job
    assert said in job["error"]["message"]
    assert job["progress"]["modules_total"] == 0 and not (tmp_path / "out").exists()


def test_a_worker_whose_tenants_file_breaks_refuses_with_a_fixed_message(
    settings, monkeypatch, tmp_path, peft_adapters
) -> None:
    tenants = tmp_path / "tenants.json"
    tenants.write_bytes(b'{"tenants": {"x\xff": {}}}')
    monkeypatch.setenv("COREMERGE_TENANTS_FILE", str(tenants))
    job = run_one(settings, {"adapters": [{"uri": f"file://{peft_adapters[0]}"}],
                             "output": {"uri": f"file://{tmp_path}/out"}})  # fmt: skip
    assert job["status"] == "failed" and job["error"]["code"] == "access_denied"
    assert "cannot read its tenants file" in job["error"]["message"]
    assert str(tmp_path) not in job["error"]["message"]
