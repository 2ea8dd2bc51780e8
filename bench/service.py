"""Service benchmark (issue 4): the API's throughput and latency, and a small merge end to end.

    .venv/bin/python bench/service.py                      # both parts, moto as the S3 store
    .venv/bin/python bench/service.py --duration 20 --concurrency 32
    .venv/bin/python bench/service.py --storage file       # end to end through file:// URIs
    .venv/bin/python bench/service.py --profile stream     # issue 16: big S3 inputs streamed

(a) **API** (no worker running, so every job stays queued): a load generator on loopback
(asyncio with a minimal HTTP/1.1 keep-alive client, ``--concurrency`` connections,
``--processes`` processes) loops
``POST /merges`` (a 3-adapter spec, bearer key checked against a tenants file) then
``GET /merges/{id}`` for ``--duration`` seconds after a warm-up; accepted jobs per second,
p50/p99 latency of each call, errors (non-2xx or transport failures).

(b) **End to end**: three small real PEFT adapters (``worker.demo``) in moto's S3 server (or
local folders); one worker running; submit → poll every 5 ms → succeeded, ``--e2e-runs`` times
after one warm-up job. Against: ``coremerge merge`` on the same adapters as a fresh process
(interpreter and torch start-up included, as a user runs it), and the merge alone
(``run_merge``'s own time from its report). The service overhead is e2e − CLI.

(c) **Streamed inputs** (``--profile stream``, issue 16 item 1): 8 adapters of rank 16 on
Llama-3-8B shapes (``bench.speed.workloads``; ``--layers`` of 32, float32) in moto's S3 server
on loopback, one core-space ``ta`` merge to S3 through the API and one worker. Measured:
submit → succeeded against the S3 floor (every input byte fetched by ranged GETs of the S3
part size and an output of the inputs' size uploaded by the worker's multipart sink, at the
same time, with the worker's concurrency, on the same endpoint; run before and after the job),
the worker's peak disk use (its attempt folders, polled every 20 ms) and the work horse's
peak RSS less the worker's RSS before the job, both against the inputs' size. Targets: ≤ 1.3×
the floor, disk ≤ 5 % and RSS ≤ 1/4 of the inputs. Writes ``bench/results/service-stream-
latest.json`` and ``.md`` (``--out`` still gets the dated JSON).

Everything runs against a real Redis (``--redis-url``) under its own key prefix and queue,
removed afterwards. Targets (issue 4, 2 cores): ≥ 300 accepted jobs/s with p99 < 50 ms, and an
end-to-end overhead over the CLI < 0.5 s. Prints a table; writes ``bench/out/service-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.speed.harness import merge_command  # noqa: E402
from bench.speed.machine import machine_info, write_json  # noqa: E402
from bench.speed.measure import proc_status, run_measured, wait_for_quiet  # noqa: E402

API_KEY = "bench-key"
TARGET_JOBS_PER_S = 300
TARGET_P99_S = 0.050
TARGET_OVERHEAD_S = 0.5
#: issue 16 item 1: streamed inputs against the S3 floor, the worker's disk and memory.
TARGET_FLOOR_RATIO = 1.3
TARGET_DISK_SHARE = 0.05
TARGET_RSS_SHARE = 0.25
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, what: str, timeout: float = 60.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout} s")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the load generator (a): one process, `concurrency` connections ----------------------------


class _Connection:
    """A minimal HTTP/1.1 keep-alive client: the load generator shares two cores with the
    server, so it must cost far less per request than the server does (httpx costs ~3 ms of
    CPU per request here, more than the API itself)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.prefix = f"Host: {host}:{port}\r\nAuthorization: Bearer {API_KEY}\r\n"

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict, bytes]:
        head = f"{method} {path} HTTP/1.1\r\n{self.prefix}"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.lower()] = value.strip()
        content = await self.reader.readexactly(int(headers.get("content-length", 0)))
        return status, headers, content

    def close(self) -> None:
        self.writer.close()


