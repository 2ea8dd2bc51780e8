"""Measure the hostile 100 MB-header job of issue 22 §2 through a real stack: moto's S3 server,
the API and one worker (``python -m worker.cli``) with the service's default limits, a
Redis database of its own. The adapter is valid: a ~100 MB safetensors header of ~449,000
LoRA modules of 1 × 1. The job names it ``--copies`` times. Prints the job's outcome, the
seconds from submission to its end and the work horse's peak RSS (VmHWM, polled).

    .venv/bin/python -m tests.integration.measure_header_job --copies 64
    .venv/bin/python -m tests.integration.measure_header_job --copies 1 --code /tmp/before
    .venv/bin/python -m tests.integration.measure_header_job --header-bytes 60000000

``--code`` runs the API and the worker from another checkout of the project (e.g. an
earlier commit, ``git archive <commit> | tar -x -C DIR``), for a before/after comparison.
Not part of the test run: it takes seconds after the fix and minutes before it.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import httpx

from tests.processes import AWS_ENV, ROOT, children, free_port, moto_server, stop, wait_until
from tests.redis_db import session_redis


def write_adapter(folder: Path, header_bytes: int = 99_900_000) -> int:
    """A valid LoRA adapter whose safetensors header is just under ``header_bytes``
    (modules of 1 × 1, r = 1); returns its module count."""
    folder.mkdir(parents=True)
    entry = '"base_model.model.model.layers.{i}.q.lora_{w}.weight":{{"dtype":"F32","shape":[1,1],"data_offsets":[{a},{b}]}}'
    parts, size, i = ['{"__metadata__":{"format":"pt"}'], 32, 0
    while True:
        pair = [
            entry.format(i=i, w=w, a=8 * i + 4 * k, b=8 * i + 4 * k + 4) for k, w in enumerate("AB")
        ]
        text = "," + ",".join(pair)
        if size + len(text) + 1 > header_bytes:
            break
        parts.append(text)
        size += len(text)
        i += 1
    header = ("".join(parts) + "}").encode()
    header += b" " * (-len(header) % 8)
    with open(folder / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + b"\0" * (8 * i))
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return i


def peak_rss_mib(worker: subprocess.Popen, done) -> float:
    """The largest VmHWM of the worker's work horses until ``done()`` (polled every 50 ms)."""
    peak = 0
    while not done():
        for pid in children(worker.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        time.sleep(0.05)
    return peak / 1024


def run(copies: int, code: Path, work: Path, header_bytes: int) -> dict:
    with moto_server(work / "moto.log") as endpoint, session_redis(work) as redis_url:
        s3 = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip
        for bucket in ("adapters", "merged"):
            s3.create_bucket(Bucket=bucket)
        modules = write_adapter(work / "hostile", header_bytes)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            s3.upload_file(str(work / "hostile" / name), "adapters", f"hostile/{name}")
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("COREMERGE_")},
            **AWS_ENV, "PYTHONPATH": str(code),
            "COREMERGE_REDIS_URL": redis_url,
            "COREMERGE_S3_ENDPOINT_URL": endpoint, "COREMERGE_DEVICE": "cpu",
            "COREMERGE_WORK_DIR": str(work), "COREMERGE_JOB_TIMEOUT": "3600",
        }  # fmt: skip
        cli = [sys.executable, "-m", "worker.cli"]
        procs = []
        try:
            for args, log in ((["serve", "--port", str(port)], "api"), (["worker"], "worker")):
                with open(work / f"{log}.log", "ab") as out:
                    procs.append(subprocess.Popen([*cli, *args], cwd=code, env=env, stdout=out,
                                                  stderr=subprocess.STDOUT))  # fmt: skip
            api = f"http://127.0.0.1:{port}"
            wait_until(lambda: httpx.get(f"{api}/readyz", timeout=1).status_code == 200, "API")
            wait_until(lambda: "Listening on" in (work / "worker.log").read_text(), "worker", 90)
            spec = {"adapters": [{"uri": "s3://adapters/hostile/"}] * copies, "method": "ta",
                    "output": {"uri": "s3://merged/out/"}}  # fmt: skip
            started = time.perf_counter()
            job = httpx.post(f"{api}/merges", json=spec, timeout=30).json()
            state: dict = {}

            def done() -> bool:
                state.update(httpx.get(f"{api}/merges/{job['id']}", timeout=30).json())
                return state.get("status") in ("succeeded", "failed", "canceled")

            peak = peak_rss_mib(procs[1], done)
            seconds = time.perf_counter() - started
        finally:
            for proc in procs:
                stop(proc)
    return {"copies": copies, "modules": modules, "status": state["status"],
            "error": state.get("error"), "seconds": round(seconds, 2),
            "peak_rss_mib": round(peak, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=64)
    parser.add_argument("--code", type=Path, default=ROOT)
    parser.add_argument("--header-bytes", type=int, default=99_900_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="header-job-") as work:
        result = run(args.copies, args.code.resolve(), Path(work), args.header_bytes)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
