"""Soak test (issue 6), out of the default run (``-m soak`` runs it): 200 small merges through
the API and two workers while a chaos loop ``kill -9``s a random worker's process group (and
its work horse's) every few seconds and starts it again. Afterwards every job has
``succeeded``, none is left queued or running, and every output loads and equals a local
``run_merge`` of the same inputs. Loopback only: its own Redis, moto's S3 server, the API and
the workers are processes started here.

    .venv/bin/python -m pytest -m soak tests/soak -s     # prints the figures

``COREMERGE_SOAK_JOBS`` changes the number of jobs (default 200).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest
import torch
from redis import Redis
from safetensors.torch import load_file

from jobs.records import ACTIVE, TERMINAL, JobStore
from jobs.spec import MergeSpec
from service.client import CoremergeClient
from tests.processes import AWS_ENV, RedisServer, Workers, moto_server, start_api, stop
from tests.tenants import two_tenants
from worker.adapters.format import MODEL_CARD_NAME
from worker.merge.runner import run_merge
from worker.storage import CLAIM_NAME, CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME

pytestmark = [pytest.mark.soak, pytest.mark.timeout(3600)]

JOBS = int(os.environ.get("COREMERGE_SOAK_JOBS", "200"))
KEY = "soak-key"
#: Seconds between two kills: a random worker is killed every few seconds.
KILL_EVERY_S = (3.0, 7.0)
#: The distinct merges the jobs cycle through (adapter indices, then the rest of the spec).
MERGES = [
    ([0, 1, 2], {"method": "tsv"}),
    ([0, 1], {"method": "ta", "params": {"alpha": 0.7}}),
    ([0, 2], {"method": "ties", "params": {"density": 0.3}}),
    ([2, 1, 0], {"method": "dare_ties", "seed": 7, "output": {"rank": 8, "dtype": "bfloat16"}}),
]


def spec_for(merge: int, uris: list[str], output: str) -> dict:
    indices, rest = MERGES[merge]
    spec = {"adapters": [{"uri": uris[i]} for i in indices], **rest}
    spec["output"] = {**rest.get("output", {}), "uri": output}
    return spec


class Chaos(threading.Thread):
    """Every few seconds, kill -9 a random worker (parent and work horse) and start it again."""

    def __init__(self, workers: Workers, seed: int = 6) -> None:
        super().__init__(daemon=True)
        self.workers, self.random = workers, random.Random(seed)
        self.done = threading.Event()
        self.kills = self.busy_kills = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.done.wait(self.random.uniform(*KILL_EVERY_S)):
                # A worker that is up (a booting one has nothing to lose yet), at random.
                up = [i for i in range(len(self.workers.procs)) if self.workers.is_up(i)]
                if not up:
                    continue
                i = self.random.choice(up)
                self.busy_kills += self.workers.kill(i)
                self.kills += 1
                self.workers.start(i, wait=False)
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_soak_kill_workers_at_random_and_lose_nothing(
    peft_adapters: list[Path], tmp_path: Path
) -> None:
    started = time.monotonic()
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    try:
        _soak(peft_adapters, tmp_path, redis_server, started)
    finally:
        redis_server.stop()


def _soak(peft_adapters: list[Path], tmp_path: Path, redis_server: RedisServer, started: float):
    with moto_server(tmp_path / "moto.log") as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
        for bucket in ("adapters-a", "merged"):
            s3.create_bucket(Bucket=bucket)
        uris = []
        for i, local in enumerate(peft_adapters):
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                s3.upload_file(str(local / name), "adapters-a", f"soak/task-{i}/{name}")
            uris.append(f"s3://adapters-a/soak/task-{i}/")
        tenants = tmp_path / "tenants.json"
        tenants.write_text(json.dumps(two_tenants(KEY, "soak-other")))
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("COREMERGE_")},
            **AWS_ENV,
            "COREMERGE_REDIS_URL": redis_server.url,
            "COREMERGE_S3_ENDPOINT_URL": endpoint,
            "COREMERGE_TENANTS_FILE": str(tenants),
            "COREMERGE_DEVICE": "cpu",
            "COREMERGE_WORK_DIR": str(tmp_path),
            "COREMERGE_WORKER_TTL": "15",
            "COREMERGE_MAINTENANCE_INTERVAL": "1",
            "COREMERGE_JOB_RETRIES": "20",  # a job may be killed again and again
        }
        api, url = start_api(env, tmp_path / "api.log")
        workers = Workers(env, tmp_path, 2)
        chaos = Chaos(workers)
        try:
            workers.start_all()
            outputs: dict[str, tuple[int, str]] = {}
            with CoremergeClient(url, KEY, timeout=30) as client:
                for n in range(JOBS):
                    output = f"s3://merged/team-a/soak-{n:04d}-{uuid.uuid4().hex[:6]}/"
                    job = client.submit(spec_for(n % len(MERGES), uris, output))
                    outputs[job["id"]] = (n % len(MERGES), output)
            chaos.start()
            store = JobStore(Redis.from_url(redis_server.url))
            deadline = time.monotonic() + 1800
            pending = set(outputs)
            while pending and time.monotonic() < deadline and chaos.error is None:
                time.sleep(1.0)
                pending = {j for j in pending if store.get(j).status not in TERMINAL}
            chaos.done.set()
            chaos.join(30)
            assert chaos.error is None, chaos.error
            run_s = time.monotonic() - started
            records = {j: store.get(j) for j in outputs}
            stats = store.stats()
        finally:
            chaos.done.set()
            workers.stop_all()
            stop(api)

        # -- figures
        lost = [r for r in records.values() if r.status != "succeeded"]
        figures = {
            "jobs": JOBS,
            "kills": chaos.kills,
            "kills_mid_job": chaos.busy_kills,
            "retries": int(stats.get("requeued", 0)),
            "attempts_max": max(r.attempts for r in records.values()),
            "lost": len(lost),
            "wall_s": round(run_s, 1),
        }
        print(f"\nsoak: {json.dumps(figures)}")
        (tmp_path / "figures.json").write_text(json.dumps(figures))
        assert not lost, [(r.id, r.status, r.error, r.attempts) for r in lost[:5]]
        assert all(stats.get(f"active:{s}", 0) == 0 for s in ACTIVE), stats
        assert stats["entered:succeeded"] == JOBS  # each job succeeded exactly once
        assert chaos.kills >= 3, "the chaos loop did not get to kill anything"
        # every killed attempt's downloads and staging went with the attempt that replaced it
        assert not list(tmp_path.glob("coremerge-*")), list(tmp_path.glob("coremerge-*"))[:3]

        # -- every output: whole, loadable, equal to the local merge of the same inputs
        reference = {}
        for merge in range(len(MERGES)):
            spec = spec_for(merge, uris, f"s3://merged/team-a/reference-{merge}/")
            indices = MERGES[merge][0]
            local = run_merge(
                MergeSpec.model_validate(spec), [peft_adapters[i] for i in indices],
                tmp_path / f"reference-{merge}", device="cpu",
            )  # fmt: skip
            reference[merge] = (
                load_file(local.out_dir / WEIGHTS_NAME),
                json.loads((local.out_dir / CONFIG_NAME).read_text()),
            )
        for job_id, (merge, output) in outputs.items():
            prefix = output.removeprefix("s3://merged/")
            keys = sorted(
                o["Key"] for o in s3.list_objects_v2(Bucket="merged", Prefix=prefix)["Contents"]
            )
            assert keys == sorted(
                prefix + n for n in (CONFIG_NAME, MODEL_CARD_NAME, REPORT_NAME, WEIGHTS_NAME)
            ), keys
            assert prefix + CLAIM_NAME not in keys
            local_dir = tmp_path / "served" / job_id
            local_dir.mkdir(parents=True)
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                s3.download_file("merged", prefix + name, str(local_dir / name))
            tensors = load_file(local_dir / WEIGHTS_NAME)
            want, want_config = reference[merge]
            assert tensors.keys() == want.keys(), job_id
            for name, tensor in want.items():
                assert torch.equal(tensors[name], tensor), (job_id, name)
            assert json.loads((local_dir / CONFIG_NAME).read_text()) == want_config
            assert records[job_id].result["uri"] == output
