"""Input adapters: checked (sizes, the safetensors prefix, no pickle) before a byte of their
tensors is read, then read pinned to the ETags seen when they were checked.

Sizes are limits (``COREMERGE_MAX_ADAPTER_BYTES``, ``COREMERGE_MAX_JOB_BYTES``): a HEAD gives
them, and a read that would see an object other than the one measured (swapped in between,
or while the merge reads it) is refused by its ``If-Match``, so the limits cannot be
bypassed and two versions of an input are never mixed. The check reads the weights' first
:data:`HEAD_BYTES` (one ranged GET): the prefix it checks, and the header that opening the
input needs next.

The storage layer hands out bytes, never readers. An S3 adapter, once checked, is prepared
by :func:`prepare_remote`: only ``adapter_config.json`` goes to ``dest/<index>/``; the
weights stay where they are, as a :class:`PinnedObject` (size, first bytes, ranged fetch,
download). ``worker.adapters.opening`` decides how to read them (a LoRA adapter's as the
merge goes, a VeRA adapter's copied first).

A local path is never built from a key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jobs.errors import AdapterInvalid, AdapterNotFound, LimitExceeded, StorageError
from jobs.uris import Location
from worker.adapters.format import (
    CONFIG_NAME,
    MAX_CONFIG_BYTES,
    PICKLE_NAMES,
    PREFIX_BYTES,
    WEIGHTS_NAME,
    check_prefix,
)

from .objects import ObjectInfo, ObjectStore

__all__ = [
    "HEAD_BYTES",
    "CheckedAdapter",
    "PinnedObject",
    "RemoteInput",
    "check_adapter",
    "check_limits",
    "prepare_remote",
]

#: The weights' first bytes read by the check: the prefix, and the whole header of any
#: adapter up to about 2,000 modules (Llama-3-70B's 560 take 70 KiB), so that opening a
#: streamed input needs no second GET for it.
HEAD_BYTES = 256 << 10


@dataclass(frozen=True)
class CheckedAdapter:
    """An input adapter as measured: its two objects, with the ETags to pin the reads to."""

    location: Location
    prefix: str  # the store key of the adapter's folder ("" or ending in "/")
    config: ObjectInfo
    weights: ObjectInfo
    head: bytes = b""  # the weights' first bytes (up to HEAD_BYTES), as checked

    @property
    def nbytes(self) -> int:
        return self.config.size + self.weights.size


def _refuse_missing(store: ObjectStore, loc: Location, prefix: str, missing: str) -> None:
    """Name what is wrong when a file is missing: a pickle in place of safetensors, weights
    without a config (not a PEFT adapter), or just nothing there."""
    pickle = next((p for p in PICKLE_NAMES if store.head(prefix + p) is not None), None)
    if missing == WEIGHTS_NAME and pickle is not None:
        raise AdapterInvalid(
            f"{loc}: has {pickle} (pickle) and no {WEIGHTS_NAME}; pickle weights are "
            "refused, save the adapter with safetensors"
        )
    if missing == CONFIG_NAME and (pickle or store.head(prefix + WEIGHTS_NAME)):
        raise AdapterInvalid(f"{loc}: has weights but no {CONFIG_NAME} (not a PEFT adapter)")
    raise AdapterNotFound(f"{loc}{missing}: not found")


def check_adapter(store: ObjectStore, loc: Location, prefix: str) -> CheckedAdapter:
    """HEAD the adapter's files and check its weights' first bytes (one ranged read of up
    to :data:`HEAD_BYTES`, kept for opening the input)."""
    infos = {}
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        info = store.head(prefix + name)
        if info is None:
            _refuse_missing(store, loc, prefix, name)
        infos[name] = info
    if infos[CONFIG_NAME].size > MAX_CONFIG_BYTES:  # from the HEAD: it is never copied
        raise AdapterInvalid(f"{loc}{CONFIG_NAME}: is larger than 1 MiB (not a PEFT config)")
    weights = infos[WEIGHTS_NAME]
    head = (
        b""
        if weights.size < PREFIX_BYTES
        else store.read(weights.key, etag=weights.etag, length=min(weights.size, HEAD_BYTES))
    )
    try:
        check_prefix(head, weights.size)
    except ValueError as exc:
        raise AdapterInvalid(f"{loc}{WEIGHTS_NAME}: not a valid safetensors file ({exc})") from None
    return CheckedAdapter(loc, prefix, infos[CONFIG_NAME], weights, head)


def check_limits(
    adapters: list[CheckedAdapter], max_adapter_bytes: int | None, max_job_bytes: int | None
) -> None:
    """The size limits, from the HEADs alone."""
    for adapter in adapters:
        if max_adapter_bytes is not None and adapter.nbytes > max_adapter_bytes:
            raise LimitExceeded(
                f"{adapter.location}: {adapter.nbytes} bytes, over this service's limit of "
                f"{max_adapter_bytes} per adapter (COREMERGE_MAX_ADAPTER_BYTES)"
            )
    total = sum(a.nbytes for a in adapters)
    if max_job_bytes is not None and total > max_job_bytes:
        raise LimitExceeded(
            f"the inputs total {total} bytes, over this service's limit of "
            f"{max_job_bytes} (COREMERGE_MAX_JOB_BYTES)"
        )


@dataclass(frozen=True)
class PinnedObject:
    """An object of ``store`` as it was checked (a ``worker.adapters.source.RemoteFile``):
    every read is pinned to its ETag, and a short answer is refused too; ``uri`` names it in
    messages."""

    store: ObjectStore
    info: ObjectInfo
    uri: str
    head: bytes = b""  # its first bytes, as the check read them

    @property
    def size(self) -> int:
        return self.info.size

    def fetch(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object."""
        data = self.store.read(self.info.key, etag=self.info.etag, start=start, length=end - start)
        if len(data) != end - start:
            raise StorageError(
                f"{self.uri}: short read (the object changed?); nothing was published"
            )
        return data

    def download(self, dest: Path) -> None:
        """Copy the whole object to the local file ``dest``."""
        self.store.download(self.info.key, dest, etag=self.info.etag, size=self.info.size)


@dataclass(frozen=True)
class RemoteInput:
    """An S3 input adapter, checked, as the worker opens it (a
    ``worker.adapters.source.RemoteAdapter``): its config copied to ``directory``, its
    weights where they lie."""

    directory: Path
    weights: PinnedObject


def prepare_remote(store: ObjectStore, adapter: CheckedAdapter, target: Path) -> RemoteInput:
    """Copy the adapter's config into the new folder ``target`` (pinned) and hand out its
    weights as a :class:`PinnedObject`."""
    target.mkdir(parents=True, exist_ok=False)
    config = adapter.config
    store.download(config.key, target / CONFIG_NAME, etag=config.etag, size=config.size)
    uri = f"{adapter.location}{WEIGHTS_NAME}"
    return RemoteInput(target, PinnedObject(store, adapter.weights, uri, adapter.head))
