"""One S3 bucket as an ``ObjectStore`` (boto3), and the S3 client the worker builds.

Reads are pinned: a ranged ``GetObject`` with ``If-Match`` on the ETag seen when the input
was sized, so an object swapped in between (or while the merge streams it) is refused
instead of read. Writes are conditional
creates: ``PutObject`` with ``If-None-Match: *`` for small objects, and for large ones a
multipart upload driven by hand (boto3's transfer helpers refuse conditional headers) whose
``CompleteMultipartUpload`` carries the condition; a failed upload is aborted. Both go
through botocore's retries (``standard`` mode); what still fails is mapped to a job error
(``worker.storage.errors``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from jobs.errors import StorageError

from .errors import (
    CONDITIONAL_CONFLICT,
    NOT_FOUND,
    PRECONDITION_FAILED,
    error_code,
    raise_mapped,
)
from .objects import AlreadyExists, ObjectInfo

__all__ = ["ConditionalConflict", "S3Store", "S3UploadSink", "make_s3_client"]

MiB = 1 << 20
#: Keys per ListObjectsV2 page (S3's most).
LIST_PAGE_KEYS = 1000
#: Attempts at a conditional create that S3 answers 409 (a concurrent conditional write).
CONFLICT_ATTEMPTS = 3


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


def _content_type(key: str) -> str:
    return "application/json" if key.endswith(".json") else "application/octet-stream"


#: Bytes copied at a time from a GET's body into its buffer.
BODY_CHUNK = 1 * MiB


def _read_body(body: Any, length: int) -> bytearray:
    """A GET's body read into one buffer of its announced length, chunk by chunk.

    ``body.read()`` would hold the body twice at its peak (http.client joins the chunks it
    reads), and the streamed inputs read spans of up to a part size on several connections
    at once: reading in place keeps a GET's memory at its length plus one chunk.
    botocore's StreamingBody raises if fewer bytes come than announced.
    """
    buffer = bytearray(length)
    view, at = memoryview(buffer), 0
    for chunk in body.iter_chunks(BODY_CHUNK):
        if at + len(chunk) > length:
            raise StorageError(f"a GET returned more than the {length} bytes it announced")
        view[at : at + len(chunk)] = chunk
        at += len(chunk)
    if at != length:
        raise StorageError(f"a GET returned {at} of the {length} bytes it announced")
    return buffer


class ConditionalConflict(StorageError):
    """S3 refused a conditional completion because of a concurrent conditional write (409):
    the whole upload may be tried again."""


class S3Store:
    """The bucket ``bucket`` through the boto3 client ``client``. Transfers of more than
    ``multipart_threshold`` bytes go in ``chunk_size`` parts, ``concurrency`` at a time."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        multipart_threshold: int = 64 * MiB,
        chunk_size: int = 16 * MiB,
        concurrency: int = 8,
    ) -> None:
        self.client, self.bucket = client, bucket
        self.multipart_threshold, self.chunk_size = multipart_threshold, chunk_size
        self.concurrency = concurrency
        self.page_size = LIST_PAGE_KEYS

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def head(self, key: str) -> ObjectInfo | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            # A HEAD of a missing key answers a bare 404; a named code (NoSuchBucket) says
            # more than "not here", and the message keeps it.
            if error_code(exc) in ("404", "NotFound"):
                return None
            raise_mapped(exc, self._uri(key))
        return ObjectInfo(key, head["ContentLength"], head["ETag"], head.get("Metadata", {}))

    def iter_keys(self, prefix: str) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": self.page_size}
        )
        try:
            for page in pages:  # one ListObjectsV2 request each, as the caller goes on
                for obj in page.get("Contents", []):
                    yield obj["Key"]
        except Exception as exc:
            raise_mapped(exc, self._uri(prefix))

    def _get(self, key: str, etag: str | None, start: int, end: int | None) -> bytearray:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if etag is not None:
            kwargs["IfMatch"] = etag
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            answer = self.client.get_object(**kwargs)
            return _read_body(answer["Body"], answer["ContentLength"])
        except Exception as exc:
            if error_code(exc) in PRECONDITION_FAILED:
                raise StorageError(
                    f"{self._uri(key)}: changed while this job was reading it; nothing was "
                    "published"
                ) from None
            raise_mapped(exc, self._uri(key))

    def read(
        self, key: str, *, etag: str | None = None, length: int | None = None, start: int = 0
    ) -> bytearray:
        return self._get(key, etag, start, None if length is None else start + length)

    def download(self, key: str, dest: Path, *, etag: str, size: int) -> None:
        """Ranged GETs of ``chunk_size``, ``concurrency`` at a time, each pinned to ``etag``
        and written at its offset."""
        ranges = [(s, min(s + self.chunk_size, size)) for s in range(0, size, self.chunk_size)]
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)

            def fetch(span: tuple[int, int]) -> None:
                data = self._get(key, etag, span[0], span[1])
                if len(data) != span[1] - span[0]:
                    raise StorageError(f"{self._uri(key)}: short read; nothing was merged")
                os.pwrite(fd, data, span[0])

            if len(ranges) <= 1:  # one plain GET
                os.pwrite(fd, self._get(key, etag, 0, None), 0)
            else:
                with ThreadPoolExecutor(min(self.concurrency, len(ranges))) as pool:
                    list(pool.map(fetch, ranges))
        finally:
            os.close(fd)

    def create(self, key: str, source: Path | bytes, metadata: Mapping[str, str]) -> None:
        size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
        for attempt in range(CONFLICT_ATTEMPTS):
            try:
                if isinstance(source, bytes) or size <= self.multipart_threshold:
                    body = source if isinstance(source, bytes) else Path(source).read_bytes()
                    self.client.put_object(
                        Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*",
                        Metadata=dict(metadata), ContentType=_content_type(key),
                    )  # fmt: skip
                else:
                    self._upload_file(key, Path(source), metadata)
                return
            except Exception as exc:
                code = error_code(exc)
                if code in PRECONDITION_FAILED:
                    raise AlreadyExists(key) from None
                conflict = isinstance(exc, ConditionalConflict) or code in CONDITIONAL_CONFLICT
                if conflict and attempt + 1 < CONFLICT_ATTEMPTS:
                    continue
                raise_mapped(exc, self._uri(key))

    def _upload_file(self, key: str, path: Path, metadata: Mapping[str, str]) -> None:
        """A large file by the same multipart upload that streams the merged weights."""
        sink = S3UploadSink(
            self, key, metadata, part_size=self.chunk_size, concurrency=self.concurrency
        )
        try:
            with open(path, "rb") as f:
                while chunk := f.read(self.chunk_size):
                    sink.write(chunk)
        except BaseException:
            sink.abort()
            raise
        sink.close()

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if error_code(exc) not in NOT_FOUND:
                raise_mapped(exc, self._uri(key))

    def upload_sink(self, key: str, metadata: Mapping[str, str]) -> S3UploadSink:
        """A multipart upload of ``key`` fed as the merge writes. Two parts in flight and one
        filling: at most three parts of memory (48 MiB by default)."""
        return S3UploadSink(self, key, metadata, part_size=self.chunk_size, concurrency=2)


