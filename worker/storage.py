"""Adapter and output locations: fetch input adapters to local directories, publish a merged
adapter to its output location. ``s3://`` (boto3) and ``file://`` (local; no copy for inputs).

The S3 client is passed in (``Storage(s3=...)``), so tests hand in their own and the worker
builds one from ``Settings`` with :func:`make_s3_client`: botocore retries in ``standard``
mode, checksum behaviour configurable (some S3-compatible stores refuse boto3's default CRCs),
multipart transfers through ``TransferConfig``.

Errors map to the job's error codes where the cause is known, immediately and without
retrying: a missing key or bucket is ``AdapterNotFound``, a 403 is ``AccessDenied``, a pickle
``.bin`` in place of safetensors or a broken safetensors header is ``AdapterInvalid``; anything
else that went wrong talking to the store (after botocore's retries) is ``StorageError``.

Publishing never leaves a partial adapter looking complete: ``merge_report.json`` is written
last, with a conditional put (``IfNoneMatch="*"``) carrying the job id in its metadata, so a
re-run of the same job (RQ retries after a worker died) recognises its own output and a
different job cannot overwrite it. If publishing fails before the report, what was uploaded
is deleted. A ``file://`` output is staged beside the target and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from service.uris import Location, parse_uri
from worker.errors import AccessDenied, AdapterInvalid, AdapterNotFound, MergeError, StorageError

__all__ = [
    "CONFIG_NAME",
    "REPORT_NAME",
    "WEIGHTS_NAME",
    "Published",
    "Storage",
    "make_s3_client",
    "make_transfer_config",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
REPORT_NAME = "merge_report.json"
PICKLE_WEIGHTS = "adapter_model.bin"
#: S3 object metadata naming the job that published an output.
JOB_ID_META = "coremerge-job-id"
#: A safetensors JSON header larger than this is not a LoRA adapter (and not worth reading).
MAX_SAFETENSORS_HEADER = 100 << 20

_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED = {
    "403",
    "AccessDenied",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "AccountProblem",
    "InvalidToken",
    "ExpiredToken",
}


def make_s3_client(settings: Any) -> Any:
    """A boto3 S3 client for ``settings`` (endpoint, retries, checksums); credentials and
    region from boto3's own chain."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": settings.s3_max_attempts},
        request_checksum_calculation=settings.s3_checksum_calculation,
        response_checksum_validation=settings.s3_checksum_validation,
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=max(10, settings.s3_max_concurrency * 2),
    )
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)


def make_transfer_config(settings: Any) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=settings.s3_multipart_threshold,
        multipart_chunksize=settings.s3_multipart_chunksize,
        max_concurrency=settings.s3_max_concurrency,
    )


@dataclass(frozen=True)
class Published:
    uri: str
    report_uri: str
    already: bool = False  # this job had published it before (a re-run after a worker died)


def _error_code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code or status


def _is_storage_failure(exc: BaseException) -> bool:
    """An error from talking to the store (botocore, s3transfer, the socket or the local
    disk), as opposed to anything else (a timeout signal, a bug) that must pass through."""
    module = type(exc).__module__ or ""
    return isinstance(exc, OSError) or module.startswith(("botocore", "boto3", "s3transfer"))


def _mapped(exc: Exception, what: str) -> Exception:
    """The job error for a failed S3 call on ``what`` (an adapter's or the output's file);
    exceptions that are not storage failures are returned unchanged, to be re-raised."""
    if isinstance(exc, MergeError) or not _is_storage_failure(exc):
        return exc
    code = _error_code(exc)
    if code in _NOT_FOUND:
        return AdapterNotFound(f"{what}: not found ({code})")
    if code in _DENIED:
        return AccessDenied(f"{what}: access denied ({code})")
    detail = f"{code}" if code else f"{type(exc).__name__}: {exc}"
    return StorageError(f"{what}: {detail}")


def _raise_mapped(exc: Exception, what: str) -> NoReturn:
    error = _mapped(exc, what)
    if error is exc:
        raise exc
    raise error from None


