"""Shared pieces of the benchmarks: measured subprocesses and a description of the machine.

Every timed step runs as a fresh subprocess, so interpreter and library start-up count the
same for all of them. :func:`run_measured` times it (wall clock, from spawn to reap) and
records its memory: ``/proc/<pid>/status`` is polled every ``interval`` seconds (RSS split
into anonymous and file-backed pages, the latter being memory-mapped inputs) and the kernel's
own high-water mark (``ru_maxrss`` from ``wait4``) is taken at exit, so a short spike between
two polls is not missed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "GiB",
    "Measured",
    "MiB",
    "machine_info",
    "run_measured",
    "wait_for_quiet",
    "write_json",
]

MiB = 1 << 20
GiB = 1 << 30

_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Measured:
    """One measured subprocess."""

    argv: list[str]
    returncode: int
    wall_s: float
    peak_rss: int  # bytes: the child's VmHWM (polled; also ≥ every polled VmRSS)
    peak_anon: int  # bytes: largest polled RssAnon (heap, tensors)
    peak_file: int  # bytes: largest polled RssFile (mapped files: libraries, mmapped inputs)
    ru_maxrss: int  # bytes: the kernel's figure from wait4 (see run_measured)
    samples: int
    child_cpu_s: float  # user + system CPU time of the child
    machine_busy_cpu_s: float | None  # all CPUs' busy time over the run (/proc/stat)
    stdout: str = field(repr=False)
    stderr: str = field(repr=False)

    @property
    def other_cpu_s(self) -> float | None:
        """CPU time spent by other processes during the run: contention on a shared machine."""
        if self.machine_busy_cpu_s is None:
            return None
        return max(0.0, self.machine_busy_cpu_s - self.child_cpu_s)

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["stdout"] = self.stdout[-4000:]
        d["stderr"] = self.stderr[-4000:]
        d["other_cpu_s"] = self.other_cpu_s
        return d

    def check(self, what: str) -> Measured:
        """Raise with the child's stderr when it failed."""
        if self.returncode != 0:
            tail = (self.stderr or self.stdout).strip()[-3000:]
            raise RuntimeError(f"{what} failed with exit status {self.returncode}:\n{tail}")
        return self


def _busy_cpu_s() -> float | None:
    """Busy (non-idle, non-iowait) CPU seconds of the whole machine since boot."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest time is already counted in user
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(
    max_wait: float, threshold: float = 0.15, window: float = 1.0
) -> tuple[float, float | None]:
    """Wait until the machine's CPUs are at most ``threshold`` busy over ``window`` seconds.

    On a shared machine other people's jobs come and go; a benchmark step started during one
    measures the contention, not the code. Gives up after ``max_wait`` seconds. Returns the
    seconds waited and the last busy fraction seen (None where /proc/stat is missing).
    """
    t0 = time.monotonic()
    ncpu = os.cpu_count() or 1
    while True:
        a = _busy_cpu_s()
        time.sleep(window)
        b = _busy_cpu_s()
        if a is None or b is None:
            return time.monotonic() - t0, None
        busy = (b - a) / (window * ncpu)
        waited = time.monotonic() - t0
        if busy <= threshold or waited >= max_wait:
            return waited, busy


def _proc_status(pid: int) -> dict[str, int] | None:
    """VmRSS, VmHWM, RssAnon, RssFile in bytes from /proc (Linux); None once the child is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(b":")
        if key in (b"VmRSS", b"VmHWM", b"RssAnon", b"RssFile"):
            out[key.decode()] = int(rest.split()[0]) * 1024  # kB
    return out or None


class _Poller(threading.Thread):
    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.done = threading.Event()
        self.peak = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0, "RssFile": 0}
        self.samples = 0
        self.use_proc = Path("/proc/self/status").exists()

    def run(self) -> None:
        proc = None
        if not self.use_proc:  # macOS and friends: RSS only, through psutil
            import psutil

            try:
                proc = psutil.Process(self.pid)
            except psutil.Error:
                return
        while not self.done.is_set():
            if proc is None:
                status = _proc_status(self.pid)
            else:
                try:
                    status = {"VmRSS": proc.memory_info().rss}
                except Exception:
                    status = None
            if status is not None:
                self.samples += 1
                for k, v in status.items():
                    self.peak[k] = max(self.peak[k], v)
            self.done.wait(self.interval)


def run_measured(
    argv: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    interval: float = 0.01,
    timeout: float | None = None,
) -> Measured:
    """Run ``argv`` to completion; wall time, peak RSS and captured output.

    Peak RSS is the child's own high-water mark (VmHWM) as last polled. ``ru_maxrss`` is kept
    for reference only: Linux folds the *parent's* high-water mark into it when the child is
    spawned by vfork + exec (as ``subprocess`` does), so a large parent inflates it.
    """
    busy0 = _busy_cpu_s()
    with (
        tempfile.TemporaryFile("w+b") as out,
        tempfile.TemporaryFile("w+b") as err,
    ):
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True
        )
        poller = _Poller(proc.pid, interval)
        poller.start()
        timer = None
        if timeout is not None:
            timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
            timer.start()
        try:
            # wait4 gives the child's own high-water mark; Popen.wait() would not.
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            wall = time.perf_counter() - t0
            poller.done.set()
            if timer is not None:
                timer.cancel()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        busy1 = _busy_cpu_s()
        maxrss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    return Measured(
        argv=[str(a) for a in argv],
        returncode=proc.returncode,
        wall_s=wall,
        peak_rss=max(poller.peak["VmRSS"], poller.peak["VmHWM"]) or maxrss,
        peak_anon=poller.peak["RssAnon"],
        peak_file=poller.peak["RssFile"],
        ru_maxrss=maxrss,
        samples=poller.samples,
        child_cpu_s=usage.ru_utime + usage.ru_stime,
        machine_busy_cpu_s=None if busy0 is None or busy1 is None else busy1 - busy0,
        stdout=stdout,
        stderr=stderr,
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _gpu_names() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine_info() -> dict[str, Any]:
    """What the figures were measured on (nothing here imports torch)."""
    import psutil

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "nproc": affinity,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "ram_total_bytes": psutil.virtual_memory().total,
        "ram_total_gib": round(psutil.virtual_memory().total / GiB, 1),
        "gpus": _gpu_names(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "safetensors": _version("safetensors"),
        "peft": _version("peft"),
        "coremerge": _version("coremerge"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def fresh(path: Path) -> Path:
    """``path`` with nothing at it (a previous run's file or folder removed)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    return path


def project_state() -> dict[str, Any]:
    """The commit measured and any uncommitted change to the code the benchmarks run."""

    def git(*a: str) -> str:
        done = subprocess.run(["git", *a], cwd=_ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    dirty = git("status", "--porcelain", "--", "worker", "service", "pyproject.toml")
    return {"commit": git("rev-parse", "HEAD") or None, "uncommitted": dirty.splitlines()}