async def _load(url: str, body: dict, concurrency: int, warmup: float, duration: float) -> dict:
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    post_lat: list[float] = []
    get_lat: list[float] = []
    errors: dict[str, int] = {}
    accepted = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from, stop_at = start + warmup, start + warmup + duration

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    async def user() -> None:
        nonlocal accepted
        conn = _Connection(host, int(port))
        await conn.open()
        try:
            while (now := loop.time()) < stop_at:
                measuring = now >= measure_from
                try:
                    t0 = time.perf_counter()  # (uvloop's loop.time() counts whole ms)
                    status, headers, _ = await conn.request("POST", "/merges", payload)
                    t1 = time.perf_counter()
                    if status != 202:
                        error(f"POST {status}")
                        continue
                    status, _, _ = await conn.request("GET", headers["location"])
                    t2 = time.perf_counter()
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    error(type(exc).__name__)
                    conn.close()
                    conn = _Connection(host, int(port))
                    await conn.open()
                    continue
                if status != 200:
                    error(f"GET {status}")
                if measuring and loop.time() <= stop_at:
                    accepted += 1
                    post_lat.append(t1 - t0)
                    get_lat.append(t2 - t1)
        finally:
            conn.close()

    await asyncio.gather(*(user() for _ in range(concurrency)))
    return {"accepted": accepted, "post": post_lat, "get": get_lat, "errors": errors}


def _load_process(args: tuple) -> dict:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_load(*args))