class S3UploadSink:
    """A file-like target that uploads what is written to one new object as it comes: parts
    of ``part_size`` go up (``concurrency`` at a time) while the merge goes on, and
    ``close()`` completes the upload with ``If-None-Match: *`` (a plain conditional PUT when
    it all fit in one part). ``abort()`` discards it; nothing is ever created then.
    ``close()`` raises :class:`AlreadyExists` when the key was taken meanwhile."""

    def __init__(
        self,
        store: S3Store,
        key: str,
        metadata: Mapping[str, str],
        *,
        part_size: int = 16 * MiB,
        concurrency: int = 4,
    ) -> None:
        self.store, self.key, self.metadata = store, key, dict(metadata)
        self.part_size = max(part_size, 5 * MiB)  # S3's smallest part but the last
        # The part being filled, allocated once at its full size and handed over whole to
        # the upload (no slicing and joining): memory is the parts in flight plus this one.
        self._part = bytearray(self.part_size)
        self._filled = 0
        self._upload: str | None = None
        self._parts: list[tuple[int, Any]] = []  # (number, future of its ETag)
        self._pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="upload-part")
        self._max_pending = max(1, concurrency)

    @property
    def _client(self) -> Any:
        return self.store.client

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        while view:
            take = min(len(view), self.part_size - self._filled)
            self._part[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == self.part_size:
                self._send(self._part)
                self._part, self._filled = bytearray(self.part_size), 0
        return size

    def _last_part(self) -> bytearray:
        """What was written since the last full part (the buffer, cut to size in place)."""
        del self._part[self._filled :]
        return self._part

    def _send(self, body: bytes | bytearray) -> None:
        if self._upload is None:
            self._upload = self._call(
                self._client.create_multipart_upload, Bucket=self.store.bucket, Key=self.key,
                Metadata=self.metadata, ContentType=_content_type(self.key),
            )["UploadId"]  # fmt: skip
        pending = [f for _, f in self._parts if not f.done()]
        if len(pending) >= self._max_pending:  # bounds the memory parts in flight hold
            pending[0].result()
        number = len(self._parts) + 1
        self._parts.append((number, self._pool.submit(self._put_part, number, body)))

    def _put_part(self, number: int, body: bytes | bytearray) -> str:
        part = self._call(
            self._client.upload_part, Bucket=self.store.bucket, Key=self.key,
            UploadId=self._upload, PartNumber=number, Body=body,
        )  # fmt: skip
        return part["ETag"]

    def _call(self, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except Exception as exc:
            raise_mapped(exc, self.store._uri(self.key))

    def close(self) -> None:
        """Finish: the last part and the conditional completion (or one conditional PUT)."""
        try:
            if self._upload is None:
                self.store.create(self.key, bytes(self._last_part()), self.metadata)
                return
            if self._filled or not self._parts:
                self._send(self._last_part())
            parts = [{"PartNumber": n, "ETag": f.result()} for n, f in self._parts]
            try:
                self._client.complete_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=self._upload,
                    MultipartUpload={"Parts": parts}, IfNoneMatch="*",
                )  # fmt: skip
            except Exception as exc:
                code = error_code(exc)
                if code in PRECONDITION_FAILED:
                    raise AlreadyExists(self.key) from None
                if code in CONDITIONAL_CONFLICT:  # S3 asks to start the upload again
                    raise ConditionalConflict(
                        f"{self.store._uri(self.key)}: {code} (a concurrent conditional write)"
                    ) from None
                raise_mapped(exc, self.store._uri(self.key))
            self._upload = None  # completed: nothing to abort
        except BaseException:
            self.abort()
            raise
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        """Discard the upload (parts already sent are dropped by S3)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._upload is not None:
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=self._upload
                )
            self._upload = None
