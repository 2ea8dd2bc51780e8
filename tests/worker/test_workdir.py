"""Scratch folders of dead attempts are swept; a running job's folder stays."""

from __future__ import annotations

from pathlib import Path

from worker.workdir import ATTEMPT_PREFIX, sweep_attempts, sweep_dead_attempts

A, B = "a" * 32, "b" * 32


def _attempt(root: Path, job_id: str, suffix: str) -> Path:
    folder = root / f"{ATTEMPT_PREFIX}{job_id}-{suffix}"
    (folder / "inputs").mkdir(parents=True)
    (folder / "inputs" / "weights").write_bytes(b"\0" * 1024)
    return folder


def test_a_dead_attempt_of_a_job_is_swept(tmp_path: Path) -> None:
    _attempt(tmp_path, A, "x1"), _attempt(tmp_path, A, "x2")
    other = _attempt(tmp_path, B, "y")
    assert sweep_attempts(tmp_path, A) == 2
    assert [p.name for p in tmp_path.iterdir()] == [other.name]


def test_at_start_up_only_jobs_not_running_are_swept(tmp_path: Path) -> None:
    _attempt(tmp_path, A, "x")
    running = _attempt(tmp_path, B, "y")
    unrelated = tmp_path / "coremerge-not-a-job"
    unrelated.mkdir()
    assert sweep_dead_attempts(tmp_path, running=lambda job_id: job_id == B) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, unrelated.name])
