"""The RQ internals that coremerge overrides are still called by the RQ installed: a rename
in a new RQ release would silently switch an override off (a dead worker's job abandoned
after RQ's own 60 s margin, a 15-minute maintenance lock, a record left queued for ever)."""

from __future__ import annotations

import inspect
from importlib.metadata import version
from pathlib import Path

import rq
from rq import Queue, Worker

from jobs.queue import MergeQueue
from worker.rq_worker import MergeWorker


def test_rq_is_the_pinned_major_version() -> None:
    assert version("rq").split(".")[0] == "3"


def test_every_overridden_hook_exists_in_rq_with_the_same_signature() -> None:
    for ours, theirs, name in [
        (MergeWorker, Worker, "handle_job_failure"),
        (MergeWorker, Worker, "get_heartbeat_ttl"),
        (MergeQueue, Queue, "acquire_maintenance_lock"),
    ]:
        assert name in vars(ours), name
        base = getattr(theirs, name)
        assert list(inspect.signature(getattr(ours, name)).parameters) == list(
            inspect.signature(base).parameters
        ), name


def test_rq_calls_the_overridden_hooks() -> None:
    package = Path(rq.__file__).parent
    source = "".join(p.read_text() for p in package.rglob("*.py"))
    for call in (".handle_job_failure(", ".get_heartbeat_ttl(", ".acquire_maintenance_lock("):
        assert call in source, f"RQ no longer calls {call}"
