"""The publishing protocol (worker/storage/publish.py) against an in-memory store: nothing a
job did not write is ever overwritten or deleted, only the claim holder writes, and a lost
answer to the report's PUT is not a failure."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from jobs.errors import Canceled, OutputExists, StorageError
from jobs.spec import MergeSpec
from worker.runner import run_merge
from worker.storage import (
    CLAIM_NAME,
    CONFIG_NAME,
    JOB_ID_META,
    REPORT_NAME,
    RUN_META,
    WEIGHTS_NAME,
    MemoryStore,
    Storage,
)
from worker.storage.publish import OutputPublisher, remove_run_leftovers

OUT = "merged/run/"


def merged_dir(tmp_path: Path) -> Path:
    out = tmp_path / "merged"
    out.mkdir()
    (out / CONFIG_NAME).write_text("{}")
    (out / WEIGHTS_NAME).write_bytes(b"\0" * 64)
    (out / REPORT_NAME).write_text('{"output": {"rank": 4}}')
    return out


def publisher(store: MemoryStore, job: str = "job-1", run: str = "run-1", **kw) -> OutputPublisher:
    return OutputPublisher(store, OUT, "mem://merged/run/", job_id=job, run=run, **kw)


def test_publishes_under_a_claim_with_the_report_last(tmp_path: Path) -> None:
    store = MemoryStore()
    p = publisher(store)
    assert p.prepare() is None
    assert store.head(OUT + CLAIM_NAME).metadata == {JOB_ID_META: "job-1", RUN_META: "run-1"}
    p.publish(merged_dir(tmp_path))
    p.release()
    assert store.list(OUT) == sorted(OUT + n for n in (CONFIG_NAME, WEIGHTS_NAME, REPORT_NAME))
    assert publisher(store, run="run-2").prepare() is not None  # published: nothing to do


def test_an_object_the_job_did_not_write_ends_it_before_anything_is_written() -> None:
    store = MemoryStore()
    store.create(OUT + "notes.txt", b"a tenant's file", {})
    with pytest.raises(OutputExists, match=r"notes\.txt"):
        publisher(store).prepare()
    assert store.list(OUT) == [OUT + "notes.txt"]
    assert store.read(OUT + "notes.txt") == b"a tenant's file"


def test_a_store_that_ignores_conditional_writes_is_refused(tmp_path: Path) -> None:
    store = MemoryStore(honour_conditions=False)
    p = publisher(store)
    with pytest.raises(StorageError, match="does not honour conditional writes"):
        p.prepare()
    p.release()
    assert store.list(OUT) == []


def test_only_the_claim_holder_writes() -> None:
    store = MemoryStore()
    first = publisher(store, run="run-1")
    assert first.prepare() is None
    with pytest.raises(OutputExists, match="another job"):
        publisher(store, job="job-2").prepare()
    second = publisher(store, run="run-2", claim_wait_s=0.2)
    with pytest.raises(StorageError, match="another run of this job"):
        second.prepare()
    second.release()  # the second run created nothing, so it deletes nothing
    assert store.head(OUT + CLAIM_NAME).metadata[RUN_META] == "run-1"


def test_a_failure_removes_what_this_run_created_and_nothing_else(tmp_path: Path) -> None:
    class FailingReport(MemoryStore):
        def create(self, key: str, source: Path | bytes, metadata: Mapping[str, str]) -> None:
            if key.endswith(REPORT_NAME):
                raise StorageError("the report's PUT failed")
            super().create(key, source, metadata)

    store = FailingReport()
    p = publisher(store)
    p.prepare()
    with pytest.raises(StorageError):
        p.publish(merged_dir(tmp_path))
    p.release()
    assert store.list(OUT) == []


def test_a_report_whose_answer_was_lost_counts_as_published(tmp_path: Path) -> None:
    class LostAnswer(MemoryStore):
        def create(self, key: str, source: Path | bytes, metadata: Mapping[str, str]) -> None:
            super().create(key, source, metadata)
            if key.endswith(REPORT_NAME):
                raise StorageError("connection reset after the PUT")

    store = LostAnswer()
    p = publisher(store)
    p.prepare()
    p.publish(merged_dir(tmp_path))
    p.release()
    assert store.head(OUT + REPORT_NAME).metadata[RUN_META] == "run-1"
    assert store.head(OUT + CLAIM_NAME) is None


def test_a_cancel_is_honoured_up_to_the_report(tmp_path: Path) -> None:
    store = MemoryStore()
    p = publisher(store)
    p.prepare()
    asked = iter([False, False, True])  # config, weights, then the report
    with pytest.raises(Canceled):
        p.publish(merged_dir(tmp_path), should_cancel=lambda: next(asked))
    p.release()
    assert store.list(OUT) == []


def test_a_dead_run_s_leftovers_go_and_nothing_else() -> None:
    store = MemoryStore()
    dead = {JOB_ID_META: "job-1", RUN_META: "run-a"}
    store.create(OUT + CLAIM_NAME, b"run-a", dead)
    store.create(OUT + WEIGHTS_NAME, b"partial", dead)
    store.create(OUT + "other.bin", b"x", {JOB_ID_META: "job-2"})
    remove_run_leftovers(store, OUT, "job-1", "run-b")  # another run's: nothing
    assert len(store.list(OUT)) == 3
    remove_run_leftovers(store, OUT, "job-1", "run-a")
    assert store.list(OUT) == [OUT + "other.bin"]


def test_a_job_runs_against_an_in_memory_store(peft_adapters: list[Path], tmp_path: Path):
    """Inputs fetched from, and the output published to, a MemoryStore: the same protocol
    as on S3 (checked sizes, pinned downloads, conditional creates)."""
    buckets = {"inputs": MemoryStore(), "merged": MemoryStore()}
    for i, adapter in enumerate(peft_adapters):
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            buckets["inputs"].create(f"{i}/{name}", adapter / name, {})
    storage = Storage(stores=lambda loc: buckets[loc.bucket])
    uris = [f"s3://inputs/{i}/" for i in range(len(peft_adapters))]
    output = "s3://merged/run/"
    p = storage.publisher(output, job_id="job-1", run="run-1")
    assert p.prepare() is None
    dirs = storage.fetch_adapters(uris, tmp_path / "inputs")
    spec = MergeSpec.model_validate(
        {"adapters": [{"uri": u} for u in uris], "method": "ta", "output": {"uri": output}}
    )
    outcome = run_merge(spec, dirs, tmp_path / "merged", device="cpu")
    p.publish(outcome.out_dir)
    p.release()
    assert storage.published_by(output) == "job-1"
    assert storage.read_report(output)["output"]["sha256"] == outcome.report["output"]["sha256"]
    published = buckets["merged"].read("run/" + WEIGHTS_NAME)
    assert published == (outcome.out_dir / WEIGHTS_NAME).read_bytes()
