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

Publishing never leaves a partial or mixed adapter looking complete, and never touches a
published one. First the publisher *claims* the output: ``.coremerge-claim`` put with
``IfNoneMatch="*"`` and the job id in its metadata (S3 has no conditional multipart upload
through s3transfer, so the adapter files themselves cannot be put conditionally; the claim is
what keeps a second job off them). Under the claim it checks, right before writing, that no
report is there; then it uploads the adapter files, and ``merge_report.json`` last, again
conditionally, which marks completion; then it drops the claim. A re-run of the same job (RQ
retries after a worker died) takes over its own claim and recognises its own report; another
job is refused (``storage_error``) without writing a byte. If publishing fails, what was
uploaded is deleted. A ``file://`` output is staged beside the target and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from jobs.errors import AccessDenied, AdapterInvalid, AdapterNotFound, MergeError, StorageError
from jobs.uris import Location, parse_uri
from worker.adapters.format import (
    CONFIG_NAME,
    PICKLE_NAMES,
    PREFIX_BYTES,
    REPORT_NAME,
    WEIGHTS_NAME,
    check_prefix,
)

__all__ = [
    "CLAIM_NAME",
    "CONFIG_NAME",
    "REPORT_NAME",
    "WEIGHTS_NAME",
    "Published",
    "Storage",
    "make_s3_client",
    "make_transfer_config",
]

#: The object that reserves an output for one job while it publishes (deleted afterwards).
CLAIM_NAME = ".coremerge-claim"
PICKLE_WEIGHTS = PICKLE_NAMES[0]  # the one PEFT writes without safe_serialization
#: S3 object metadata naming the job that published an output.
JOB_ID_META = "coremerge-job-id"

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
        retries={"mode": "standard", "total_max_attempts": settings.s3_max_attempts},
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


