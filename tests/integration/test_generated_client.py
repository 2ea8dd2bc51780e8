"""A Python client generated from the running API's ``/openapi.json`` by a standard generator
(openapi-python-client, pinned in the test extra), used end to end against the real stack:
submit, poll, read the result, list a page at a time with the cursor, cancel, and read a
problem+json error as the generated ``Problem`` model. Nothing here is hand-written against
the API: if the schema lies, the generated code fails."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import KEY_A, Stack

PACKAGE = "coremerge_generated_client"


@pytest.fixture(scope="module")
def generated(stack: Stack, tmp_path_factory: pytest.TempPathFactory):
    """The generated package, imported from a folder of its own."""
    work = tmp_path_factory.mktemp("generated")
    (work / "openapi.json").write_text(
        json.dumps(httpx.get(f"{stack.api_url}/openapi.json").json())
    )
    bin_dir = Path(sys.executable).parent
    run = subprocess.run(
        [str(bin_dir / "openapi-python-client"), "generate", "--path", "openapi.json",
         "--meta", "none", "--output-path", PACKAGE],
        cwd=work, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    sys.path.insert(0, str(work))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(work))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def _api(package, name: str):
    return importlib.import_module(f"{package.__name__}.api.{name}")


def _models(package):
    return importlib.import_module(f"{package.__name__}.models")


def test_a_generated_client_runs_a_job_end_to_end(
    generated, stack: Stack, tiny: list[str], big: list[str]
) -> None:
    models = _models(generated)
    submit = _api(generated, "merges.submit_merge")
    get = _api(generated, "merges.get_merge")
    listing = _api(generated, "merges.list_merges")
    cancel = _api(generated, "merges.cancel_merge")
    client = generated.AuthenticatedClient(base_url=stack.api_url, token=KEY_A, timeout=30)
    name = uuid.uuid4().hex[:8]

    def spec(uris: list[str], suffix: str, **more):
        return models.MergeSpec.from_dict(
            {"adapters": [{"uri": u} for u in uris], "method": "ta",
             "output": {"uri": f"s3://merged/team-a/gen-{name}-{suffix}/"}, **more}
        )  # fmt: skip

    # submit (202, Location), then poll to the end and read the result
    answer = submit.sync_detailed(client=client, body=spec(tiny, "a"))
    assert answer.status_code == 202 and answer.headers["location"].endswith(answer.parsed.id)
    job = answer.parsed
    assert isinstance(job, models.Job) and job.status == models.JobStatus.QUEUED
    deadline = time.monotonic() + 90
    while job.status not in (models.JobStatus.SUCCEEDED, models.JobStatus.FAILED):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
        job = get.sync(job.id, client=client)
    assert job.status == models.JobStatus.SUCCEEDED, job.error
    assert job.result.uri == f"s3://merged/team-a/gen-{name}-a/" and job.result.rank > 0
    assert job.finished_at >= job.started_at >= job.created_at  # parsed as datetimes

    # list a page at a time, following next_cursor
    second = submit.sync(client=client, body=spec(tiny, "b"))
    first_page = listing.sync(client=client, limit=1)
    assert [j.id for j in first_page.jobs] == [second.id] and first_page.next_cursor
    next_page = listing.sync(client=client, limit=1, cursor=first_page.next_cursor)
    assert [j.id for j in next_page.jobs] == [job.id]
    assert next_page.jobs[0].output_uri == job.result.uri

    # cancel a longer job (queued or running: 200 or 202)
    long = submit.sync(client=client, body=spec(big, "c", space="full", method="ties"))
    canceled = cancel.sync_detailed(long.id, client=client)
    assert canceled.status_code in (200, 202) and canceled.parsed.id == long.id

    # errors arrive as the generated Problem model
    missing = get.sync_detailed("0" * 32, client=client)
    assert missing.status_code == 404 and isinstance(missing.parsed, models.Problem)
    assert missing.parsed.type_ == "urn:coremerge:problem:not-found"
    forbidden = submit.sync_detailed(
        client=client,
        body=models.MergeSpec.from_dict(
            {
                "adapters": [{"uri": "s3://adapters-b/x/"}],
                "output": {"uri": "s3://merged/team-a/y/"},
            }
        ),
    )
    assert forbidden.status_code == 403
    assert forbidden.parsed.type_ == "urn:coremerge:problem:forbidden-location"
    assert forbidden.parsed.detail.startswith("adapters.0.uri")
    invalid = listing.sync_detailed(client=client, limit=1, cursor="bm90LWEtY3Vyc29y")
    assert invalid.status_code == 422
    assert invalid.parsed.errors[0].field == "query.cursor"
