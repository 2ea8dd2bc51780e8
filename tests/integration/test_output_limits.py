"""The output is bounded by the service before any tensor is read: a merge whose rank is set by
the layers rather than by the inputs (full space without ``output.rank``) is refused with
``limit_exceeded`` naming COREMERGE_MAX_OUTPUT_RANK, where it used to turn 34 KB of adapters
into 15 MB (issue 22 §3); the same job with an ``output.rank`` under the limit runs. Through the
real stack: the API, the RQ worker process, Redis and moto's S3."""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.integration.conftest import Stack, upload
from tests.worker.synthetic import lora_adapter


def _wide_adapters(stack: Stack, tmp: Path, run: str) -> list[str]:
    """Two rank-2 adapters on one 1024 × 1024 layer: 17 KB each."""
    return [
        upload(stack.s3, lora_adapter(tmp / f"wide-{t}", r=2, m=1024, n=1024, seed=t),
               "adapters-a", f"{run}/wide-{t}/")
        for t in range(2)
    ]  # fmt: skip


def _run(stack: Stack, uris: list[str], output: dict, **fields: object) -> dict:
    spec = {"adapters": [{"uri": u} for u in uris], "output": output, **fields}
    with stack.client() as client:
        return client.wait(client.submit(spec)["id"], poll_interval=0.05, timeout=120)


def test_a_merge_whose_rank_the_layers_set_is_refused_before_reading(
    stack: Stack, tmp_path: Path
) -> None:
    run = f"output-limits-{uuid.uuid4().hex[:8]}"
    uris = _wide_adapters(stack, tmp_path, run)
    output = {"uri": f"s3://merged/team-a/{run}/full/"}
    job = _run(stack, uris, output, method="ties", space="full")
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "limit_exceeded", job
    message = job["error"]["message"]
    assert "its merged rank can reach 1024" in message, message
    assert "COREMERGE_MAX_OUTPUT_RANK" in message and "set output.rank to at most 512" in message
    assert stack.keys("merged", f"team-a/{run}/full/") == []
    # Bounded by output.rank, the same merge runs: 1024 × 8 × 2 values per factor pair.
    output = {"uri": f"s3://merged/team-a/{run}/ranked/", "rank": 8}
    job = _run(stack, uris, output, method="ties", space="full")
    assert job["status"] == "succeeded", job
    assert job["result"]["rank"] == 8
