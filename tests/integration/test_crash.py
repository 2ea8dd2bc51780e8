"""Crash safety (issue 6): a worker killed with ``kill -9`` mid-merge (parent and work horse,
as a node preemption would) loses no job: RQ finds it abandoned, another worker runs it again,
it succeeds once and its output is whole; killed on every attempt, it ends ``failed`` with
``internal``, never stuck in ``running``, and leaves no claim on its output. And the run token that keeps a replaced run (one
given up for dead that was not) from touching the record of the run that replaced it."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis import Redis

from jobs.queue import MAINTENANCE_LOCK_S, enqueue_merge, make_queue
from jobs.records import TERMINAL, JobRecord, JobStore, job_id_for
from jobs.settings import Settings
from jobs.spec import MergeSpec
from tests.integration.conftest import Stack
from tests.processes import Workers, wait_until
from worker.adapters.format import MODEL_CARD_NAME
from worker.storage import CLAIM_NAME, CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME, Owner

#: COREMERGE_WORKER_TTL for these workers: the smallest allowed. A dead worker's job is
#: abandoned at most this long (plus a heartbeat interval, ttl/4) after its last heartbeat.
WORKER_TTL = 15


@dataclass
class Deployment:
    settings: Settings
    store: JobStore
    workers: Workers
    stack: Stack

    def submit(self, spec: dict) -> str:
        """Create and queue a job as the API does (team-a's), with this deployment's settings."""
        request = MergeSpec.model_validate(spec).model_dump(mode="json")
        job_id = job_id_for("team-a", None)
        self.store.create(job_id, "team-a", request)
        enqueue_merge(make_queue(self.store.redis, self.settings), job_id, self.settings)
        self.store.mark_accepted(job_id)
        return job_id

    def record(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        assert record is not None
        return record

    def wait_merging(self, job_id: str, attempt: int, timeout: float = 90) -> int:
        """Wait until attempt ``attempt`` of the job is merging; return the worker running it."""

        def merging():
            r = self.record(job_id)
            p = r.progress or {}
            if (r.status, r.attempts, p.get("stage")) != ("running", attempt, "merge"):
                return None
            if not p.get("modules_done"):
                return None
            return [i for i in range(len(self.workers.procs)) if self.workers.horse(i)] or None

        busy = wait_until(merging, f"attempt {attempt} merging", timeout)
        return busy[0]

    def wait_done(self, job_id: str, timeout: float = 120) -> JobRecord:
        try:
            return wait_until(
                lambda: (r := self.record(job_id)).status in TERMINAL and r, "job", timeout
            )
        except TimeoutError:
            raise AssertionError(
                f"{self.record(job_id)} did not finish:\n{self.workers.tail()}"
            ) from None


@pytest.fixture(scope="module")
def crash(stack: Stack, tmp_path_factory: pytest.TempPathFactory):
    """A deployment of its own (queue, key prefix) in the stack's Redis and S3, served by two
    workers that the tests kill and restart: a dead worker is noticed after WORKER_TTL s,
    maintenance (where abandoned jobs are found) runs every second, one retry."""
    name = f"crash{uuid.uuid4().hex[:8]}"
    env = {
        **stack.env,
        "COREMERGE_QUEUE": name,
        "COREMERGE_KEY_PREFIX": name,
        "COREMERGE_WORKER_TTL": str(WORKER_TTL),
        "COREMERGE_MAINTENANCE_INTERVAL": "1",
        "COREMERGE_JOB_RETRIES": "1",
    }
    settings = Settings(
        redis_url=stack.redis_url, queue=name, key_prefix=name, job_retries=1, job_timeout=300
    )
    store = JobStore(Redis.from_url(stack.redis_url), key_prefix=name)
    workers = Workers(env, tmp_path_factory.mktemp("crash"), 2)
    workers.start_all()
    try:
        yield Deployment(settings, store, workers, stack)
    finally:
        workers.stop_all()


def output_keys(stack: Stack, output: str) -> list[str]:
    prefix = output.removeprefix("s3://merged/")
    return [k.removeprefix(prefix) for k in stack.keys("merged", prefix)]


def big_spec(big: list[str]) -> tuple[dict, str]:
    output = f"s3://merged/team-a/crash-{uuid.uuid4().hex[:12]}/"
    spec = {"adapters": [{"uri": u} for u in big], "method": "ties", "space": "full",
            "output": {"uri": output}}  # fmt: skip
    return spec, output


def test_a_killed_worker_s_job_runs_again_elsewhere_and_succeeds_once(
    crash: Deployment, big: list[str], tmp_path: Path
) -> None:
    spec, output = big_spec(big)
    job_id = crash.submit(spec)
    victim = crash.wait_merging(job_id, attempt=1)
    assert crash.workers.kill(victim)  # parent and work horse, kill -9
    killed_at = time.monotonic()

    # The survivor's maintenance finds the job abandoned, RQ's Retry queues it again, and the
    # record goes back to queued, then running (attempt 2) on the surviving worker.
    survivor = crash.wait_merging(job_id, attempt=2, timeout=WORKER_TTL + 60)
    recovered_s = time.monotonic() - killed_at
    print(f"\nkilled mid-merge; attempt 2 merging {recovered_s:.1f} s later")
    assert survivor != victim
    crash.workers.start(victim, wait=False)  # back for the next test
    job = crash.wait_done(job_id)

    assert job.status == "succeeded", (job, crash.workers.tail())
    assert job.attempts == 2
    raw = crash.store.redis.hgetall(crash.store.job_key(job_id))
    assert b"its worker died" in raw[b"requeued_because"]
    stats = crash.store.stats()
    assert stats["entered:succeeded"] == 1 and stats["requeued"] >= 1  # succeeded once
    assert recovered_s < WORKER_TTL + 30, recovered_s

    # A whole adapter from one run: the three files, no claim left, and the report's digest
    # is the weights' digest.
    assert sorted(output_keys(crash.stack, output)) == sorted(
        [CONFIG_NAME, MODEL_CARD_NAME, REPORT_NAME, WEIGHTS_NAME]
    )
    bucket, key = "merged", output.removeprefix("s3://merged/")
    weights = crash.stack.s3.get_object(Bucket=bucket, Key=key + WEIGHTS_NAME)["Body"].read()
    report = json.loads(
        crash.stack.s3.get_object(Bucket=bucket, Key=key + REPORT_NAME)["Body"].read()
    )
    assert report["output"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert job.result is not None and job.result["uri"] == output


def test_a_job_killed_on_every_attempt_ends_failed_not_running(
    crash: Deployment, big: list[str]
) -> None:
    for i in range(2):
        crash.workers.wait_ready(i)
    spec, output = big_spec(big)
    job_id = crash.submit(spec)
    for attempt in (1, 2):  # COREMERGE_JOB_RETRIES=1: two attempts
        victim = crash.wait_merging(job_id, attempt=attempt, timeout=WORKER_TTL + 60)
        if attempt == 2:
            # What a run killed while publishing leaves: its claim on the output, tagged as
            # the run tags it. With no retry to come back for it, the worker that records
            # the failure releases it.
            record = crash.record(job_id)
            key = output.removeprefix("s3://merged/") + CLAIM_NAME
            owner = Owner(job_id, record.output_secret)
            crash.stack.s3.put_object(
                Bucket="merged", Key=key, Body=job_id.encode(),
                Metadata=owner.metadata(record.run, key),
            )  # fmt: skip
        assert crash.workers.kill(victim)
        crash.workers.start(victim, wait=False)
    job = crash.wait_done(job_id, timeout=WORKER_TTL + 60)
    assert job.status == "failed", job
    assert job.error is not None and job.error["code"] == "internal"
    assert "no retries left" in job.error["message"]
    assert job.attempts == 2
    # Nothing published, nothing partial, and no claim to keep the next job off the output.
    assert wait_until(lambda: output_keys(crash.stack, output) == [], "claim released", 10)


def test_a_replaced_run_cannot_touch_the_record(stack: Stack) -> None:
    """A run given up for dead (the job re-queued and started again) that is in fact alive:
    its progress says stop, and it can neither fail nor finish the job; the new run can."""
    store = JobStore(Redis.from_url(stack.redis_url), key_prefix=f"fence{uuid.uuid4().hex[:8]}")
    job_id = job_id_for("team-a", None)
    store.create(job_id, "team-a", {"spec": 1})
    old = store.start(job_id)
    assert old and not store.should_stop(job_id, run=old)
    assert store.requeue(job_id, "its worker died")
    new = store.start(job_id)
    assert new and new != old

    progress = {"stage": "merge", "modules_done": 1, "modules_total": 9}
    assert store.report_progress(job_id, progress, run=old)  # stop
    assert store.should_stop(job_id, run=old)
    assert not store.fail(job_id, "canceled", "the old run stopped", run=old)
    assert not store.succeed(job_id, {"seconds": 1.0}, run=old)
    assert store.get(job_id).status == "running"
    assert store.get(job_id).progress != progress  # the old run wrote nothing

    assert not store.report_progress(job_id, progress, run=new)
    assert store.succeed(job_id, {"seconds": 2.0}, run=new)
    assert store.get(job_id).status == "succeeded"


def test_the_maintenance_lock_expires_in_seconds(stack: Stack) -> None:
    """A worker killed during a maintenance pass must not stop every other worker's clean-up
    (and with it the recovery of abandoned jobs) for RQ's 15 minutes."""
    settings = Settings(redis_url=stack.redis_url, queue=f"lock{uuid.uuid4().hex[:8]}")
    queue = make_queue(Redis.from_url(stack.redis_url), settings)
    assert queue.acquire_maintenance_lock()
    assert not queue.acquire_maintenance_lock()  # still one cleaner at a time
    assert 0 < queue.connection.ttl(queue.registry_cleaning_key) <= MAINTENANCE_LOCK_S <= 60
    queue.release_maintenance_lock()