def api_throughput(url: str, body: dict, opts: argparse.Namespace) -> dict[str, Any]:
    per_process = max(1, opts.concurrency // opts.processes)
    work = [(url, body, per_process, opts.warmup, opts.duration)] * opts.processes
    with multiprocessing.get_context("spawn").Pool(opts.processes) as pool:
        parts = pool.map(_load_process, work)
    post = [x for p in parts for x in p["post"]]
    get = [x for p in parts for x in p["get"]]
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
    accepted = sum(p["accepted"] for p in parts)
    return {
        "concurrency": per_process * opts.processes,
        "processes": opts.processes,
        "duration_s": opts.duration,
        "accepted_jobs": accepted,
        "jobs_per_s": accepted / opts.duration,
        "post_p50_s": percentile(post, 0.50),
        "post_p99_s": percentile(post, 0.99),
        "get_p50_s": percentile(get, 0.50),
        "get_p99_s": percentile(get, 0.99),
        "errors": errors,
    }


# -- end to end (b) -----------------------------------------------------------------------------


def e2e(url: str, spec: dict, runs: int) -> dict[str, Any]:
    from service.client import CoremergeClient

    walls, worker_s = [], []
    with CoremergeClient(url, API_KEY) as client:
        for i in range(runs + 1):  # the first is a warm-up
            body = {**spec, "output": {**spec["output"], "uri": spec["output"]["uri"] + f"{i}/"}}
            t0 = time.perf_counter()
            job = client.submit(body)
            job = client.wait(job["id"], poll_interval=0.005, timeout=300)
            wall = time.perf_counter() - t0
            if job["status"] != "succeeded":
                raise RuntimeError(f"end-to-end job failed: {job['error']}")
            if i:
                walls.append(wall)
                worker_s.append(job["result"]["seconds"])
    return {"runs": runs, "wall_s": walls, "median_s": statistics.median(walls),
            "worker_seconds_median": statistics.median(worker_s)}  # fmt: skip


def cli_merge(dirs: list[Path], runs: int, tmp: Path) -> dict[str, Any]:
    walls, inproc = [], []
    for i in range(runs):
        out = tmp / f"cli-{i}"
        argv = merge_command([sys.executable, "-m", "worker.cli"], dirs, out, "tsv", "core", "cpu")
        measured = run_measured(argv, cwd=ROOT).check("coremerge merge")
        walls.append(measured.wall_s)
        report = json.loads((out / "merge_report.json").read_text())
        inproc.append(report["timings"]["total_s"])
    return {"runs": runs, "wall_s": walls, "median_s": statistics.median(walls),
            "run_merge_median_s": statistics.median(inproc)}  # fmt: skip


# -- streamed inputs (c) --------------------------------------------------------------------------


def s3_floor(endpoint: str, keys: list[str], out_bytes: int, settings: Any) -> dict[str, Any]:
    """Every input byte GET (ranged, part size, concurrency as the worker) while an object of
    ``out_bytes`` goes up through the worker's own multipart sink: the S3 work of the job
    and nothing else."""
    from concurrent.futures import ThreadPoolExecutor

    from worker.storage import make_s3_client
    from worker.storage.s3 import S3Store, S3UploadSink

    client = make_s3_client(settings)
    store = S3Store(client, "bench-adapters")
    part, conc = settings.s3_multipart_chunksize, settings.s3_max_concurrency
    sizes = {k: client.head_object(Bucket="bench-adapters", Key=k)["ContentLength"] for k in keys}
    ranges = [(k, s, min(s + part, n)) for k, n in sizes.items() for s in range(0, n, part)]

    def put() -> None:
        sink = S3UploadSink(S3Store(client, "bench-merged"), f"floor-{uuid.uuid4().hex}", {},
                            part_size=part, concurrency=conc)  # fmt: skip
        block = os.urandom(MiB)
        for _ in range(out_bytes // MiB):
            sink.write(block)
        sink.write(block[: out_bytes % MiB])
        sink.close()

    t0 = time.perf_counter()
    uploader = threading.Thread(target=put)
    uploader.start()
    with ThreadPoolExecutor(conc) as pool:
        got = sum(pool.map(lambda r: len(store.read(r[0], start=r[1], length=r[2] - r[1])), ranges))
    get_s = time.perf_counter() - t0
    uploader.join()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "get_s": get_s, "get_bytes": got, "put_bytes": out_bytes,
            "gets": len(ranges), "part_bytes": part, "concurrency": conc}  # fmt: skip


class JobWatch:
    """Polls, every 20 ms while a job runs, the worker's attempt folders (bytes on disk) and
    its work horse's peak RSS (``VmHWM``; the horse is the worker's forked child)."""

    def __init__(self, worker_pid: int, work_dir: Path) -> None:
        import psutil

        self.worker = psutil.Process(worker_pid)
        self.work_dir = work_dir
        self.baseline_rss = self.worker.memory_info().rss
        self.peak_disk = self.peak_horse_hwm = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _disk(self) -> int:
        total = 0
        for attempt in self.work_dir.glob("coremerge-*"):
            with contextlib.suppress(OSError):  # a folder removed while it is walked
                for path in attempt.rglob("*"):
                    with contextlib.suppress(OSError):
                        total += path.stat().st_size if path.is_file() else 0
        return total

    def _horse_hwm(self) -> int:
        import psutil

        peak = 0
        try:
            children = self.worker.children()
        except psutil.Error:
            return 0
        for child in children:
            status = proc_status(child.pid) or {}
            peak = max(peak, status.get("VmHWM", 0))
        return peak

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_disk = max(self.peak_disk, self._disk())
            self.peak_horse_hwm = max(self.peak_horse_hwm, self._horse_hwm())
            time.sleep(0.02)

    def __enter__(self) -> JobWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def streamed_job(url: str, spec: dict, worker: subprocess.Popen, work_dir: Path) -> dict:
    from service.client import CoremergeClient

    with CoremergeClient(url, API_KEY) as client, JobWatch(worker.pid, work_dir) as watch:
        t0 = time.perf_counter()
        job = client.wait(client.submit(spec)["id"], poll_interval=0.05, timeout=3600)
        wall = time.perf_counter() - t0
    if job["status"] != "succeeded":
        raise RuntimeError(f"streamed job failed: {job['error']}")
    return {"wall_s": wall, "worker_s": job["result"]["seconds"],
            "output_bytes": job["result"]["bytes"], "peak_disk_bytes": watch.peak_disk,
            "horse_peak_rss_bytes": watch.peak_horse_hwm,
            "worker_rss_before_bytes": watch.baseline_rss,
            "rss_less_startup_bytes": watch.peak_horse_hwm - watch.baseline_rss}  # fmt: skip


def run_stream(opts: argparse.Namespace, env: dict[str, str], tmp: Path, procs: list) -> dict:
    """(c): inputs in moto, the floor, the job, the floor again."""
    from bench.speed.workloads import Workload, input_set
    from jobs.settings import Settings

    inputs = input_set(
        sys.executable, Workload(layers=opts.layers), ROOT / "bench" / "out" / "inputs"
    )
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})  # for the floor
    print(f"(c) streamed inputs: {len(inputs.dirs)} adapters, {inputs.bytes / 2**30:.2f} GiB",
          flush=True)  # fmt: skip
    s3 = s3_client(env["COREMERGE_S3_ENDPOINT_URL"])
    uris = upload_adapters(s3, inputs.dirs, "big")
    keys = [f"big-{i}/adapter_model.safetensors" for i in range(len(uris))]
    total = sum(s3.head_object(Bucket="bench-adapters", Key=f"big-{i}/{f}")["ContentLength"]
                for i in range(len(uris)) for f in ("adapter_config.json",
                                                    "adapter_model.safetensors"))  # fmt: skip
    settings = Settings(**{k.removeprefix("COREMERGE_").lower(): v for k, v in env.items()
                           if k.startswith("COREMERGE_S3_")})  # fmt: skip
    worker = start([sys.executable, "-m", "worker.cli", "worker"], env, tmp / "worker.log")
    procs.append(worker)
    wait_until(lambda: worker_count(opts.redis_url, env["COREMERGE_QUEUE"]) > 0, "worker",
               proc=worker)  # fmt: skip
    floors = [s3_floor(env["COREMERGE_S3_ENDPOINT_URL"], keys, total, settings)]
    print(f"    floor {floors[0]['wall_s']:.1f} s", flush=True)
    spec = {"adapters": [{"uri": u} for u in uris], "method": "ta",
            "output": {"uri": "s3://bench-merged/stream/"}}  # fmt: skip
    job = streamed_job(f"http://127.0.0.1:{env['BENCH_PORT']}", spec, worker,
                       Path(env["COREMERGE_WORK_DIR"]))  # fmt: skip
    print(f"    job {job['wall_s']:.1f} s", flush=True)
    floors.append(s3_floor(env["COREMERGE_S3_ENDPOINT_URL"], keys, total, settings))
    print(f"    floor {floors[1]['wall_s']:.1f} s", flush=True)
    floor_s = statistics.mean(f["wall_s"] for f in floors)
    return {"inputs": inputs.workload.__dict__, "input_bytes": total, "adapters": len(uris),
            "floor": floors, "floor_s": floor_s, "job": job,
            "time_ratio": job["wall_s"] / floor_s,
            "disk_share": job["peak_disk_bytes"] / total,
            "rss_share": job["rss_less_startup_bytes"] / total,
            "worker_settings": {k: v for k, v in env.items() if k.startswith("COREMERGE_S3_")},
            "load_average_end": os.getloadavg()}  # fmt: skip


