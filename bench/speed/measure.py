"""Timed child processes on a shared machine: quiet-wait, contention share, best of N.

Wraps ``bench._common.run_measured`` (wall clock from spawn to reap, peak RSS polled from
/proc, CPU time other processes used meanwhile). Each call is one attempt; the run keeps every
attempt's wall time and contention and the fastest attempt's figures.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import Measured, MiB, fresh, run_measured, wait_for_quiet

NPROC = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def contention(m: Measured) -> float:
    """Share of all CPUs' time that other processes used while ``m`` ran."""
    return (m.other_cpu_s or 0.0) / (max(m.wall_s, 1e-9) * NPROC)


@dataclass
class Attempts:
    """Every attempt of one row; ``best`` is the fastest (the least disturbed) one."""

    runs: list[tuple[Measured, dict[str, Any]]] = field(default_factory=list)

    def add(self, m: Measured, info: dict[str, Any]) -> None:
        self.runs.append((m, info))

    @property
    def best(self) -> tuple[Measured, dict[str, Any]]:
        return min(self.runs, key=lambda r: r[0].wall_s)

    def summary(self) -> list[dict[str, float]]:
        return [
            {"wall_s": round(m.wall_s, 3), "other_cpu_share": round(contention(m), 3)}
            for m, _ in self.runs
        ]


class Runner:
    """Runs measured children from the repository root, each after a short quiet-wait."""

    def __init__(self, root: Path, quiet_wait: float, timeout: float, env: dict[str, str]):
        self.root, self.quiet_wait, self.timeout = root, quiet_wait, timeout
        self.env = env
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
