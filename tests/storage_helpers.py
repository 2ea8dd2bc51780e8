"""Test-side helpers of the storage layer, kept out of the product's ``worker.storage``.

The worker streams its inputs (``Storage.open_inputs``) and publishes through an
``OutputPublisher`` of its own run; the tests also want the older whole-file paths and a
store in memory. They are built here on the product's public pieces, so what they check is
the product's protocol, not a copy of it.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.errors import AdapterNotFound
from jobs.uris import parse_uri
from worker.storage import JOB_ID_META, REPORT_NAME, Owner, Storage
from worker.storage.hub import HubAdapter, fetch_hub_adapter
from worker.storage.inputs import CheckedAdapter
from worker.storage.objects import AlreadyExists, ObjectInfo, ObjectStore, pinned_head
from worker.storage.reports import read_report as read_report_object

__all__ = [
    "MemoryStore",
    "Published",
    "download_adapter",
    "fetch_adapters",
    "publish",
    "published_by",
    "read_report",
]


class MemoryStore:
    """An ``ObjectStore`` in a dict. ``honour_conditions=False`` makes it behave like a store
    that ignores ``If-None-Match`` (it overwrites)."""

    def __init__(self, *, honour_conditions: bool = True) -> None:
        self.objects: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.honour_conditions = honour_conditions
        self.listed = 0  # keys handed out by iter_keys (the tests of early stops count them)
        self._lock = threading.Lock()

    def head(self, key: str) -> ObjectInfo | None:
        with self._lock:
            if key not in self.objects:
                return None
            body, metadata = self.objects[key]
        return ObjectInfo(key, len(body), hashlib.md5(body).hexdigest(), dict(metadata))

    def iter_keys(self, prefix: str) -> Iterator[str]:
        with self._lock:
            keys = sorted(k for k in self.objects if k.startswith(prefix))
        for key in keys:
            self.listed += 1
            yield key

    def read(
        self, key: str, *, etag: str | None = None, length: int | None = None, start: int = 0
    ) -> bytes:
        pinned_head(self, key, etag, key)
        body = self.objects[key][0]
        return body[start:] if length is None else body[start : start + length]

    def download(self, key: str, dest: Path, *, etag: str, size: int) -> None:
        dest.write_bytes(self.read(key, etag=etag))

    def create(self, key: str, source: Path | bytes, metadata: Mapping[str, str]) -> None:
        body = source if isinstance(source, bytes) else Path(source).read_bytes()
        with self._lock:
            if key in self.objects and self.honour_conditions:
                raise AlreadyExists(key)
            self.objects[key] = (body, dict(metadata))

    def delete(self, key: str) -> None:
        with self._lock:
            self.objects.pop(key, None)

    def upload_sink(self, key: str, metadata: Mapping[str, str]) -> None:
        """No streamed creates: the publisher writes the file, then creates it."""
        return None


def download_adapter(store: ObjectStore, adapter: CheckedAdapter, target: Path) -> Path:
    """Download the adapter's two files into the new folder ``target``, pinned."""
    target.mkdir(parents=True, exist_ok=False)
    for info in (adapter.config, adapter.weights):
        name = info.key.rsplit("/", 1)[-1]
        store.download(info.key, target / name, etag=info.etag, size=info.size)
    return target


def fetch_adapters(storage: Storage, uris: Sequence[str], dest: Path) -> list[Path]:
    """Local directories holding the adapters at ``uris``, in order: checked as the worker
    checks them (``Storage.check_inputs``), then S3 adapters copied whole, pinned to what was
    checked, to ``dest/<index>/``; ``file://`` ones are used in place."""
    with ThreadPoolExecutor(min(storage.max_parallel, len(uris)) or 1) as pool:
        checked = storage.check_inputs(uris, pool)

        def fetch(i: int) -> Path:
            store, adapter = checked[i]
            if isinstance(adapter, HubAdapter):
                return fetch_hub_adapter(adapter)
            if adapter.location.scheme == "file":
                return Path(adapter.location.path)
            return download_adapter(store, adapter, dest / str(i))

        return list(pool.map(fetch, range(len(checked))))


@dataclass(frozen=True)
class Published:
    uri: str
    report_uri: str
    already: bool = False  # this job had published it before (a re-run after a worker died)


def publish(storage: Storage, local_dir: Path, uri: str, *, owner: Owner) -> Published:
    """Publish the merged adapter in ``local_dir`` at ``uri`` as one run of ``owner``'s job:
    check, claim, files, the report last, as the worker's run does (``worker.job``)."""
    loc = parse_uri(uri)
    report_uri = f"{loc}{REPORT_NAME}"
    publisher = storage.publisher(uri, owner=owner, run=uuid.uuid4().hex)
    try:
        if publisher.prepare() is not None:
            return Published(loc.normalized, report_uri, already=True)
        publisher.publish(local_dir)
    finally:
        publisher.release()
    return Published(loc.normalized, report_uri)


def published_by(storage: Storage, uri: str) -> str | None:
    """The job id that the report at ``uri`` names (unverified), ``""`` when it names none,
    ``None`` with no report."""
    store, prefix, _ = storage.locate(uri)
    report = store.head(prefix + REPORT_NAME)
    return None if report is None else report.metadata.get(JOB_ID_META, "")


def read_report(storage: Storage, uri: str) -> dict[str, Any]:
    """The report published at ``uri``, bounded and checked (``reports.read_report``)."""
    store, prefix, loc = storage.locate(uri)
    info = store.head(prefix + REPORT_NAME)
    if info is None:
        raise AdapterNotFound(f"{loc}{REPORT_NAME}: not found")
    return read_report_object(store, info, loc.normalized)
