"""Publishing a merged adapter without ever destroying data (docs/guarantees.md).

One run of one job publishes at an output prefix, on any ``ObjectStore``. What the job
wrote is told by a tag nobody outside the service can forge (``worker.storage.ownership``).

1. **prepare** (before any input is read): list the prefix, a page at a time. The first
   object that this job did not write ends the job ``output_exists`` (nothing more is
   listed) and stays as it is. This job's own report means an earlier run published
   already: nothing more to do. Otherwise the run *claims* the output: ``.coremerge-claim``,
   created conditionally, tagged with the job and the run; a claim that this very run
   created (its PUT landed, its answer was lost) is its own. The claim is then created a
   second time, which must fail: a store that ignores ``If-None-Match`` would let two
   writers overwrite each other, so publishing stops there with ``storage_error``. A claim
   of another run of the same job (a run given up for dead that is in fact alive) is waited
   for: only the claim holder writes. Holding the claim, the run removes what other runs of
   its job left (a dead run's partial upload): it adopts only its own objects.
2. **publish**: every file is created conditionally with the job's tag, the report last; a
   cancel is honoured up to the report. A file whose PUT reached the store but whose answer
   was lost is recognised by its tag (this run's) and counts as created.
3. **release**: the run deletes its claim, and after a failure every object it created in
   this run, and nothing else.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from jobs.errors import Canceled, MergeError, OutputExists, StorageError
from worker.adapters.format import REPORT_NAME, WEIGHTS_NAME

from .objects import AlreadyExists, ObjectInfo, ObjectStore, UploadSink
from .ownership import JOB_ID_META, RUN_META, Owner
from .reports import read_report

__all__ = [
    "CLAIM_NAME",
    "JOB_ID_META",
    "RUN_META",
    "OutputPublisher",
    "conditional_writes_honoured",
    "remove_run_leftovers",
]

#: The object that reserves an output for one run while it publishes (deleted afterwards).
CLAIM_NAME = ".coremerge-claim"
#: Seconds between looks at a claim held by another run of the same job.
CLAIM_POLL_S = 1.0


def conditional_writes_honoured(store: ObjectStore, key: str) -> bool:
    """Create ``key`` twice with ``If-None-Match: *``: True when the second is refused, as
    it must be. Deletes the probe key (it created it) either way."""
    try:
        store.create(key, b"probe", {})
        try:
            store.create(key, b"probe", {})
        except AlreadyExists:
            return True
        return False
    finally:
        with contextlib.suppress(MergeError):
            store.delete(key)


class OutputPublisher:
    """One run (``run``) of one job (``owner``) publishing at ``prefix`` of ``store``;
    ``uri`` names the output in messages. ``claim_wait_s`` bounds the wait for another run
    of the same job that holds the claim."""

    def __init__(
        self,
        store: ObjectStore,
        prefix: str,
        uri: str,
        *,
        owner: Owner,
        run: str,
        claim_wait_s: float = 120.0,
    ) -> None:
        self.store, self.prefix, self.uri = store, prefix, uri
        self.owner, self.run, self.claim_wait_s = owner, run, claim_wait_s
        self.created: list[str] = []  # keys this run created, claim first
        self.published = False

    @property
    def claim_key(self) -> str:
        return self.prefix + CLAIM_NAME

    def metadata_for(self, key: str) -> dict[str, str]:
        """The metadata this run writes with the object ``key``: the job's tag."""
        return self.owner.metadata(self.run, key)

    def _mine(self, key: str) -> bool:
        """Whether this run created ``key`` (a create whose answer was lost)."""
        try:
            return self.owner.run_of(self.store.head(key)) == self.run
        except MergeError:
            return False

    # -- 1. before any input is read
    def prepare(self) -> ObjectInfo | None:
        """Refuse an output holding others' objects; return this job's report when it is
        published already; otherwise take the claim (and check that the store honours it)."""
        report = self._check_contents()
        if report is not None:
            return report
        deadline = time.monotonic() + self.claim_wait_s
        while not self._claim():
            if time.monotonic() > deadline:
                raise StorageError(
                    f"{self.uri}: another run of this job has held the output for over "
                    f"{self.claim_wait_s:.0f} s; nothing was written"
                )
            time.sleep(CLAIM_POLL_S)
            report = self._check_contents()  # that run may have published meanwhile
            if report is not None:
                return report
        self.created.append(self.claim_key)
        try:
            self.store.create(self.claim_key, self.run.encode(), self.metadata_for(self.claim_key))
        except AlreadyExists:
            self._remove_other_runs()
            return None
        raise StorageError(
            f"{self.uri}: the store does not honour conditional writes (If-None-Match); "
            "publishing there could overwrite data, so nothing was written"
        )

    def _claim(self) -> bool:
        """Create the claim: True once this run holds it (created now, or created by this
        run before an answer was lost), False while another run of the job holds it."""
        try:
            self.store.create(self.claim_key, self.run.encode(), self.metadata_for(self.claim_key))
            return True
        except AlreadyExists:
            holder = self.store.head(self.claim_key)
        except MergeError:
            if self._mine(self.claim_key):  # the PUT landed; only its answer was lost
                return True
            raise
        holder_run = self.owner.run_of(holder)
        if holder is not None and holder_run is None:
            raise OutputExists(
                f"{self.uri}: another job is publishing to this output; give each job "
                "its own output.uri"
            )
        return holder_run == self.run

    def _check_contents(self) -> ObjectInfo | None:
        """OutputExists at the first object this job did not write; this job's report, if any."""
        for key in self.store.iter_keys(self.prefix):  # stops at the first foreign object
            info = self.store.head(key)
            if info is None or self.owner.wrote(info):
                continue
            if key == self.claim_key:
                raise OutputExists(
                    f"{self.uri}: another job is publishing to this output; give each job its "
                    "own output.uri"
                )
            raise OutputExists(
                f"{self.uri}: holds {key.removeprefix(self.prefix)!r}, which this job did "
                "not write; nothing there was touched (give each job its own output.uri)"
            )
        report = self.store.head(self.prefix + REPORT_NAME)
        return report if self.owner.wrote(report) else None

    def _remove_other_runs(self) -> None:
        """Holding the claim: delete what other runs of this job left (no report: it would
        have been found), so that this run publishes and adopts only its own objects."""
        for key in self.store.iter_keys(self.prefix):
            run = self.owner.run_of(self.store.head(key))
            if run is not None and run != self.run:
                self.store.delete(key)

    def read_report(self, info: ObjectInfo) -> dict[str, Any]:
        """This job's published report (``prepare``'s answer), bounded and checked."""
        return read_report(self.store, info, self.uri)

    # -- 2. the files, the report last
    def weights_sink(self) -> BinaryIO | None:
        """A target that uploads the weights straight to the output while the merge runs (on a
        store that can: S3), created conditionally like every other file and removed with
        them if the job fails; None when the store cannot."""
        key = self.prefix + WEIGHTS_NAME
        upload = self.store.upload_sink(key, self.metadata_for(key))
        return None if upload is None else _RunSink(self, upload)

    def publish(
        self,
        local_dir: Path,
        *,
        should_cancel: Callable[[], bool] | None = None,
        commit: Callable[[], bool] | None = None,
    ) -> None:
        """Create every file of ``local_dir`` (the report last) under the claim. Before each
        file, ``should_cancel()`` may stop it; before the report, ``commit()`` decides (it
        returns False to stop, and once it returns True a cancel can no longer come)."""
        names = sorted(p.name for p in local_dir.iterdir() if p.is_file() and p.name != REPORT_NAME)
        for name in [*names, REPORT_NAME]:
            last = commit if name == REPORT_NAME and commit is not None else None
            stop = (last is not None and not last()) or (
                last is None and should_cancel is not None and should_cancel()
            )
            if stop:
                raise Canceled("canceled while publishing; nothing was published")
            self._create(self.prefix + name, local_dir / name)
        self.published = True

    def _create(self, key: str, source: Path) -> None:
        """Create one file, conditionally; a create whose answer was lost counts when the
        object there is this run's."""
        try:
            self.store.create(key, source, self.metadata_for(key))
        except AlreadyExists:
            self._taken(key)
        except MergeError:
            if not self._mine(key):
                raise
        self.created.append(key)

    def _taken(self, key: str) -> None:
        """A file's key was taken after the claim: this run's own (a retried PUT whose
        first answer was lost) is kept; anything else ends the job."""
        if not self._mine(key):
            raise OutputExists(
                f"{self.uri}: {key.removeprefix(self.prefix)!r} was written by someone else "
                "while this job published; nothing there was touched"
            )

    # -- 3. always
    def release(self) -> None:
        """Delete the claim, and, unless published, every other object this run created."""
        keys = self.created if not self.published else self.created[:1]
        for key in reversed(keys):
            with contextlib.suppress(MergeError):
                self.store.delete(key)
        self.created = [] if not self.published else self.created[1:]