# -- orchestration --------------------------------------------------------------------------------


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def worker_count(redis_url: str, queue: str) -> int:
    from redis import Redis
    from rq import Queue, Worker

    return Worker.count(queue=Queue(queue, connection=Redis.from_url(redis_url)))


def cleanup_redis(redis_url: str, prefix: str, queue: str) -> None:
    """Remove everything this run left in Redis: its job records (``prefix``) and RQ's keys
    for its queue and for the jobs that ran on it (their ids are not in the queue's name)."""
    from redis import Redis
    from rq import Queue
    from rq.serializers import JSONSerializer

    r = Redis.from_url(redis_url)
    Queue(queue, connection=r, serializer=JSONSerializer).empty()
    ids = {
        key.decode().removeprefix("rq:job:")
        for key in r.scan_iter(match="rq:job:*", count=1000)
        if r.hget(key, "origin") == queue.encode()
    }
    doomed = list(r.scan_iter(match=f"{prefix}:*", count=1000))

    def ours(key: bytes) -> bool:
        text = key.decode()
        if queue in text or any(i in text for i in ids):
            return True
        # a stopped worker's registration (kept by RQ until it expires)
        is_worker = text.startswith("rq:worker:") and r.type(key) == b"hash"
        return is_worker and r.hget(key, "queues") == queue.encode()

    doomed += [key for key in r.scan_iter(match="rq:*", count=1000) if ours(key)]
    for i in range(0, len(doomed), 500):
        r.delete(*doomed[i : i + 500])
    r.srem("rq:queues", f"rq:queue:{queue}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of measured load")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=8, help="connections in all")
    p.add_argument("--processes", type=int, default=1, help="load-generator processes")
    p.add_argument("--e2e-runs", type=int, default=5)
    p.add_argument("--storage", choices=("s3", "file"), default="s3")
    p.add_argument(
        "--profile",
        choices=("service", "stream"),
        default="service",
        help="service: (a) and (b); stream: (c), big S3 inputs read as merged",
    )
    p.add_argument("--layers", type=int, default=32, help="stream: Llama-3-8B layers (of 32)")
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="COREMERGE_X=V",
        help="a setting for the worker (and the floor), repeatable",
    )
    p.add_argument("--skip-api", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--quiet-wait", type=float, default=30.0,
                   help="wait up to this long for other processes to leave the CPUs")  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    opts = p.parse_args()
    if opts.profile == "stream":
        opts.storage, opts.skip_api, opts.skip_e2e = "s3", True, True
    return opts