def _error_code(exc: BaseException) -> str | None:
    """S3's error code (or HTTP status) behind ``exc``. boto3's ``upload_file`` wraps the
    client error in ``S3UploadFailedError`` (raised while handling it, so it is the
    ``__context__``): follow the chain, or an AccessDenied upload would read as a bare
    storage error."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            return code or status
        seen = seen.__cause__ or seen.__context__
    return None


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
    try:
        check_prefix(head, size)
    except ValueError as exc:
        raise AdapterInvalid(f"{what}: not a valid safetensors file ({exc})") from None


def release_claim(settings: Any, job_id: str, uri: str) -> None:
    """Drop ``job_id``'s claim on the output at ``uri`` once the job has ended ``failed``
    because its last run's worker died: a run killed while publishing leaves its claim, and
    with no run of the job to come back, it would keep every later job off that output.
    Only a claim this job holds is touched (best effort, as :meth:`Storage.drop_claim`)."""
    if parse_uri(uri).scheme == "s3":
        Storage(make_s3_client(settings)).drop_claim(uri, job_id)


class Storage:
    """Fetches adapters and publishes outputs. ``s3`` is a boto3 S3 client (or ``None`` when
    only ``file://`` locations are used)."""

    def __init__(
        self,
        s3: Any = None,
        *,
        transfer_config: Any = None,
        max_job_bytes: int | None = None,
        max_adapter_bytes: int | None = None,
        max_parallel: int = 8,
    ) -> None:
        self.s3 = s3
        self.transfer_config = transfer_config
        self.max_job_bytes = max_job_bytes
        self.max_adapter_bytes = max_adapter_bytes
        self.max_parallel = max_parallel

    # -- inputs
    def fetch_adapters(self, uris: Sequence[str], dest: Path) -> list[Path]:
        """Local directories holding the adapters at ``uris``, in order. S3 adapters are
        downloaded to ``dest/<index>/`` (never to a path built from a key), after every
        adapter's size and safetensors header were checked; ``file://`` ones are used in place."""
        locations = [parse_uri(u) for u in uris]
        with ThreadPoolExecutor(min(self.max_parallel, len(locations)) or 1) as pool:
            sizes = list(pool.map(self._inspect, locations))
            for loc, size in zip(locations, sizes, strict=True):
                if self.max_adapter_bytes is not None and size > self.max_adapter_bytes:
                    raise AdapterInvalid(
                        f"{loc}: {size} bytes, over this service's limit of "
                        f"{self.max_adapter_bytes} per adapter (COREMERGE_MAX_ADAPTER_BYTES)"
                    )
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
                if isinstance(_mapped(exc, what), AdapterNotFound):
                    if name == WEIGHTS_NAME:
                        self._refuse_pickle(loc)
                    else:
                        self._refuse_configless(loc)
                _raise_mapped(exc, what)
        what = f"{loc}{WEIGHTS_NAME}"
        if sizes[WEIGHTS_NAME] < PREFIX_BYTES:  # a ranged GET past the end is a 416
            _check_safetensors_prefix(b"", sizes[WEIGHTS_NAME], what)
        try:
            body = self.s3.get_object(
                Bucket=loc.bucket, Key=loc.child(WEIGHTS_NAME), Range=f"bytes=0-{PREFIX_BYTES - 1}"
            )["Body"]
            head = body.read()
        except Exception as exc:
            _raise_mapped(exc, what)
        _check_safetensors_prefix(head, sizes[WEIGHTS_NAME], what)
        return sum(sizes.values())

    def _refuse_configless(self, loc: Location) -> None:
        """Weights without a config are an invalid adapter, not a missing one."""
        for name in (WEIGHTS_NAME, PICKLE_WEIGHTS):
            try:
                self.s3.head_object(Bucket=loc.bucket, Key=loc.child(name))
            except Exception:
                continue
            raise AdapterInvalid(f"{loc}: has {name} but no {CONFIG_NAME} (not a PEFT adapter)")

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
            if weights.is_file() or (path / PICKLE_WEIGHTS).is_file():
                raise AdapterInvalid(f"{loc}: no {CONFIG_NAME} (not a PEFT adapter)")
            raise AdapterNotFound(f"{loc}{CONFIG_NAME}: not found")
        if not weights.is_file():
            if (path / PICKLE_WEIGHTS).is_file():
                raise AdapterInvalid(f"{loc}: pickle {PICKLE_WEIGHTS} is refused; use safetensors")
            raise AdapterNotFound(f"{loc}{WEIGHTS_NAME}: not found")
        with open(weights, "rb") as f:
            _check_safetensors_prefix(
                f.read(PREFIX_BYTES), weights.stat().st_size, f"{loc}{WEIGHTS_NAME}"
            )
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
        """Publish the merged adapter in ``local_dir`` at ``uri``: claim, check, files, the
        report last (module docstring)."""
        loc = parse_uri(uri)
        report_uri = f"{loc}{REPORT_NAME}"
        if loc.scheme == "file":
            self._publish_local(local_dir, Path(loc.path))
            return Published(loc.normalized, report_uri)
        names = sorted(p.name for p in local_dir.iterdir() if p.is_file() and p.name != REPORT_NAME)
        metadata = {JOB_ID_META: job_id}
        claim = self._claim(loc, job_id)
        uploaded: list[str] = []
        try:
            # Checked under the claim, right before writing: a report here means the adapter
            # is published (by an earlier run of this job, or by another job before claims
            # existed), and its files must not be touched.
            owner = self.published_by(uri)
            if owner is not None:
                self._delete(loc.bucket, [claim])
                if owner == job_id:
                    return Published(loc.normalized, report_uri, already=True)
                raise StorageError(
                    f"{loc}: already holds a merged adapter; give each job its own output.uri"
                )
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
            if _error_code(exc) == "PreconditionFailed" and self.published_by(uri) == job_id:
                # Another run of this same job (one given up for dead that was not) finished
                # first, from the same inputs, spec and seed.
                self._delete(loc.bucket, [claim])
                return Published(loc.normalized, report_uri, already=True)
            self._delete(loc.bucket, [*uploaded, claim])
            _raise_mapped(exc, f"publishing to {loc}")
        self._delete(loc.bucket, [claim])  # the report marks completion from now on
        return Published(loc.normalized, report_uri)

    def drop_claim(self, uri: str, job_id: str) -> None:
        """Delete ``job_id``'s claim on the output at ``uri``, if one is left: a run killed
        after its report and before dropping its claim leaves it, and the re-run that finds
        the report published cleans up after it (best effort; a claim beside a report
        blocks nothing that the report does not)."""
        loc = parse_uri(uri)
        if loc.scheme == "file":
            return
        key = loc.child(CLAIM_NAME)
        try:
            holder = self.s3.head_object(Bucket=loc.bucket, Key=key)["Metadata"]
        except Exception:
            return
        if holder.get(JOB_ID_META) == job_id:
            self._delete(loc.bucket, [key])

    def _claim(self, loc: Location, job_id: str) -> str:
        """Reserve the output at ``loc`` for ``job_id``; returns the claim's key. A claim left
        by an earlier run of the same job (its worker died while publishing) is taken over;
        one held by another job is a ``StorageError``."""
        key = loc.child(CLAIM_NAME)
        what = f"{loc}{CLAIM_NAME}"
        for _ in range(2):  # a claim released between our put and our HEAD: try once more
            try:
                self.s3.put_object(
                    Bucket=loc.bucket, Key=key, Body=job_id.encode(), IfNoneMatch="*",
                    Metadata={JOB_ID_META: job_id}, ContentType="text/plain",
                )  # fmt: skip
                return key
            except Exception as exc:
                if _error_code(exc) != "PreconditionFailed":
                    _raise_mapped(exc, what)
            try:
                holder = self.s3.head_object(Bucket=loc.bucket, Key=key)["Metadata"]
            except Exception as exc:
                if isinstance(_mapped(exc, what), AdapterNotFound):
                    continue
                _raise_mapped(exc, what)
            if holder.get(JOB_ID_META) == job_id:
                return key
            raise StorageError(
                f"{loc}: job {holder.get(JOB_ID_META) or '?'} is publishing to this output (or "
                f"died while publishing: delete {what} to free it); give each job its own output.uri"
            )
        raise StorageError(f"{loc}: could not claim the output (claims keep changing hands)")

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