def remove_run_leftovers(store: ObjectStore, prefix: str, owner: Owner, run: str | None) -> None:
    """What a dead run of ``owner``'s job left at ``prefix`` (its claim, a partial upload),
    for the worker that saw it die: the objects that run wrote (every object of the job when
    ``run`` is None: no run of it is left), unless the job's report is there (then the
    adapter is complete and only the claim goes). The listing is read a page at a time;
    nothing written by anyone else is touched."""
    published = owner.wrote(store.head(prefix + REPORT_NAME))
    for key in store.iter_keys(prefix):
        if published and key != prefix + CLAIM_NAME:
            continue
        wrote = owner.run_of(store.head(key))
        if wrote is not None and run in (None, wrote):
            with contextlib.suppress(MergeError):
                store.delete(key)


class _RunSink:
    """An upload of the publishing run: a completed object joins what the run created (and
    removes on failure); a key taken meanwhile is a taken key, as for any file it creates."""

    def __init__(self, publisher: OutputPublisher, upload: UploadSink) -> None:
        self.publisher, self.upload = publisher, upload

    def write(self, data: bytes | memoryview) -> int:
        return self.upload.write(data)

    def close(self) -> None:
        try:
            self.upload.close()
        except AlreadyExists:
            self.publisher._taken(self.upload.key)
        self.publisher.created.append(self.upload.key)

    def abort(self) -> None:
        self.upload.abort()