def service_env(opts: argparse.Namespace, name: str, tmp: Path, port: int) -> dict[str, str]:
    """The API's and the worker's environment: this run's Redis prefix and queue, a tenants
    file with the bench key, quotas lifted, a work folder of its own."""
    from jobs.tenants import hash_key

    tenants = tmp / "tenants.json"
    tenants.write_text(json.dumps({"tenants": {"bench": {
        "keys_sha256": [hash_key(API_KEY)], "allow": ["s3://bench-adapters/", "s3://bench-merged/",
                                                      f"file://{tmp}/"]}}}))  # fmt: skip
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("COREMERGE_")},
        "COREMERGE_REDIS_URL": opts.redis_url,
        "COREMERGE_KEY_PREFIX": name,
        "COREMERGE_QUEUE": name,
        "COREMERGE_TENANTS_FILE": str(tenants),
        "COREMERGE_ALLOW_FILE_URIS": "true",
        "COREMERGE_DEVICE": "cpu",
        "COREMERGE_LOG_LEVEL": "WARNING",
        # The benchmark measures throughput, not the per-tenant quotas: lift them.
        "COREMERGE_MAX_ACTIVE_JOBS": "1000000",
        "COREMERGE_SUBMITS_PER_MINUTE": "1000000",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "COREMERGE_WORK_DIR": str(tmp / "work"),
        "BENCH_PORT": str(port),
    }
    env.update(dict(item.split("=", 1) for item in opts.worker_env))
    (tmp / "work").mkdir()
    if opts.profile == "stream":
        # Objects stay in moto's memory (its default spools those over 5 MiB to temporary
        # files), for the floor and the job alike.
        env["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(1 << 30)
    return env


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench",
                        aws_secret_access_key="bench", region_name="us-east-1")  # fmt: skip


def upload_adapters(s3: Any, dirs: list[Path], prefix: str) -> list[str]:
    """Each adapter folder to ``s3://bench-adapters/<prefix>-<i>/``; their URIs."""
    uris = []
    for i, d in enumerate(dirs):
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            s3.upload_file(str(d / f), "bench-adapters", f"{prefix}-{i}/{f}")
        uris.append(f"s3://bench-adapters/{prefix}-{i}/")
    return uris


def start_moto(env: dict[str, str], tmp: Path, procs: list[subprocess.Popen]) -> Any:
    """moto's S3 server on a free loopback port (its URL into ``env``), the two buckets made;
    an S3 client for it."""
    import httpx

    mport = free_port()
    env["COREMERGE_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{mport}"
    moto = start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(mport)],
                 env, tmp / "moto.log")  # fmt: skip
    procs.append(moto)
    wait_until(lambda: httpx.get(env["COREMERGE_S3_ENDPOINT_URL"]).status_code < 500,
               "moto", proc=moto)  # fmt: skip
    s3 = s3_client(env["COREMERGE_S3_ENDPOINT_URL"])
    s3.create_bucket(Bucket="bench-adapters")
    s3.create_bucket(Bucket="bench-merged")
    return s3


