"""The whole service: real PEFT adapters in moto's S3, the API (uvicorn) and a worker (RQ)
as separate processes, talking through a real Redis. docs/architecture.md, docs/guarantees.md end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from redis import Redis
from safetensors.torch import load_file

from jobs.records import JobStore
from jobs.spec import MergeSpec
from service.client import ApiError, CoremergeClient
from tests.integration.conftest import (
    ADAPTER_FILES,
    BIG_MODULES,
    KEY_B,
    ROOT,
    Stack,
    children,
    free_port,
    make_llama_adapters,
    upload,
    wait_until,
)
from worker.merge.runner import run_merge
from worker.storage import REPORT_NAME, WEIGHTS_NAME


def download(s3, uri: str, dest: Path) -> Path:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    dest.mkdir(parents=True)
    for name in (*ADAPTER_FILES, REPORT_NAME):
        s3.download_file(bucket, f"{prefix}{name}", str(dest / name))
    return dest


def fresh_output(tenant: str = "team-a") -> str:
    return f"s3://merged/{tenant}/{uuid.uuid4().hex[:12]}/"


def wait_done(stack: Stack, client: CoremergeClient, job_id: str, timeout: float = 90) -> dict:
    try:
        return client.wait(job_id, poll_interval=0.05, timeout=timeout)
    except TimeoutError:
        raise AssertionError(f"job {job_id} did not finish:\n{stack.tail('worker')}") from None


def test_merge_equals_the_local_merge_bit_for_bit_and_loads_in_peft(
    stack: Stack, tiny: list[str], peft_adapters: list[Path], tmp_path: Path
) -> None:
    spec = {
        "adapters": [
            {"uri": uri, "weight": w} for uri, w in zip(tiny, (1.0, 0.5, -0.25), strict=True)
        ],
        "method": "tsv",
        "output": {"uri": fresh_output()},
    }
    with stack.client() as client:
        job = client.submit(spec)
        job = wait_done(stack, client, job["id"])
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["uri"] == spec["output"]["uri"]
    assert result["report_uri"] == spec["output"]["uri"] + REPORT_NAME
    assert job["progress"] == {"stage": "upload", "modules_done": result["modules"],
                               "modules_total": result["modules"], "percent": 100.0,
                               "eta_seconds": None}  # fmt: skip
    served = download(stack.s3, result["uri"], tmp_path / "served")

    local_spec = MergeSpec.model_validate({**spec, "output": {"uri": str(tmp_path / "local")}})
    local = run_merge(local_spec, peft_adapters, tmp_path / "local", device="cpu")
    for name in ADAPTER_FILES:
        assert (served / name).read_bytes() == (local.out_dir / name).read_bytes(), name
    report = json.loads((served / REPORT_NAME).read_text())
    assert report["output"]["sha256"] == local.report["output"]["sha256"]
    assert result["rank"] == local.rank and result["bytes"] == local.bytes
    assert [i["uri"] for i in report["inputs"]] == tiny

    from peft import PeftModel

    from worker.demo import tiny_base_model

    model = PeftModel.from_pretrained(tiny_base_model(), served).eval()
    tensors = load_file(served / WEIGHTS_NAME)
    name, A = next((k, v) for k, v in tensors.items() if k.endswith("lora_A.weight"))
    module = model.base_model.model.get_submodule(
        name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    )
    assert torch.equal(module.lora_A["default"].weight, A)


def test_random_method_with_rank_and_dtype_equals_the_cli(
    stack: Stack, tiny: list[str], peft_adapters: list[Path], tmp_path: Path
) -> None:
    """DARE (seeded), truncated to rank 8, stored in bfloat16: same bytes as `coremerge merge`."""
    spec = {
        "adapters": [{"uri": uri} for uri in tiny],
        "method": "dare_ties",
        "params": {"drop": 0.5, "density": 0.3},
        "seed": 7,
        "output": {"uri": fresh_output(), "rank": 8, "dtype": "bfloat16"},
    }
    with stack.client() as client:
        job = wait_done(stack, client, client.submit(spec)["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["rank"] == 8
    served = download(stack.s3, job["result"]["uri"], tmp_path / "served")

    local_spec = {
        **spec,
        "adapters": [{"uri": str(d)} for d in peft_adapters],
        "output": {**spec["output"], "uri": str(tmp_path / "cli")},
    }
    (tmp_path / "job.json").write_text(json.dumps(local_spec))
    subprocess.run(
        [sys.executable, "-m", "worker.cli", "merge", "--spec", str(tmp_path / "job.json"),
         "--device", "cpu", "--quiet"],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    for name in ADAPTER_FILES:
        assert (served / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name


def test_progress_is_visible_and_cancel_stops_a_running_job(stack: Stack, big: list[str]) -> None:
    output = fresh_output()
    spec = {"adapters": [{"uri": u} for u in big], "method": "ties", "space": "full",
            "output": {"uri": output}}  # fmt: skip
    with stack.client() as client:
        job_id = client.submit(spec)["id"]

        def mid_merge():
            job = client.get(job_id)
            assert job["status"] in ("queued", "running"), job
            p = job["progress"]
            return (
                p and p["stage"] == "merge" and 0 < p["modules_done"] < p["modules_total"] and job
            )

        running = wait_until(mid_merge, "progress", timeout=60)
        assert running["status"] == "running" and running["started_at"]
        assert running["progress"]["modules_total"] == BIG_MODULES
        canceled = client.cancel(job_id)
        assert canceled["status"] in ("running", "canceled")
        job = wait_done(stack, client, job_id)
    assert job["status"] == "canceled", job
    assert job["error"]["code"] == "canceled"
    assert job["progress"]["modules_done"] < BIG_MODULES
    assert stack.keys("merged", output.removeprefix("s3://merged/")) == []


def test_mixed_lora_and_vera_merge_end_to_end(
    stack: Stack, tiny: list[str], peft_adapters: list[Path], tmp_path: Path
) -> None:
    """A VeRA adapter saved without its projections, merged with a LoRA one by the service:
    the worker regenerates the projections and takes the input sizes from the LoRA input."""
    from worker.demo import make_tiny_vera

    vera = make_tiny_vera(
        tmp_path, r=16, seed=7, save_projection=False, target_modules=["q_proj", "down_proj"]
    )
    vera_uri = upload(stack.s3, vera, "adapters-a", f"vera/{uuid.uuid4().hex[:8]}/")
    spec = {"adapters": [{"uri": tiny[0]}, {"uri": vera_uri}], "method": "ta",
            "output": {"uri": fresh_output()}}  # fmt: skip
    with stack.client() as client:
        job = wait_done(stack, client, client.submit(spec)["id"])
    assert job["status"] == "succeeded", job
    served = download(stack.s3, job["result"]["uri"], tmp_path / "served")
    local_spec = MergeSpec.model_validate({**spec, "output": {"uri": str(tmp_path / "local")}})
    local = run_merge(local_spec, [peft_adapters[0], vera], tmp_path / "local", device="cpu")
    for name in ADAPTER_FILES:
        assert (served / name).read_bytes() == (local.out_dir / name).read_bytes(), name
    report = json.loads((served / REPORT_NAME).read_text())
    assert [i["peft_type"] for i in report["inputs"]] == ["LORA", "VERA"]


def test_idempotent_repeat_returns_the_same_job(stack: Stack, tiny: list[str]) -> None:
    spec = {
        "adapters": [{"uri": u} for u in tiny[:2]],
        "method": "ta",
        "output": {"uri": fresh_output()},
    }
    key = f"repeat-{uuid.uuid4().hex}"
    with stack.client() as client:
        first = client.submit(spec, idempotency_key=key)
        again = client.submit(spec, idempotency_key=key)
        assert again["id"] == first["id"]
        done = wait_done(stack, client, first["id"])
        assert done["status"] == "succeeded"
        assert client.submit(spec, idempotency_key=key) == done  # after success: still the same
        with pytest.raises(ApiError) as info:
            client.submit({**spec, "seed": 3}, idempotency_key=key)
        assert info.value.status == 422
        assert [j["id"] for j in client.list(limit=500)].count(first["id"]) == 1


def test_second_tenant_gets_404_and_403(stack: Stack, tiny: list[str]) -> None:
    spec = {"adapters": [{"uri": tiny[0]}], "method": "ta", "output": {"uri": fresh_output()}}
    with stack.client() as a, stack.client(KEY_B) as b:
        job_id = a.submit(spec)["id"]
        for call in (b.get, b.cancel):
            with pytest.raises(ApiError) as info:
                call(job_id)
            assert info.value.status == 404
            assert info.value.problem["status"] == 404
        assert job_id not in [j["id"] for j in b.list()]
        with pytest.raises(ApiError) as info:  # team-a's bucket, team-b's output
            b.submit({**spec, "output": {"uri": fresh_output("team-b")}})
        assert info.value.status == 403
        assert "adapters.0.uri" in info.value.problem["detail"]
        assert wait_done(stack, a, job_id)["status"] == "succeeded"


def test_missing_adapter_fails_with_adapter_not_found(stack: Stack, tiny: list[str]) -> None:
    output = fresh_output()
    spec = {"adapters": [{"uri": tiny[0]}, {"uri": "s3://adapters-a/no/such/adapter/"}],
            "output": {"uri": output}}  # fmt: skip
    with stack.client() as client:
        job = wait_done(stack, client, client.submit(spec)["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "adapter_not_found"
    assert "s3://adapters-a/no/such/adapter/" in job["error"]["message"]
    assert stack.keys("merged", output.removeprefix("s3://merged/")) == []
    record = JobStore(Redis.from_url(stack.redis_url)).get(job["id"])
    assert record is not None and record.attempts == 1  # permanent: no retry burned


def test_incompatible_adapters_fail_with_adapter_incompatible(
    stack: Stack, tiny: list[str], tmp_path: Path
) -> None:
    narrow = make_llama_adapters(
        tmp_path,
        1,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )[0]  # fmt: skip  (same module names, other shapes)
    uri = upload(stack.s3, narrow, "adapters-a", f"narrow-{uuid.uuid4().hex[:8]}/")
    output = fresh_output()
    with stack.client() as client:
        job = client.submit(
            {"adapters": [{"uri": tiny[0]}, {"uri": uri}], "output": {"uri": output}}
        )
        job = wait_done(stack, client, job["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "adapter_incompatible", job["error"]
    assert stack.keys("merged", output.removeprefix("s3://merged/")) == []


def test_submit_and_status_commands(stack: Stack, tiny: list[str], tmp_path: Path) -> None:
    spec_path = tmp_path / "job.json"
    spec_path.write_text(json.dumps({"adapters": [{"uri": u} for u in tiny], "method": "ties",
                                     "output": {"uri": fresh_output()}}))  # fmt: skip
    env = {**stack.env, "COREMERGE_API_KEY": "integration-key-a"}
    run = subprocess.run(
        [sys.executable, "-m", "worker.cli", "submit", str(spec_path), "--wait"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    job = json.loads(run.stdout)
    assert job["status"] == "succeeded"
    assert "running" in run.stderr or "succeeded" in run.stderr  # progress lines
    status = subprocess.run(
        [sys.executable, "-m", "worker.cli", "status", job["id"]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0 and json.loads(status.stdout)["id"] == job["id"]
    bad = subprocess.run(
        [sys.executable, "-m", "worker.cli", "status", "0" * 32],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 1 and "404" in bad.stderr
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for args, source in ((["--url", nobody], "--url"), ([], "COREMERGE_API_URL")):
        gone = subprocess.run(
            [sys.executable, "-m", "worker.cli", "status", job["id"], *args], cwd=ROOT,
            env={**env, "COREMERGE_API_URL": nobody, "COREMERGE_API_WAIT": "0.5"},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert gone.returncode == 1
        assert f"cannot reach the API at {nobody} (from {source})" in gone.stderr
        assert "Traceback" not in gone.stderr


def test_a_killed_merge_process_is_retried_and_succeeds(stack: Stack, big: list[str]) -> None:
    """The work horse dies mid-merge (as under the OOM killer): RQ's Retry runs the job again
    and the record goes running → queued → running → succeeded, published once."""
    output = fresh_output()
    spec = {"adapters": [{"uri": u} for u in big], "method": "ties", "space": "full",
            "output": {"uri": output}}  # fmt: skip
    with stack.client() as client:
        job_id = client.submit(spec)["id"]
        wait_until(
            lambda: (client.get(job_id)["progress"] or {}).get("modules_done", 0) > 0,
            "progress", timeout=60,
        )  # fmt: skip
        horses = children(stack.worker.pid)
        assert len(horses) == 1
        os.kill(horses[0], signal.SIGKILL)
        job = wait_done(stack, client, job_id, timeout=120)
    assert job["status"] == "succeeded", (job, stack.tail("worker"))
    assert stack.keys("merged", output.removeprefix("s3://merged/"))[-1].endswith(REPORT_NAME)
    assert stack.worker.poll() is None  # the worker itself lives on


def test_an_output_holding_someone_elses_object_ends_output_exists_untouched(
    stack: Stack, tiny: list[str]
) -> None:
    """The real stack: a tenant's own file already at the output prefix. The job ends
    output_exists before it reads an input, and the file is exactly as it was."""
    output = fresh_output()
    key = output.removeprefix("s3://merged/") + "notes.txt"
    stack.s3.put_object(Bucket="merged", Key=key, Body=b"keep me")
    with stack.client() as client:
        job = wait_done(stack, client, client.submit({"adapters": [{"uri": u} for u in tiny],
                                                      "output": {"uri": output}})["id"])  # fmt: skip
    assert job["status"] == "failed" and job["error"]["code"] == "output_exists", job
    assert "notes.txt" in job["error"]["message"]
    assert job["progress"]["stage"] == "download" and job["progress"]["modules_total"] == 0
    listing = stack.s3.list_objects_v2(Bucket="merged", Prefix=output.removeprefix("s3://merged/"))
    assert [o["Key"] for o in listing["Contents"]] == [key]
    assert stack.s3.get_object(Bucket="merged", Key=key)["Body"].read() == b"keep me"
