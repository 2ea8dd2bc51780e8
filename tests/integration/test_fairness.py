"""Fair turns between tenants, measured on the real stack (issue 22 §4): two workers, tenant A
queues 50 merges of several seconds each, then tenant B submits one. B's job must start when the
first worker frees up: no job of A may start between B's submission and B's start, and B
waits at most about one of A's jobs. (With one FIFO list B waited for all 50.)

The figures (B's wait, A's job times) are printed with ``-s``."""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from service.client import CoremergeClient
from tests.integration.conftest import KEY_A, KEY_B, Stack, make_llama_adapters, upload
from tests.processes import Workers, start_api, stop, wait_until

A_JOBS = 50


@pytest.fixture(scope="module")
def medium(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three adapters whose full-space TIES merge takes several seconds (24 modules of
    384 × 384): long enough to see turns, short enough to wait for one."""
    dirs = make_llama_adapters(
        tmp_path_factory.mktemp("medium"), 3, hidden_size=384, intermediate_size=768,
        num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
    )  # fmt: skip
    return [upload(stack.s3, d, "adapters-a", f"medium/task-{i}/") for i, d in enumerate(dirs)]


def _t(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_a_tenant_with_one_job_waits_one_job_not_fifty(
    stack: Stack, medium: list[str], peft_adapters: list[Path], tmp_path: Path
) -> None:
    name = f"fair{uuid.uuid4().hex[:8]}"
    env = {**stack.env, "COREMERGE_QUEUE": name, "COREMERGE_KEY_PREFIX": name}
    b_inputs = [upload(stack.s3, d, "adapters-b", f"{name}/task-{i}/")
                for i, d in enumerate(peft_adapters)]  # fmt: skip
    api, url = start_api(env, tmp_path / "api.log")
    workers = Workers(env, tmp_path, 2)
    a_ids: list[str] = []
    try:
        workers.start_all()
        with CoremergeClient(url, KEY_A, timeout=30) as a, CoremergeClient(url, KEY_B) as b:
            for i in range(A_JOBS):
                a_ids.append(a.submit({
                    "adapters": [{"uri": u} for u in medium], "method": "ties", "space": "full",
                    "output": {"uri": f"s3://merged/team-a/{name}-{i}/"},
                })["id"])  # fmt: skip
            wait_until(lambda: len(a.list(status="running")) == 2, "both workers busy", 120)
            b_job = b.submit({"adapters": [{"uri": u} for u in b_inputs], "method": "ta",
                              "output": {"uri": f"s3://merged/team-b/{name}/"}})  # fmt: skip
            done = b.wait(b_job["id"], poll_interval=0.1, timeout=180)
            assert done["status"] == "succeeded", (done, workers.tail())
            a_jobs = [a.get(job_id) for job_id in a_ids]
    finally:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY_A}"}) as http:
            for job_id in a_ids:  # the rest of A's queue: canceled, so the workers stop soon
                http.delete(f"/merges/{job_id}")
        workers.stop_all()
        stop(api)
    submitted, started = _t(done["created_at"]), _t(done["started_at"])
    a_started = [_t(j["started_at"]) for j in a_jobs if j["started_at"]]
    a_times = [_t(j["finished_at"]) - _t(j["started_at"])
               for j in a_jobs if j["status"] == "succeeded"]  # fmt: skip
    jumped = [s for s in a_started if submitted < s < started]
    print(f"\nB waited {started - submitted:.2f} s; A's jobs took {min(a_times):.2f}-"
          f"{max(a_times):.2f} s; A's jobs started meanwhile: {len(jumped)} "
          f"(of {A_JOBS} queued)")  # fmt: skip
    assert not jumped, "a job of A started between B's submission and B's start"
    assert started - submitted <= max(a_times) + 2.0
