"""A job that runs out of time inside one long native call ends ``timeout``, once (issue 22 §4).

RQ's job timeout is a signal handled between Python bytecodes: a merge inside a long SVD
does not see it until the SVD returns, and RQ's own last resort (killing the work horse 60 s
after the timeout) used to look like a dead worker, so the job was retried and ran out of
time again. Here a full-space Iso-C merge of 6144 × 6144 modules (an SVD of minutes on a few
cores) runs under an 8 s timeout in a real worker: the horse ends itself ``STUCK_GRACE_S``
after the timeout and the job ends ``timeout`` on its first attempt, with nothing at its
output, and the worker takes the next job.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from redis import Redis

from jobs.queue import enqueue_merge, make_queue
from jobs.records import TERMINAL, JobStore, job_id_for
from jobs.settings import Settings
from jobs.spec import MergeSpec
from tests.integration.conftest import Stack, make_llama_adapters, upload
from tests.processes import Workers, wait_until
from worker.job import STUCK_GRACE_S

#: Long enough to download and plan (and reach the SVD), far shorter than the SVD.
TIMEOUT_S = 8


@pytest.fixture(scope="module")
def wide(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two rank-4 adapters (800 KiB each) on four 6144 × 6144 modules."""
    dirs = make_llama_adapters(
        tmp_path_factory.mktemp("wide"), 2, hidden_size=6144, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
    )  # fmt: skip
    return [upload(stack.s3, d, "adapters-a", f"wide/task-{i}/") for i, d in enumerate(dirs)]


def test_a_merge_stuck_in_a_native_call_ends_timeout_without_a_retry(
    stack: Stack, wide: list[str], tiny: list[str], tmp_path: Path
) -> None:
    name = f"timeout{uuid.uuid4().hex[:8]}"
    settings = Settings(
        redis_url=stack.redis_url, queue=name, key_prefix=name, job_timeout=TIMEOUT_S,
        job_retries=1,
    )  # fmt: skip
    store = JobStore(Redis.from_url(stack.redis_url), key_prefix=name)
    workers = Workers({**stack.env, "COREMERGE_QUEUE": name, "COREMERGE_KEY_PREFIX": name},
                      tmp_path, 1)  # fmt: skip

    def submit(spec: dict) -> str:
        job_id = job_id_for("team-a", None)
        store.create(job_id, "team-a", MergeSpec.model_validate(spec).model_dump(mode="json"))
        enqueue_merge(make_queue(store.redis, settings), job_id, settings, tenant="team-a")
        store.mark_accepted(job_id)
        return job_id

    output = f"s3://merged/team-a/{name}/"
    try:
        workers.start(0)
        # output.rank: within COREMERGE_MAX_OUTPUT_RANK; the full-space SVD is the same
        job_id = submit({"adapters": [{"uri": u} for u in wide], "method": "iso_c",
                         "space": "full", "output": {"uri": output, "rank": 8}})  # fmt: skip
        started = time.monotonic()
        wait_until(lambda: store.get(job_id).status in TERMINAL, "the job ends", 120)
        took = time.monotonic() - started
        record = store.get(job_id)
        assert record.status == "failed", (record, workers.tail())
        assert record.error["code"] == "timeout"
        assert "inside one long computation" in record.error["message"], record.error
        assert record.attempts == 1  # not retried
        assert took < TIMEOUT_S + STUCK_GRACE_S + 30, took  # not RQ's timeout + 60 s, twice
        assert stack.keys("merged", output.removeprefix("s3://merged/")) == []
        assert make_queue(store.redis, settings).job_ids == []
        # the worker lives on and runs the next job
        after = submit({"adapters": [{"uri": u} for u in tiny], "method": "ta",
                        "output": {"uri": f"{output}next/"}})  # fmt: skip
        wait_until(lambda: store.get(after).status in TERMINAL, "the next job", 60)
        assert store.get(after).status == "succeeded", workers.tail()
        print(f"\nstuck merge ended timeout after {took:.1f} s (timeout {TIMEOUT_S} s)")
    finally:
        workers.stop_all()