def main() -> int:
    opts = parse_args()
    name = f"bench{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="coremerge-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = service_env(opts, name, tmp, port)
    procs: list[subprocess.Popen] = []
    results: dict[str, Any] = {"created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                               "machine": machine_info(), "options": {
                                   k: str(v) for k, v in vars(opts).items()}}  # fmt: skip
    try:
        from worker.demo import DEMO_ADAPTERS, make_tiny_adapters

        dirs = make_tiny_adapters(tmp / "adapters", DEMO_ADAPTERS)
        if opts.storage == "s3":
            uris = upload_adapters(start_moto(env, tmp, procs), dirs, "task")
            out_uri = "s3://bench-merged/run/"
        else:
            uris = [f"file://{d}" for d in dirs]
            out_uri = f"file://{tmp}/merged/"
        spec = {"adapters": [{"uri": u} for u in uris], "method": "tsv",
                "output": {"uri": out_uri}}  # fmt: skip
        api = start([sys.executable, "-m", "worker.cli", "serve", "--port", str(port)], env,
                    tmp / "api.log")  # fmt: skip
        procs.append(api)
        import httpx

        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, "API", proc=api)
        run_parts(opts, env, spec, dirs, tmp, procs, results)
    finally:
        for proc in reversed(procs):
            stop(proc)
        cleanup_redis(opts.redis_url, name, name)
        shutil.rmtree(tmp, ignore_errors=True)

    return report(results, opts.out)


def run_parts(
    opts: argparse.Namespace,
    env: dict[str, str],
    spec: dict,
    dirs: list[Path],
    tmp: Path,
    procs: list[subprocess.Popen],
    results: dict[str, Any],
) -> None:
    """(a), (b) or (c) against the running API, each part's figures into ``results``."""
    url, name = f"http://127.0.0.1:{env['BENCH_PORT']}", env["COREMERGE_QUEUE"]
    if not opts.skip_api:
        _, busy = wait_for_quiet(opts.quiet_wait)
        print(f"(a) API load: {opts.duration:.0f} s, {opts.concurrency} connections, "
              f"no worker (CPU busy before: {busy or 0:.0%})", flush=True)  # fmt: skip
        results["api"] = api_throughput(url, spec, opts)
        results["api"]["cpu_busy_before"] = busy
        cleanup_redis(opts.redis_url, name, name)
    if not opts.skip_e2e:
        worker = start([sys.executable, "-m", "worker.cli", "worker"], env, tmp / "worker.log")
        procs.append(worker)
        wait_until(lambda: worker_count(opts.redis_url, name) > 0, "worker", proc=worker)
        _, busy = wait_for_quiet(opts.quiet_wait)
        print(f"(b) end to end: {opts.e2e_runs} small merges, {opts.storage} storage "
              f"(CPU busy before: {busy or 0:.0%})", flush=True)  # fmt: skip
        results["e2e"] = e2e(url, spec, opts.e2e_runs)
        results["cli"] = cli_merge(dirs, opts.e2e_runs, tmp)
        results["e2e"]["overhead_s"] = results["e2e"]["median_s"] - results["cli"]["median_s"]
        results["e2e"]["ratio"] = results["e2e"]["median_s"] / results["cli"]["median_s"]
    if opts.profile == "stream":
        results["load_average_start"] = os.getloadavg()
        results["stream"] = run_stream(opts, env, tmp, procs)


def report(results: dict[str, Any], out: Path) -> int:
    checks = []
    if "stream" in results:
        checks += report_stream(results)
    if "api" in results:
        a = results["api"]
        ms = lambda x: f"{x * 1000:.1f} ms" if x is not None else "-"  # noqa: E731
        print(f"\n{'API (workers stopped)':<34}{'value':>14}")
        print(f"{'accepted jobs/s (POST + GET)':<34}{a['jobs_per_s']:>14.0f}")
        print(
            f"{'POST /merges p50 / p99':<34}{ms(a['post_p50_s']) + ' / ' + ms(a['post_p99_s']):>24}"
        )
        print(
            f"{'GET /merges/{id} p50 / p99':<34}{ms(a['get_p50_s']) + ' / ' + ms(a['get_p99_s']):>24}"
        )
        print(f"{'errors':<34}{sum(a['errors'].values()):>14}  {a['errors'] or ''}")
        checks += [
            (f"≥ {TARGET_JOBS_PER_S} accepted jobs/s", a["jobs_per_s"] >= TARGET_JOBS_PER_S),
            ("p99 < 50 ms (POST and GET)",
             max(a["post_p99_s"] or 1, a["get_p99_s"] or 1) < TARGET_P99_S),
            ("no errors", not a["errors"]),
        ]  # fmt: skip
    if "e2e" in results:
        e, c = results["e2e"], results["cli"]
        print(f"\n{'small merge (3 adapters, tsv)':<34}{'median':>14}")
        print(f"{'service: submit → succeeded':<34}{e['median_s']:>13.3f}s")
        print(f"{'  of which the worker':<34}{e['worker_seconds_median']:>13.3f}s")
        print(f"{'coremerge merge (fresh process)':<34}{c['median_s']:>13.3f}s")
        print(f"{'  of which run_merge':<34}{c['run_merge_median_s']:>13.3f}s")
        print(f"{'overhead (service − CLI)':<34}{e['overhead_s']:>13.3f}s   ratio {e['ratio']:.2f}")
        print(f"{'queue + HTTP + polling':<34}{e['median_s'] - e['worker_seconds_median']:>13.3f}s"
              "   (service − the worker's own time)")  # fmt: skip
        checks.append((f"overhead < {TARGET_OVERHEAD_S} s", e["overhead_s"] < TARGET_OVERHEAD_S))
    print()
    for what, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
    results["checks"] = {what: ok for what, ok in checks}
    path = out / f"service-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    write_json(path, results)
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0 if all(ok for _, ok in checks) else 1