def _check_safetensors_prefix(head: bytes, size: int, what: str) -> None:
    """The first 9 bytes of a safetensors file: a little-endian u64 header length, then '{'."""
    if len(head) < 9:
        raise AdapterInvalid(f"{what}: {size} bytes is too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len < 2 or header_len > MAX_SAFETENSORS_HEADER or 8 + header_len > size:
        raise AdapterInvalid(f"{what}: not a safetensors file (header length {header_len})")
    if head[8:9] != b"{":
        raise AdapterInvalid(f"{what}: not a safetensors file (header is not JSON)")


class Storage:
    """Fetches adapters and publishes outputs. ``s3`` is a boto3 S3 client (or ``None`` when
    only ``file://`` locations are used)."""

    def __init__(
        self,
        s3: Any = None,
        *,
        transfer_config: Any = None,
        max_job_bytes: int | None = None,
        max_parallel: int = 8,
    ) -> None:
        self.s3 = s3
        self.transfer_config = transfer_config
        self.max_job_bytes = max_job_bytes
        self.max_parallel = max_parallel

    # -- inputs
    def fetch_adapters(self, uris: Sequence[str], dest: Path) -> list[Path]:
        """Local directories holding the adapters at ``uris``, in order. S3 adapters are
        downloaded to ``dest/<index>/`` (never to a path built from a key), after every
        adapter's size and safetensors header were checked; ``file://`` ones are used in place."""
        locations = [parse_uri(u) for u in uris]
        with ThreadPoolExecutor(min(self.max_parallel, len(locations)) or 1) as pool:
            sizes = list(pool.map(self._inspect, locations))
            total = sum(sizes)
            if self.max_job_bytes is not None and total > self.max_job_bytes:
                raise AdapterInvalid(
                    f"the inputs total {total} bytes, over this service's limit of "
                    f"{self.max_job_bytes} (COREMERGE_MAX_JOB_BYTES)"
                )
            targets = [dest / str(i) for i in range(len(locations))]
            return list(pool.map(self._fetch, locations, targets))

    def _inspect(self, loc: Location) -> int:
        """Check that the adapter exists and looks like safetensors; return its size."""
        if loc.scheme == "file":
            return self._inspect_local(Path(loc.path), loc)
        sizes = {}
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            what = f"{loc}{name}"
            try:
                sizes[name] = self.s3.head_object(Bucket=loc.bucket, Key=loc.child(name))[
                    "ContentLength"
                ]
            except Exception as exc:
                if name == WEIGHTS_NAME and isinstance(_mapped(exc, what), AdapterNotFound):
                    self._refuse_pickle(loc)
                _raise_mapped(exc, what)
        what = f"{loc}{WEIGHTS_NAME}"
        try:
            body = self.s3.get_object(
                Bucket=loc.bucket, Key=loc.child(WEIGHTS_NAME), Range="bytes=0-8"
            )["Body"]
            head = body.read()
        except Exception as exc:
            _raise_mapped(exc, what)
        _check_safetensors_prefix(head, sizes[WEIGHTS_NAME], what)
        return sum(sizes.values())

    def _refuse_pickle(self, loc: Location) -> None:
        try:
            self.s3.head_object(Bucket=loc.bucket, Key=loc.child(PICKLE_WEIGHTS))
        except Exception:
            return
        raise AdapterInvalid(
            f"{loc}: has {PICKLE_WEIGHTS} (pickle) and no {WEIGHTS_NAME}; pickle weights are "
            "refused, save the adapter with safetensors"
        )

    @staticmethod
    def _inspect_local(path: Path, loc: Location) -> int:
        config, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not config.is_file():
            raise AdapterNotFound(f"{loc}{CONFIG_NAME}: not found")
        if not weights.is_file():
            if (path / PICKLE_WEIGHTS).is_file():
                raise AdapterInvalid(f"{loc}: pickle {PICKLE_WEIGHTS} is refused; use safetensors")
            raise AdapterNotFound(f"{loc}{WEIGHTS_NAME}: not found")
        with open(weights, "rb") as f:
            _check_safetensors_prefix(f.read(9), weights.stat().st_size, f"{loc}{WEIGHTS_NAME}")
        return config.stat().st_size + weights.stat().st_size

    def _fetch(self, loc: Location, target: Path) -> Path:
        if loc.scheme == "file":
            return Path(loc.path)
        target.mkdir(parents=True, exist_ok=False)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            try:
                self.s3.download_file(
                    loc.bucket, loc.child(name), str(target / name), Config=self.transfer_config
                )
            except Exception as exc:
                _raise_mapped(exc, f"{loc}{name}")
        return target

    # -- output
    def published_by(self, uri: str) -> str | None:
        """The job id that published the adapter at ``uri``, ``""`` for an output that exists
        but is not ours to tell, ``None`` when nothing is there."""
        loc = parse_uri(uri)
        if loc.scheme == "file":
            path = Path(loc.path)
            return "" if path.exists() and (not path.is_dir() or any(path.iterdir())) else None
        try:
            head = self.s3.head_object(Bucket=loc.bucket, Key=loc.child(REPORT_NAME))
        except Exception as exc:
            if isinstance(_mapped(exc, f"{loc}{REPORT_NAME}"), AdapterNotFound):
                return None
            _raise_mapped(exc, f"{loc}{REPORT_NAME}")
        return head.get("Metadata", {}).get(JOB_ID_META, "")

    def read_report(self, uri: str) -> dict[str, Any]:
        loc = parse_uri(uri)
        if loc.scheme == "file":
            return json.loads((Path(loc.path) / REPORT_NAME).read_text())
        try:
            body = self.s3.get_object(Bucket=loc.bucket, Key=loc.child(REPORT_NAME))["Body"]
            return json.loads(body.read())
        except Exception as exc:
            _raise_mapped(exc, f"{loc}{REPORT_NAME}")

    def publish(self, local_dir: Path, uri: str, *, job_id: str) -> Published:
        """Publish the merged adapter in ``local_dir`` at ``uri``, the report last."""
        loc = parse_uri(uri)
        report_uri = f"{loc}{REPORT_NAME}"
        if loc.scheme == "file":
            self._publish_local(local_dir, Path(loc.path))
            return Published(loc.normalized, report_uri)
        names = sorted(p.name for p in local_dir.iterdir() if p.is_file() and p.name != REPORT_NAME)
        metadata = {JOB_ID_META: job_id}
        uploaded: list[str] = []
        try:
            for name in names:
                key = loc.child(name)
                self.s3.upload_file(
                    str(local_dir / name), loc.bucket, key, Config=self.transfer_config,
                    ExtraArgs={"Metadata": metadata, "ContentType": _content_type(name)},
                )  # fmt: skip
                uploaded.append(key)
            self.s3.put_object(
                Bucket=loc.bucket, Key=loc.child(REPORT_NAME),
                Body=(local_dir / REPORT_NAME).read_bytes(), IfNoneMatch="*",
                Metadata=metadata, ContentType="application/json",
            )  # fmt: skip
        except Exception as exc:
            if _error_code(exc) == "PreconditionFailed":
                owner = self.published_by(uri)
                if owner == job_id:  # our own earlier run got there first: same bytes
                    return Published(loc.normalized, report_uri, already=True)
                # Another job's complete adapter is there; our uploads overwrote its files,
                # so it cannot be trusted either, but deleting it is not ours to do.
                raise StorageError(
                    f"{loc}: another job published to this output while this one ran"
                ) from None
            self._delete(loc.bucket, uploaded)
            _raise_mapped(exc, f"publishing to {loc}")
        return Published(loc.normalized, report_uri)

    def _delete(self, bucket: str, keys: list[str]) -> None:
        # Best effort: without a report, leftover files are not a published adapter.
        for key in keys:
            with contextlib.suppress(Exception):
                self.s3.delete_object(Bucket=bucket, Key=key)

    @staticmethod
    def _publish_local(local_dir: Path, target: Path) -> None:
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise StorageError(f"file://{target}/: exists and is not empty")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:12]}"
        try:
            shutil.copytree(local_dir, staging)
            os.rename(staging, target)  # atomic; replaces an empty directory
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise StorageError(f"file://{target}/: {exc}") from None


def _content_type(name: str) -> str:
    return "application/json" if name.endswith(".json") else "application/octet-stream"
