"""Input adapters: checked (sizes, the safetensors prefix, no pickle) before a byte of their
tensors is read, then read pinned to the ETags seen when they were checked.

Sizes are limits (``COREMERGE_MAX_ADAPTER_BYTES``, ``COREMERGE_MAX_JOB_BYTES``): a HEAD gives
them, and a read that would see an object other than the one measured (swapped in between,
or while the merge reads it) is refused by its ``If-Match``, so the limits cannot be
bypassed and two versions of an input are never mixed. The check reads the weights' first
:data:`HEAD_BYTES` (one ranged GET): the prefix it checks, and the header that opening the
input needs next.

Two ways to read an S3 adapter once checked:

- :class:`StreamedInput` (the worker's): only ``adapter_config.json`` goes to
  ``dest/<index>/``; a LoRA adapter's weights are read from S3 as the merge goes
  (``worker.adapters.streamed``), so the worker's disk never holds them; a VeRA adapter's
  (small by design: vectors and two shared projections) are copied there whole.
- :func:`download_adapter`: both files copied to ``dest/<index>/``.

A local path is never built from a key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.errors import AdapterInvalid, AdapterNotFound, LimitExceeded, StorageError
from jobs.uris import Location
from worker.adapters.format import (
    CONFIG_NAME,
    PICKLE_NAMES,
    PREFIX_BYTES,
    WEIGHTS_NAME,
    check_prefix,
)

from .objects import ObjectInfo, ObjectStore

if TYPE_CHECKING:  # torch: imported when an input is opened, not with the storage layer
    from worker.adapters.config import LoraAdapterConfig
    from worker.adapters.source import AdapterSource, InputSizes
    from worker.adapters.streamed import ReadAhead

__all__ = [
    "HEAD_BYTES",
    "CheckedAdapter",
    "StreamedInput",
    "check_adapter",
    "check_limits",
    "download_adapter",
    "pinned_range",
    "prepare_streamed",
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


def download_adapter(store: ObjectStore, adapter: CheckedAdapter, target: Path) -> Path:
    """Download the adapter's two files into the new folder ``target``, pinned."""
    target.mkdir(parents=True, exist_ok=False)
    for info in (adapter.config, adapter.weights):
        name = info.key.rsplit("/", 1)[-1]
        store.download(info.key, target / name, etag=info.etag, size=info.size)
    return target


def pinned_range(store: ObjectStore, info: ObjectInfo, uri: str) -> Callable[[int, int], bytes]:
    """``fetch(start, end)``: bytes [start, end) of the object, refused unless it still has
    the ETag it was checked with (and a short answer refused too)."""

    def fetch(start: int, end: int) -> bytes:
        data = store.read(info.key, etag=info.etag, start=start, length=end - start)
        if len(data) != end - start:
            raise StorageError(f"{uri}: short read (the object changed?); nothing was published")
        return data

    return fetch


@dataclass(frozen=True)
class StreamedInput:
    """An S3 input adapter, checked, with its config copied to ``directory``: opened as a
    source whose weights are read from the store as the merge goes (a LoRA adapter) or
    copied beside the config first (VeRA). An ``AdapterLocation`` of
    ``worker.adapters.source``."""

    directory: Path
    store: ObjectStore
    adapter: CheckedAdapter
    read_ahead: ReadAhead
    window_bytes: int  # this input's share of the job's look-ahead
    span_bytes: int

    def open(self, name: str, config: LoraAdapterConfig, known: InputSizes) -> AdapterSource:
        from worker.adapters.streamed import StreamedLoraReader
        from worker.adapters.vera import VeraReader

        weights = self.adapter.weights
        if config.peft_type == "VERA":
            target = self.directory / WEIGHTS_NAME
            self.store.download(weights.key, target, etag=weights.etag, size=weights.size)
            return VeraReader(self.directory, name, config, known)
        return StreamedLoraReader(
            name, config, size=weights.size, head=self.adapter.head,
            fetch=pinned_range(self.store, weights, f"{self.adapter.location}{WEIGHTS_NAME}"),
            read_ahead=self.read_ahead, window_bytes=self.window_bytes,
            span_bytes=self.span_bytes,
        )  # fmt: skip


def prepare_streamed(
    store: ObjectStore, adapter: CheckedAdapter, target: Path, read_ahead: ReadAhead, inputs: int
) -> StreamedInput:
    """Copy the adapter's config into the new folder ``target`` (pinned) and return the
    input, with its share of ``read_ahead`` among the job's ``inputs`` streamed inputs."""
    target.mkdir(parents=True, exist_ok=False)
    config = adapter.config
    store.download(config.key, target / CONFIG_NAME, etag=config.etag, size=config.size)
    window, span = read_ahead.share(inputs)
    return StreamedInput(target, store, adapter, read_ahead, window, span)
