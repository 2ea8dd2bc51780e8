"""The publishing protocol (worker/storage/publish.py) against an in-memory store: nothing a
job did not write is ever overwritten or deleted, only the claim holder writes, a lost
answer to a PUT is not a failure, and what a job wrote is told by a tag nobody else can
forge (worker/storage/ownership.py): a run adopts only its own objects."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from jobs.errors import Canceled, OutputExists, StorageError
from jobs.spec import MergeSpec
from tests.storage_helpers import MemoryStore, fetch_adapters, published_by, read_report
from worker.merge.runner import run_merge
from worker.storage import (
    CLAIM_NAME,
    CONFIG_NAME,
    JOB_ID_META,
    REPORT_NAME,
    RUN_META,
    WEIGHTS_NAME,
    Storage,
)
from worker.storage.ownership import TAG_META, Owner
from worker.storage.publish import OutputPublisher, remove_run_leftovers

OUT = "merged/run/"


def merged_dir(tmp_path: Path) -> Path:
    out = tmp_path / "merged"
    out.mkdir()
    (out / CONFIG_NAME).write_text("{}")
    (out / WEIGHTS_NAME).write_bytes(b"\0" * 64)
    (out / REPORT_NAME).write_text('{"output": {"rank": 4, "modules": 1, "bytes": 64}}')
    return out


def owner(job: str = "job-1") -> Owner:
    return Owner(job, f"secret-of-{job}")


def publisher(store: MemoryStore, job: str = "job-1", run: str = "run-1", **kw) -> OutputPublisher:
    return OutputPublisher(store, OUT, "mem://merged/run/", owner=owner(job), run=run, **kw)


def test_publishes_under_a_claim_with_the_report_last(tmp_path: Path) -> None:
    store = MemoryStore()
    p = publisher(store)
    assert p.prepare() is None
    claim = store.head(OUT + CLAIM_NAME)
    assert claim.metadata == owner().metadata("run-1", OUT + CLAIM_NAME)
    assert {JOB_ID_META: "job-1", RUN_META: "run-1"}.items() < claim.metadata.items()
    p.publish(merged_dir(tmp_path))
    p.release()
    assert list(store.iter_keys(OUT)) == sorted(
        OUT + n for n in (CONFIG_NAME, WEIGHTS_NAME, REPORT_NAME)
    )
    assert publisher(store, run="run-2").prepare() is not None  # published: nothing to do


def test_an_object_the_job_did_not_write_ends_it_before_anything_is_written() -> None:
    store = MemoryStore()
    store.create(OUT + "notes.txt", b"a tenant's file", {})
    with pytest.raises(OutputExists, match=r"notes\.txt"):
        publisher(store).prepare()
    assert list(store.iter_keys(OUT)) == [OUT + "notes.txt"]
    assert store.read(OUT + "notes.txt") == b"a tenant's file"


def test_a_store_that_ignores_conditional_writes_is_refused(tmp_path: Path) -> None:
    store = MemoryStore(honour_conditions=False)
    p = publisher(store)
    with pytest.raises(StorageError, match="does not honour conditional writes"):
        p.prepare()
    p.release()
    assert list(store.iter_keys(OUT)) == []


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
    assert list(store.iter_keys(OUT)) == []


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
    assert list(store.iter_keys(OUT)) == []


def test_a_dead_run_s_leftovers_go_and_nothing_else() -> None:
    store = MemoryStore()
    for key in (OUT + CLAIM_NAME, OUT + WEIGHTS_NAME):
        store.create(key, b"run-a", owner().metadata("run-a", key))
    store.create(OUT + "other.bin", b"x", {JOB_ID_META: "job-2"})
    forged = {JOB_ID_META: "job-1", RUN_META: "run-a", TAG_META: "0" * 64}
    store.create(OUT + "forged.bin", b"x", forged)  # names the job and the run: not its tag
    remove_run_leftovers(store, OUT, owner(), "run-b")  # another run's: nothing
    assert len(list(store.iter_keys(OUT))) == 4
    remove_run_leftovers(store, OUT, owner(), "run-a")
    assert list(store.iter_keys(OUT)) == [OUT + "forged.bin", OUT + "other.bin"]


# -- ownership (issue 22 §3)


@pytest.mark.parametrize(
    "metadata",
    [
        {JOB_ID_META: "job-1"},  # the id alone: known before the job exists (keyed jobs)
        {JOB_ID_META: "job-1", RUN_META: "run-1", TAG_META: "f" * 64},
        owner().metadata("run-1", OUT + "README.md"),  # a real tag, copied from another key
        owner("job-2").metadata("run-1", OUT + REPORT_NAME),  # another job's
    ],
    ids=["job-id", "made-up-tag", "copied-tag", "other-job"],
)
def test_a_planted_report_is_not_the_job_s(metadata: dict[str, str]) -> None:
    """A report planted at the output with the job's id (and more) is an object the job
    did not write: output_exists, before anything is written, and it stays."""
    store = MemoryStore()
    store.create(OUT + REPORT_NAME, b'{"output": {"rank": 1, "modules": 1, "bytes": 1}}', metadata)
    with pytest.raises(OutputExists, match=r"'merge_report\.json', which this job did not write"):
        publisher(store).prepare()
    assert list(store.iter_keys(OUT)) == [OUT + REPORT_NAME]


def test_a_claim_whose_answer_was_lost_is_the_run_s_own(tmp_path: Path) -> None:
    """The claim's PUT landed, its answer was lost (the retry then finds it taken, or the
    error reaches the run): the run holds the claim, publishes, and releases it."""

    class LostClaimAnswer(MemoryStore):
        def create(self, key: str, source: Path | bytes, metadata: Mapping[str, str]) -> None:
            first = key.endswith(CLAIM_NAME) and self.head(key) is None
            super().create(key, source, metadata)
            if first:
                raise StorageError("connection reset after the PUT")

    store = LostClaimAnswer()
    p = publisher(store, claim_wait_s=0.1)
    assert p.prepare() is None
    p.publish(merged_dir(tmp_path))
    p.release()
    assert store.head(OUT + CLAIM_NAME) is None  # not stranded: the next job may come
    assert store.head(OUT + REPORT_NAME).metadata[RUN_META] == "run-1"

    store = LostClaimAnswer()
    failed = publisher(store)
    failed.prepare()
    failed.release()  # the run fails before publishing: its claim goes with it
    assert list(store.iter_keys(OUT)) == []


def test_a_run_adopts_only_its_own_objects(tmp_path: Path) -> None:
    """Weights left by a dead run of the same job are not adopted as this run's (their
    sha256 would not be the report's): the claim holder removes them and writes its own."""
    store = MemoryStore()
    stale = OUT + WEIGHTS_NAME
    store.create(stale, b"an earlier run's weights", owner().metadata("run-0", stale))
    p = publisher(store)
    assert p.prepare() is None
    p.publish(merged_dir(tmp_path))
    p.release()
    assert store.read(stale) == (tmp_path / "merged" / WEIGHTS_NAME).read_bytes()
    assert owner().run_of(store.head(stale)) == "run-1"


