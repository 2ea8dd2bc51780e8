"""Real processes for the integration and soak tests, written once: moto's S3 server, a Redis
server of a test's own (with AOF, to restart it), the API and killable workers.

Every process is started here and stopped by its pid; a worker is started in a process group
of its own, so a test can ``kill -9`` the whole worker, parent and work horse (which RQ puts in
a process group of its own too), as a node preemption or the OOM killer would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "worker.cli"]
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, what: str, timeout: float = 30.0, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        try:
            result = check()
        except Exception:
            result = None
        if result:
            return result
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not ready after {timeout} s")


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (from /proc; Linux)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process started here: its descendants first, then itself."""
    for child in children(proc.pid):
        for grandchild in children(child):
            _kill(grandchild)
        _kill(child)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start(
    args: list[str], env: dict[str, str], log: Path, *, own_group: bool = False
) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, process_group=0 if own_group else None,
        )  # fmt: skip


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """moto's S3 server on loopback; yields its URL."""
    port = free_port()
    proc = start(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        {**os.environ, **AWS_ENV},
        log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url, timeout=1).status_code < 500, "moto", proc=proc)
        yield url
    finally:
        stop(proc)


class RedisServer:
    """A ``redis-server`` of a test's own on a free loopback port, persisting to ``dir`` with
    AOF (``appendfsync always``: an accepted job survives even a ``kill -9`` of Redis), so it
    can be killed and started again with its data; with ``persist=False`` it keeps nothing on
    disk (the test session's own Redis, ``tests/redis_db.py``)."""

    def __init__(self, dir: Path, password: str | None = None, *, persist: bool = True) -> None:
        self.dir = dir
        self.port = free_port()
        self.password = password  # requirepass, when given
        self.persist = persist
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", str(self.dir), "--save", "", "--maxmemory-policy", "noeviction"]  # fmt: skip
        if self.persist:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.proc = start(args, dict(os.environ), self.dir / "redis.log")
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=1)
        wait_until(client.ping, "redis-server", 10, proc=self.proc)

    def kill(self) -> None:
        """``kill -9``: no shutdown, no final save; what survives is what AOF wrote."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop(self.proc)


def start_api(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """``coremerge serve`` on a free port; returns the process and its URL once ready."""
    port = free_port()
    proc = start([*CLI, "serve", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, "API", 30, proc)
    return proc, url


class Workers:
    """``coremerge worker`` processes, each in a process group of its own, that a test can
    kill with ``kill -9`` (parent and work horse) and start again."""

    def __init__(self, env: dict[str, str], logs: Path, count: int, name: str = "w") -> None:
        self.env, self.logs, self.name = env, logs, name
        self.procs: list[subprocess.Popen | None] = [None] * count
        self.log_of: list[Path] = [logs / "none"] * count
        self.started = 0

    def start(self, i: int, *, wait: bool = True) -> subprocess.Popen:
        self.started += 1
        log = self.logs / f"{self.name}{i}-{self.started}.log"
        proc = start(
            [*CLI, "worker", "--name", f"{self.name}{i}-{self.started}-{os.getpid()}"],
            self.env, log, own_group=True,
        )  # fmt: skip
        self.procs[i] = proc
        self.log_of[i] = log
        if wait:
            self.wait_ready(i)
        return proc

    def wait_ready(self, i: int, timeout: float = 90) -> None:
        log, proc = self.log_of[i], self.procs[i]
        wait_until(lambda: "Listening on" in log.read_text(errors="replace"),
                   f"worker {i}", timeout, proc)  # fmt: skip

    def start_all(self) -> None:
        for i in range(len(self.procs)):
            self.start(i, wait=False)
        for i in range(len(self.procs)):
            self.wait_ready(i)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(
            f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
            for log in sorted(self.logs.glob(f"{self.name}*.log"))
        )

    def is_up(self, i: int) -> bool:
        """Worker ``i`` runs and has started listening on its queue."""
        proc = self.procs[i]
        if proc is None or proc.poll() is not None:
            return False
        return "Listening on" in self.log_of[i].read_text(errors="replace")

    def horse(self, i: int) -> int | None:
        """The pid of worker ``i``'s work horse, if it is running a job."""
        proc = self.procs[i]
        kids = children(proc.pid) if proc is not None else []
        return kids[0] if kids else None

    def kill(self, i: int) -> bool:
        """``kill -9`` worker ``i``'s process group and its work horse's; True if it was
        running a job."""
        proc = self.procs[i]
        assert proc is not None
        horse = self.horse(i)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if horse is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(horse, signal.SIGKILL)
            _kill(horse)
        proc.wait()
        return horse is not None

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc is not None:
                stop(proc)
