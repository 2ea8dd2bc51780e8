"""The worker's local scratch space: one folder per attempt of a job, swept when it is dead.

An attempt downloads its inputs and stages its output in ``<work_dir>/coremerge-<job>-*``
and removes it when it ends; an attempt whose work horse was killed (``kill -9``, the
out-of-memory killer) runs no clean-up, so the worker sweeps what it left: right after the
death, at start-up, and when the job runs again. Torch-free: the worker's parent uses it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["ATTEMPT_PREFIX", "attempt_job_id", "sweep_attempts", "sweep_dead_attempts"]

ATTEMPT_PREFIX = "coremerge-"


def _root(work_dir: Path | None) -> Path:
    return Path(work_dir or tempfile.gettempdir())


def attempt_job_id(folder: Path) -> str | None:
    """The job id in an attempt folder's name (``coremerge-<32 hex>-<random>``), or None."""
    name = folder.name.removeprefix(ATTEMPT_PREFIX)
    job_id = name.partition("-")[0]
    if not folder.name.startswith(ATTEMPT_PREFIX) or len(job_id) != 32:
        return None
    return job_id


def sweep_attempts(work_dir: Path | None, job_id: str) -> int:
    """Remove every attempt folder of ``job_id``; returns how many there were."""
    folders = list(_root(work_dir).glob(f"{ATTEMPT_PREFIX}{job_id}-*"))
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return len(folders)


def sweep_dead_attempts(work_dir: Path | None, running: Callable[[str], bool]) -> int:
    """At start-up: remove the attempt folders of every job that is not ``running`` (a
    sibling worker sharing the folder keeps the one it is using)."""
    swept = 0
    for folder in _root(work_dir).glob(f"{ATTEMPT_PREFIX}*"):
        job_id = attempt_job_id(folder)
        if job_id is not None and folder.is_dir() and not running(job_id):
            shutil.rmtree(folder, ignore_errors=True)
            swept += 1
    return swept