def test_a_file_taken_by_someone_else_meanwhile_ends_the_job(tmp_path: Path) -> None:
    class Planter(MemoryStore):
        def create(self, key: str, source: Path | bytes, metadata: Mapping[str, str]) -> None:
            if key.endswith(WEIGHTS_NAME) and self.head(key) is None:  # planted just before
                super().create(key, b"theirs", {JOB_ID_META: "job-1", RUN_META: "run-1"})
            super().create(key, source, metadata)

    store = Planter()
    p = publisher(store)
    p.prepare()
    with pytest.raises(OutputExists, match="written by someone else"):
        p.publish(merged_dir(tmp_path))
    p.release()
    assert [k.removeprefix(OUT) for k in store.iter_keys(OUT)] == [WEIGHTS_NAME]
    assert store.read(OUT + WEIGHTS_NAME) == b"theirs"


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
    p = storage.publisher(output, owner=owner(), run="run-1")
    assert p.prepare() is None
    dirs = fetch_adapters(storage, uris, tmp_path / "inputs")
    spec = MergeSpec.model_validate(
        {"adapters": [{"uri": u} for u in uris], "method": "ta", "output": {"uri": output}}
    )
    outcome = run_merge(spec, dirs, tmp_path / "merged", device="cpu")
    p.publish(outcome.out_dir)
    p.release()
    assert published_by(storage, output) == "job-1"
    assert read_report(storage, output)["output"]["sha256"] == outcome.report["output"]["sha256"]
    published = buckets["merged"].read("run/" + WEIGHTS_NAME)
    assert published == (outcome.out_dir / WEIGHTS_NAME).read_bytes()


class _StreamingStore(MemoryStore):
    """A store that offers streamed creates (as S3 does): the object appears on close."""

    def upload_sink(self, key: str, metadata: Mapping[str, str]) -> _MemorySink:
        return _MemorySink(self, key, metadata)


class _MemorySink:
    def __init__(self, store: MemoryStore, key: str, metadata: Mapping[str, str]) -> None:
        self.store, self.key, self.metadata, self.parts = store, key, dict(metadata), []

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def close(self) -> None:
        self.store.create(self.key, b"".join(self.parts), self.metadata)

    def abort(self) -> None:
        self.parts.clear()


def test_the_weights_stream_only_to_a_store_that_offers_it() -> None:
    """The publisher asks the store for a streamed create instead of checking its type: a
    store without one gets the weights as a file, one with it gets them as they are written,
    tagged like every file of the run and removed with them when the run fails."""
    assert publisher(MemoryStore()).weights_sink() is None
    store = _StreamingStore()
    p = publisher(store)
    p.prepare()
    sink = p.weights_sink()
    assert sink is not None
    sink.write(b"\1" * 10)
    sink.close()
    weights = store.head(OUT + WEIGHTS_NAME)
    assert weights.size == 10 and weights.metadata[RUN_META] == "run-1"
    p.release()  # not published: what the run created goes, the streamed weights included
    assert list(store.iter_keys(OUT)) == []
