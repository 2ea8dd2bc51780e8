"""What the storage layer needs of a store, as one interface, and an in-memory store.

A store is one S3 bucket (``worker.storage.s3.S3Store``) or one local file system
(``worker.storage.local.LocalStore``), holding objects by key. The protocols that fetch inputs
(``worker.storage.inputs``) and publish outputs (``worker.storage.publish``) are written once
against :class:`ObjectStore`, so tests can hand them a :class:`MemoryStore`.

Every method raises a ``jobs.errors.MergeError`` for a failure whose cause is known
(``AdapterNotFound``, ``AccessDenied``, ``StorageError``), never a client library's exception;
:meth:`ObjectStore.create` raises :class:`AlreadyExists` when the key is taken.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from jobs.errors import AdapterNotFound, StorageError

__all__ = ["AlreadyExists", "MemoryStore", "ObjectInfo", "ObjectStore"]


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


class MemoryStore:
    """An :class:`ObjectStore` in a dict, for tests. ``honour_conditions=False`` makes it
    behave like a store that ignores ``If-None-Match`` (it overwrites)."""

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
        info = self.head(key)
        if info is None:
            raise AdapterNotFound(f"{key}: not found")
        if etag is not None and info.etag != etag:
            raise StorageError(f"{key}: changed while this job was reading it")
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
