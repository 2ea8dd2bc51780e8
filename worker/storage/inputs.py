"""Input adapters: checked (sizes, the safetensors prefix, no pickle) before a byte of them is
downloaded, then downloaded pinned to the ETags seen when they were checked.

Sizes are limits (``COREMERGE_MAX_ADAPTER_BYTES``, ``COREMERGE_MAX_JOB_BYTES``): a HEAD gives
them, and a download that would read an object other than the one measured (swapped in
between) is refused by its ``If-Match``, so the limits cannot be bypassed. A local path is
never built from a key: S3 adapters go to ``dest/<index>/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jobs.errors import AdapterInvalid, AdapterNotFound, LimitExceeded
from jobs.uris import Location
from worker.adapters.format import (
    CONFIG_NAME,
    PICKLE_NAMES,
    PREFIX_BYTES,
    WEIGHTS_NAME,
    check_prefix,
)

from .objects import ObjectInfo, ObjectStore

__all__ = ["CheckedAdapter", "check_adapter", "check_limits", "download_adapter"]


@dataclass(frozen=True)
class CheckedAdapter:
    """An input adapter as measured: its two objects, with the ETags to pin the reads to."""

    location: Location
    prefix: str  # the store key of the adapter's folder ("" or ending in "/")
    config: ObjectInfo
    weights: ObjectInfo

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
    """HEAD the adapter's files and check its weights' first bytes (one ranged read)."""
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
        else store.read(weights.key, etag=weights.etag, length=PREFIX_BYTES)
    )
    try:
        check_prefix(head, weights.size)
    except ValueError as exc:
        raise AdapterInvalid(f"{loc}{WEIGHTS_NAME}: not a valid safetensors file ({exc})") from None
    return CheckedAdapter(loc, prefix, infos[CONFIG_NAME], weights)


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
