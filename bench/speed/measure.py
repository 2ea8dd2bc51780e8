"""Timed child processes on a shared machine: peak RSS, quiet-wait, contention, best of N.

Every timed step runs as a fresh subprocess, so interpreter and library start-up count the
same for all of them. :func:`run_measured` times it (wall clock, from spawn to reap) and
records its memory: ``/proc/<pid>/status`` is polled every ``interval`` seconds (RSS split
into anonymous and file-backed pages, the latter being memory-mapped inputs; ``VmHWM`` is the
child's own high-water mark, so a short spike between two polls is not missed), and the CPU
time other processes used meanwhile (``/proc/stat`` less the child's own) is kept as the
step's contention. :class:`Runner` waits for quiet CPUs before each step; :class:`Attempts`
keeps every attempt of a row and picks the fastest uncontended one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
NPROC = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fresh(path: Path) -> Path:
    """``path`` with nothing at it (a previous run's file or folder removed)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    return path


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


def contention(m: Measured) -> float:
    """Share of all CPUs' time that other processes used while ``m`` ran."""
    return (m.other_cpu_s or 0.0) / (max(m.wall_s, 1e-9) * NPROC)


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


def proc_status(pid: int) -> dict[str, int] | None:
    """VmRSS, VmHWM, RssAnon, RssFile in bytes from /proc (Linux); None once the child is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read()
    except OSError:  # gone (or going) already, or not ours to read
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
                status = proc_status(self.pid)
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


@dataclass
class Attempts:
    """Every attempt of one row; ``best`` is the fastest of the uncontended ones.

    An attempt is *clean* when other processes used at most ``max_contention`` of the CPUs
    while it ran; when none is, ``best`` is the fastest of all and ``contended`` is true.
    """

    max_contention: float = 1.0
    runs: list[tuple[Measured, dict[str, Any]]] = field(default_factory=list)

    def add(self, m: Measured, info: dict[str, Any]) -> None:
        self.runs.append((m, info))

    @property
    def clean(self) -> list[tuple[Measured, dict[str, Any]]]:
        return [r for r in self.runs if contention(r[0]) <= self.max_contention]

    @property
    def best(self) -> tuple[Measured, dict[str, Any]]:
        return min(self.clean or self.runs, key=lambda r: r[0].wall_s)

    @property
    def contended(self) -> bool:
        return bool(self.runs) and not self.clean

    def summary(self) -> list[dict[str, float]]:
        return [
            {"wall_s": round(m.wall_s, 3), "other_cpu_share": round(contention(m), 3)}
            for m, _ in self.runs
        ]


class Runner:
    """Runs measured children from the repository root, each after a short quiet-wait."""

    def __init__(
        self,
        root: Path,
        quiet_wait: float,
        timeout: float,
        env: dict[str, str],
        max_contention: float = 1.0,
        extra_attempts: int = 0,
    ):
        self.root, self.quiet_wait, self.timeout = root, quiet_wait, timeout
        self.env = env
        self.max_contention, self.extra_attempts = max_contention, extra_attempts
        self.quiet_log: list[dict[str, Any]] = []

    def settle(self, step: str) -> None:
        """Flush the previous step's writes; wait (briefly) for other processes to calm down."""
        if hasattr(os, "sync"):
            os.sync()
        waited, busy = wait_for_quiet(self.quiet_wait)
        self.quiet_log.append(
            {
                "step": step,
                "waited_s": round(waited, 1),
                "busy_before": None if busy is None else round(busy, 3),
            }
        )
        if busy is not None and busy > 0.15:
            log(f"  {step}: CPUs still {100 * busy:.0f}% busy after {waited:.0f} s; timing anyway")

    def run(
        self, step: str, argv: list[str], json_path: Path | None = None
    ) -> tuple[Measured, dict[str, Any]]:
        """One attempt: the child's measurement and the JSON it wrote (or its last stdout line)."""
        self.settle(step)
        if json_path is not None:
            fresh(json_path)
        m = run_measured(argv, cwd=self.root, env=self.env, timeout=self.timeout).check(step)
        if json_path is not None:
            info = json.loads(json_path.read_text())
        else:
            lines = m.stdout.strip().splitlines()
            try:
                info = json.loads(lines[-1]) if lines else {}
            except json.JSONDecodeError:
                info = {}
        log(
            f"  {step}: {m.wall_s:.2f} s, peak RSS {m.peak_rss / MiB:.0f} MiB, "
            f"{100 * contention(m):.0f}% CPU elsewhere"
        )
        return m, info

    def attempts(self) -> Attempts:
        return Attempts(self.max_contention)

    def until_clean(
        self,
        attempt: Callable[[], tuple[Measured, dict[str, Any]] | None],
        repeat: int,
        extra: int | None = None,
    ) -> Attempts:
        """Call ``attempt`` until ``repeat`` clean runs, or ``repeat + extra`` calls in all.

        ``attempt`` returns a measurement and its info, or None when it failed or does not
        apply (the attempts so far are then returned).
        """
        extra = self.extra_attempts if extra is None else extra
        att = self.attempts()
        for i in range(max(1, repeat) + max(0, extra)):
            got = attempt()
            if got is None:
                break
            att.add(*got)
            if len(att.clean) >= max(1, repeat):
                break
            if contention(got[0]) > self.max_contention and i + 1 < max(1, repeat) + extra:
                log(f"  contended run ({100 * contention(got[0]):.0f}% CPU elsewhere); again")
        return att
