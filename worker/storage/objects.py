"""What the storage layer needs of a store, as one interface.

A store is one S3 bucket (``worker.storage.s3.S3Store``) or one local file system
(``worker.storage.local.LocalStore``), holding objects by key. The protocols that fetch inputs
(``worker.storage.inputs``) and publish outputs (``worker.storage.publish``) are written once
against :class:`ObjectStore`, so tests can hand them a store in memory
(``tests/storage_helpers.py``).

Every method raises a ``jobs.errors.MergeError`` for a failure whose cause is known
(``AdapterNotFound``, ``AccessDenied``, ``StorageError``), never a client library's exception;
:meth:`ObjectStore.create` raises :class:`AlreadyExists` when the key is taken.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from jobs.errors import AdapterNotFound, StorageError

__all__ = ["AlreadyExists", "ObjectInfo", "ObjectStore", "UploadSink", "pinned_head"]


class AlreadyExists(Exception):
    """A conditional create found its key taken (S3's 412 ``PreconditionFailed``)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str  # changes whenever the object's content may have changed
    metadata: Mapping[str, str] = field(default_factory=dict)


class ObjectStore(Protocol):
    """Objects by key in one bucket or file system."""

    def head(self, key: str) -> ObjectInfo | None:
        """The object's size, ETag and metadata; ``None`` when there is no such object."""
        ...

    def iter_keys(self, prefix: str) -> Iterator[str]:
        """The keys that start with ``prefix``, a page at a time: a caller that stops early
        (at the first object that is not its own) never lists the rest, and one that goes
        on holds a page, not the whole listing."""
        ...

    def read(
        self, key: str, *, etag: str | None = None, length: int | None = None, start: int = 0
    ) -> bytes | bytearray:
        """The object's bytes from ``start`` (``length`` of them only, when given), refused
        with a ``StorageError`` when ``etag`` is given and the object no longer has it."""
        ...

    def download(self, key: str, dest: Path, *, etag: str, size: int) -> None:
        """Copy the object, which must still have ``etag``, to the local file ``dest``."""
        ...

    def create(self, key: str, source: Path | bytes, metadata: Mapping[str, str]) -> None:
        """Create the object only if ``key`` is free (``If-None-Match: *``): never overwrites."""
        ...

    def delete(self, key: str) -> None:
        """Delete the object (no error when it is already gone)."""
        ...

    def upload_sink(self, key: str, metadata: Mapping[str, str]) -> UploadSink | None:
        """A target that creates ``key`` from what is written to it, as it is written, or
        None when this store cannot: the caller then writes a local file and ``create``s it.
        Asked instead of the store's type, so the publisher stays written against this
        interface."""
        ...


class UploadSink(Protocol):
    """An object being created from a stream: ``close()`` completes it as :meth:`ObjectStore.
    create` would (conditionally: :class:`AlreadyExists` when ``key`` was taken meanwhile);
    ``abort()`` discards it, and nothing is created."""

    key: str

    def write(self, data: bytes | bytearray | memoryview) -> int: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


def pinned_head(store: ObjectStore, key: str, etag: str | None, uri: str) -> ObjectInfo:
    """The object's info for a read pinned to ``etag`` (a store that cannot send
    ``If-Match`` checks it so): ``AdapterNotFound`` when it is gone, ``StorageError`` when
    it changed since that ETag was seen; ``uri`` names it in the message."""
    info = store.head(key)
    if info is None:
        raise AdapterNotFound(f"{uri}: not found")
    if etag is not None and info.etag != etag:
        raise StorageError(f"{uri}: changed while this job was reading it")
    return info
