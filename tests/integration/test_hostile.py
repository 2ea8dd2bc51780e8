"""The bad-adapter corpus (``tests/hostile/corpus.py``) end to end: each bad adapter is put in
team-a's bucket of moto's S3 and merged with a good one through the real API and the one
worker process of the stack. Every job ends ``failed`` with its specific code and a message
naming the adapter and the reason, nothing appears at its output, and afterwards the same
worker process is alive and merges a good job. Spec-level limits are a 4xx at submission.
(The CLI side of the corpus: ``tests/hostile/test_local.py``.)"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest

from tests.hostile.corpus import CASES, long_header, many_modules, many_tensors, padded
from tests.integration.conftest import KEY_A, LIMITS, Stack
from worker.adapters.format import max_header_bytes

ADAPTER_LIMIT = LIMITS["COREMERGE_MAX_ADAPTER_BYTES"]
JOB_LIMIT = LIMITS["COREMERGE_MAX_JOB_BYTES"]
MODULE_LIMIT = LIMITS["COREMERGE_MAX_MODULES"]

#: case → (job error code, fragment of its message): the corpus, then the service limits.
EXPECTED = {c.name: (c.code, c.says) for c in CASES} | {
    "over-adapter-bytes": ("limit_exceeded", f"limit of {ADAPTER_LIMIT} per adapter"),
    "over-job-bytes": ("limit_exceeded", f"limit of {JOB_LIMIT} (COREMERGE_MAX_JOB_BYTES)"),
    "over-modules": ("limit_exceeded", f"limit of {MODULE_LIMIT} (COREMERGE_MAX_MODULES)"),
    "over-header-bytes": (
        "limit_exceeded",
        f"-byte header, more than the {max_header_bytes(MODULE_LIMIT)} bytes that this "
        f"service's limit of {MODULE_LIMIT} modules can need (COREMERGE_MAX_MODULES)",
    ),
    "over-header-entries": (
        "limit_exceeded",
        f"tensors, more than the {2 * MODULE_LIMIT + 2} that this service's limit of "
        f"{MODULE_LIMIT} modules can hold",
    ),
}


def _put(stack: Stack, folder: Path, prefix: str) -> str:
    """Upload the adapter files that ``folder`` has (a broken adapter may lack some)."""
    for path in folder.iterdir():
        if path.suffix in (".json", ".safetensors", ".bin"):
            stack.s3.upload_file(str(path), "adapters-a", f"{prefix}{path.name}")
    return f"s3://adapters-a/{prefix}"


@pytest.fixture(scope="module")
def hostile_jobs(
    stack: Stack, tiny: list[str], peft_adapters: list[Path], tmp_path_factory
) -> dict[str, tuple[dict, str]]:
    """Every bad job, submitted at once to the one worker and waited for: case → (job, output)."""
    work = tmp_path_factory.mktemp("hostile")
    good, run = peft_adapters[0], f"hostile-{uuid.uuid4().hex[:8]}"
    inputs = {c.name: [tiny[0], _put(stack, c.make(good, work), f"{run}/{c.name}/")] for c in CASES}
    over = padded(good, work / "over-adapter-bytes", ADAPTER_LIMIT + 1)
    inputs["over-adapter-bytes"] = [tiny[0], _put(stack, over, f"{run}/over-adapter-bytes/")]
    near = padded(good, work / "near-limit", ADAPTER_LIMIT - (64 << 10))  # each one is allowed
    near_uri = _put(stack, near, f"{run}/near-limit/")
    inputs["over-job-bytes"] = [near_uri] * (JOB_LIMIT // ADAPTER_LIMIT + 1)
    wide = many_modules(good, work / "over-modules", MODULE_LIMIT + 1)
    inputs["over-modules"] = [_put(stack, wide, f"{run}/over-modules/")]
    for name, make in (
        ("over-header-bytes", lambda f: long_header(good, f, max_header_bytes(MODULE_LIMIT))),
        ("over-header-entries", lambda f: many_tensors(good, f, MODULE_LIMIT)),
    ):
        inputs[name] = [tiny[0], _put(stack, make(work / name), f"{run}/{name}/")]

    submitted = {}
    with stack.client() as client:
        for name, uris in inputs.items():
            output = f"s3://merged/team-a/{run}/{name}/"
            spec = {
                "adapters": [{"uri": u} for u in uris],
                "method": "ta",
                "output": {"uri": output},
            }
            submitted[name] = (client.submit(spec)["id"], output)
        done = {}
        for name, (job_id, output) in submitted.items():
            try:
                done[name] = (client.wait(job_id, poll_interval=0.05, timeout=120), output)
            except TimeoutError:
                tail = stack.tail("worker")
                raise AssertionError(f"{name}: job {job_id} did not end:\n{tail}") from None
    return done


@pytest.mark.parametrize("name", list(EXPECTED))
def test_bad_adapter_fails_the_job_with_its_code(
    name: str, stack: Stack, hostile_jobs: dict[str, tuple[dict, str]]
) -> None:
    job, output = hostile_jobs[name]
    code, says = EXPECTED[name]
    assert job["status"] == "failed", job
    assert job["error"]["code"] == code, job["error"]
    message = job["error"]["message"]
    assert says in message, message
    if name != "over-job-bytes":  # a job-level limit: no single adapter to name
        assert name in message, message
    assert "Traceback" not in message
    assert stack.keys("merged", output.removeprefix("s3://merged/")) == []


def test_the_same_worker_survives_the_corpus_and_merges_a_good_job(
    stack: Stack, tiny: list[str], hostile_jobs: dict[str, tuple[dict, str]]
) -> None:
    assert len(hostile_jobs) == len(EXPECTED)  # every bad job ended before this one
    assert stack.worker.poll() is None, stack.tail("worker")
    spec = {"adapters": [{"uri": u} for u in tiny], "method": "ties",
            "output": {"uri": f"s3://merged/team-a/after-hostile-{uuid.uuid4().hex[:8]}/"}}  # fmt: skip
    with stack.client() as client:
        job = client.wait(client.submit(spec)["id"], poll_interval=0.05, timeout=120)
    assert job["status"] == "succeeded", job
    assert stack.worker.poll() is None


def test_the_worker_logs_json_lines_with_job_id_and_tenant(
    stack: Stack, hostile_jobs: dict[str, tuple[dict, str]]
) -> None:
    job = hostile_jobs["nan-factor"][0]
    lines = [json.loads(line) for line in stack.logs["worker"].read_text().splitlines() if line]
    ours = [line for line in lines if line.get("job_id") == job["id"]]
    assert ours and all(line["tenant"] == "team-a" for line in ours), ours
    assert any(job["error"]["message"] in line["message"] for line in ours), ours
    assert KEY_A not in stack.logs["worker"].read_text()


def _submit_raw(stack: Stack, body: bytes | object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"}
    return httpx.post(f"{stack.api_url}/merges", content=body, headers=headers, timeout=30)


def _body(n: int = 1, **changes: object) -> bytes:
    spec = {"adapters": [{"uri": f"s3://adapters-a/x-{i}/"} for i in range(n)],
            "output": {"uri": "s3://merged/team-a/never/"}, **changes}  # fmt: skip
    return json.dumps(spec).encode()


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (_body(65), 422, "adapters"),
        (_body(output={"uri": "s3://merged/team-a/x/", "rank": 513}), 422, "output.rank"),
        (_body(endpoint_url="http://169.254.169.254/"), 422, "endpoint_url"),
        (
            _body(output={"uri": "s3://merged/team-a/x/", "endpoint_url": "http://evil/"}),
            422,
            "output.endpoint_url",
        ),
        (_body(adapters=[{"uri": "s3://key:secret@adapters-a/x/"}]), 422, "adapters.0.uri"),
        (b'{"adapters": [' + b" " * (2 << 20) + b"]}", 413, None),
        # the same, chunked (no Content-Length): uvicorn streams it, the API counts it
        (lambda: iter([b'{"adapters": ['] + [b" " * 65536] * 32 + [b"]}"]), 413, None),
    ],
    ids=["adapters", "rank", "endpoint", "output-endpoint", "credentials", "body", "chunked"],
)
def test_spec_level_limits_are_4xx_at_submission(
    stack: Stack, body: object, status: int, field: str | None
) -> None:
    r = _submit_raw(stack, body() if callable(body) else body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    if field is not None:
        assert field in [e["field"] for e in r.json()["errors"]], r.json()