def report_stream(results: dict[str, Any]) -> list[tuple[str, bool]]:
    """Print (c), write ``bench/results/service-stream-latest.{json,md}``, return its checks."""
    r = results["stream"]
    job, gib = r["job"], r["input_bytes"] / 2**30
    rows = [
        ("inputs (8 adapters, S3)", f"{gib:.2f} GiB", ""),
        ("S3 floor (GET all inputs ∥ PUT same size)",
         " / ".join(f"{f['wall_s']:.1f} s" for f in r["floor"]), "before / after the job"),
        ("served job: submit → succeeded", f"{job['wall_s']:.1f} s",
         f"{r['time_ratio']:.2f}× the floor (target ≤ {TARGET_FLOOR_RATIO})"),
        ("worker peak disk (attempt folders)", f"{job['peak_disk_bytes'] / 2**10:.0f} KiB",
         f"{100 * r['disk_share']:.3f} % of inputs (target ≤ {100 * TARGET_DISK_SHARE:.0f} %)"),
        ("work horse peak RSS − worker RSS before",
         f"{job['rss_less_startup_bytes'] / MiB:.0f} MiB",
         f"{100 * r['rss_share']:.1f} % of inputs (target ≤ {100 * TARGET_RSS_SHARE:.0f} %)"),
        ("output (merged, S3)", f"{job['output_bytes'] / 2**30:.2f} GiB", ""),
    ]  # fmt: skip
    lines = ["| measure | value | against |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    print("\n".join(lines))
    checks = [
        (
            f"streamed job ≤ {TARGET_FLOOR_RATIO}× the S3 floor",
            r["time_ratio"] <= TARGET_FLOOR_RATIO,
        ),
        (f"peak disk ≤ {TARGET_DISK_SHARE:.0%} of inputs", r["disk_share"] <= TARGET_DISK_SHARE),
        (f"RSS − start-up ≤ {TARGET_RSS_SHARE:.0%} of inputs", r["rss_share"] <= TARGET_RSS_SHARE),
    ]
    machine = results["machine"]
    md = [
        "# Service benchmark: streamed S3 inputs (issue 16, item 1)",
        "",
        f"- **Run**: {results['created_at']}, `bench/service.py --profile stream --layers "
        f"{r['inputs']['layers']}`; load average {results['load_average_start']} at start, "
        f"{r['load_average_end']} at end (another job shares the CPUs: compare ratios).",
        f"- **Machine**: {machine.get('cpu', machine.get('cpu_model', ''))}, "
        f"{machine.get('cpus', machine.get('cpu_count', ''))} CPUs.",
        "- **Job**: 8 LoRA adapters of rank 16 on Llama-3-8B shapes (float32), core `ta`, "
        "output to S3 (float32, rank 128), one worker, moto's S3 server on loopback.",
        f"- **Worker S3 settings**: {r['worker_settings'] or 'defaults'}.",
        "",
        *lines,
        "",
        *(f"- **{'PASS' if ok else 'FAIL'}** {what}" for what, ok in checks),
        "",
    ]
    target = ROOT / "bench" / "results" / "service-stream-latest"
    write_json(target.with_suffix(".json"), results)
    target.with_suffix(".md").write_text("\n".join(md))
    return checks


if __name__ == "__main__":
    sys.exit(main())
