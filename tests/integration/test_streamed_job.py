"""Served jobs whose S3 inputs are read as the merge goes (``worker.job``): the worker's disk
never holds an input's weights, the output is the local merge's bit for bit, and an input
replaced mid-job ends the job ``storage_error`` with nothing published."""

from __future__ import annotations

import contextlib
import threading
import time
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
from tests.integration.conftest import Stack, inproc_settings
from tests.integration.test_merges import download, fresh_output, wait_done
from tests.integration.test_streamed import upload
from tests.worker.synthetic import lora_adapter
from worker.merge.runner import run_merge
from worker.storage import CONFIG_NAME, WEIGHTS_NAME
from worker.workdir import ATTEMPT_PREFIX


class DiskWatch:
    """Polls the worker's attempt folders every few milliseconds while a job runs: the
    largest total of bytes they held at once, and every file name seen."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir, self.peak, self.names = work_dir, 0, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _files(self) -> list[tuple[str, int]]:
        """(name, size) of every file in the attempt folders now; folders removed while they
        are walked count for what was seen of them."""
        seen = []
        for attempt in self.work_dir.glob(f"{ATTEMPT_PREFIX}*"):
            with contextlib.suppress(OSError):
                for path in attempt.rglob("*"):
                    with contextlib.suppress(OSError):
                        if path.is_file():
                            seen.append((path.name, path.stat().st_size))
        return seen

    def _run(self) -> None:
        while not self._stop.is_set():
            files = self._files()
            self.names.update(name for name, _ in files)
            self.peak = max(self.peak, sum(size for _, size in files))
            time.sleep(0.005)

    def __enter__(self) -> DiskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_served_job_never_copies_its_s3_inputs_to_disk(
    stack: Stack, big: list[str], tmp_path: Path
) -> None:
    """Three 1 MiB adapters merged by the stack's worker (a separate process): its attempt
    folder holds the configs and the small output files, never a weights file; the output
    equals the local merge's bit for bit."""
    spec = {
        "adapters": [{"uri": u} for u in big],
        "method": "ties",
        "space": "full",  # a few seconds of merging: time to watch the disk
        "output": {"uri": fresh_output(), "rank": 8},
    }
    inputs = sum(
        stack.s3.head_object(Bucket="adapters-a", Key=u.removeprefix("s3://adapters-a/") + name)[
            "ContentLength"
        ]
        for u in big
        for name in (CONFIG_NAME, WEIGHTS_NAME)
    )
    with DiskWatch(Path(stack.env["COREMERGE_WORK_DIR"])) as disk, stack.client() as client:
        job = wait_done(stack, client, client.submit(spec)["id"])
    assert job["status"] == "succeeded", job
    assert CONFIG_NAME in disk.names  # the watch saw the attempt's folder
    assert WEIGHTS_NAME not in disk.names
    assert disk.peak < 0.05 * inputs, (disk.peak, inputs)

    served = download(stack.s3, job["result"]["uri"], tmp_path / "served")
    local_dirs = [download_inputs(stack, u, tmp_path / f"in-{i}") for i, u in enumerate(big)]
    local = run_merge(
        MergeSpec.model_validate({**spec, "output": {**spec["output"], "uri": "/x"}}),
        local_dirs,
        tmp_path / "local",
        device="cpu",
    )
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (served / name).read_bytes() == (local.out_dir / name).read_bytes(), name


def download_inputs(stack: Stack, uri: str, dest: Path) -> Path:
    dest.mkdir(parents=True)
    prefix = uri.removeprefix("s3://adapters-a/")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        stack.s3.download_file("adapters-a", prefix + name, str(dest / name))
    return dest


@pytest.fixture
def inproc(stack: Stack, moto_endpoint: str, monkeypatch, tmp_path: Path) -> Settings:
    """Settings of an in-process deployment (its own prefix and queue) with a 1 MiB
    look-ahead, so that an input of several MiB is read over the whole merge."""
    return inproc_settings(
        stack, moto_endpoint, monkeypatch, tmp_path, f"streamjob{uuid.uuid4().hex[:8]}",
        COREMERGE_JOB_TIMEOUT="300", COREMERGE_S3_READ_AHEAD_BYTES=str(1 << 20),
    )  # fmt: skip


def test_an_input_replaced_mid_job_fails_it_with_storage_error_and_publishes_nothing(
    inproc: Settings, stack: Stack, tmp_path: Path
) -> None:
    dirs = [
        lora_adapter(tmp_path / f"a{i}", r=16, m=512, n=512, modules=48, seed=i) for i in range(2)
    ]
    uris = [upload(stack.s3, d) for d in dirs]
    output = fresh_output()
    request = MergeSpec.model_validate(
        {"adapters": [{"uri": u} for u in uris], "method": "ties", "space": "full",
         "output": {"uri": output, "rank": 8}}
    ).model_dump(mode="json")  # fmt: skip
    redis = Redis.from_url(inproc.redis_url)
    store = JobStore(redis, key_prefix=inproc.key_prefix)
    job_id = job_id_for(OPEN_TENANT.name, None)
    store.create(job_id, OPEN_TENANT.name, request)
    queue = make_queue(redis, inproc)
    enqueue_merge(queue, job_id, inproc)
    store.mark_accepted(job_id)
    key = uris[1].removeprefix("s3://adapters-a/") + WEIGHTS_NAME
    replaced = threading.Event()

    def replace_when_merging() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            record = store.get(job_id)
            if record and (record.progress or {}).get("modules_done", 0) >= 1:
                stack.s3.put_object(Bucket="adapters-a", Key=key, Body=b"\0" * 4096)
                replaced.set()
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=replace_when_merging, daemon=True)
    watcher.start()
    SimpleWorker([queue], connection=redis, serializer=JSONSerializer).work(burst=True)
    watcher.join()
    record = store.get(job_id)
    assert replaced.is_set()
    assert record.status == "failed", record
    assert record.error["code"] == "storage_error", record.error
    assert "changed while this job was reading it" in record.error["message"]
    assert stack.keys("merged", output.removeprefix("s3://merged/")) == []
    assert list(tmp_path.glob(f"{ATTEMPT_PREFIX}*")) == []  # the attempt's folder is gone
