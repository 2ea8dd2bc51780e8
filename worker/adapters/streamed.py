"""A LoRA adapter read straight from object storage as the merge goes (an ``AdapterSource``).

The worker does not copy an S3 input to its disk first: it reads the safetensors header
(already in the bytes the input check fetched, ``worker.storage.inputs``), then the data
section in FILE order, in spans of whole tensors fetched by ranged GETs a few spans ahead of
the merge, on the job's small pool of connections (:class:`ReadAhead`). Each GET goes
through the ``RemoteFile`` the storage layer handed out (``worker.adapters.source``), which
pins it to the ETag the input was sized by: an object replaced mid-job is refused
(``storage_error``), never mixed in.

    span 0 (fetched, being read) │ span 1 (fetched) │ span 2 (in flight) │ span 3 …
    └──────── at most ``window_bytes`` held ────────────────────────────┘

- **Memory.** A span is dropped once the merge has read every tensor in it and it has been
  hashed; a new one is fetched only while the bytes held stay within ``window_bytes`` (one
  span at least). So memory follows the window, not the adapter; ``held_bytes`` declares it
  to the work-memory estimate, and ``read_bytes`` adds the one copy a read makes.
- **Order.** The plan asks for modules in ``format.module_order``, safetensors' own key
  order, which is the data order of every file written by safetensors (PEFT's, and
  coremerge's outputs), so the merge consumes the spans front to back. A read whose span is
  beyond the window waits for it only when every tensor still unread before it belongs to
  another module whose read is under way and not itself waiting so (the window will move, and
  no two reads can wait on each other); otherwise (another layout, a module whose factors
  lie apart, or a second read of a module already dropped) the module is fetched on its own
  by a ranged GET: correct and bounded, at the cost of its bytes twice.
- **sha256.** Every byte (prefix, header, then every span, including tensors the merge
  does not read) goes through one ``hashlib.sha256`` in file order as spans arrive, so the
  digest of the object is known when the last span is in, without a second pass.
- **Decoding.** Tensors are built from the bytes by safetensors' rules (little-endian, the
  header's dtype and shape, ranges checked by ``format.parse_header``): no pickle, no
  ``torch.load``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from types import TracebackType

import torch

from jobs.errors import StorageError

from .config import LoraAdapterConfig
from .factors import as_factors, read_after_close
from .format import PREFIX_BYTES, WEIGHTS_NAME, TensorEntry, check_prefix, header_length, lora_keys
from .header import check_header_length, held_for_header, invalid, parse_bounded
from .lora import lora_modules
from .source import ModuleInfo, RemoteFile

__all__ = ["ReadAhead", "StreamStats", "StreamedLoraReader"]

#: The smallest window one streamed input gets, however many share the job's.
MIN_WINDOW_BYTES = 256 << 10

_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


class ReadAhead:
    """The job's streamed reading: a pool of ``connections`` threads that every streamed
    input shares, and ``window_bytes`` of look-ahead split between the inputs. Spans are at
    most ``span_bytes`` (the S3 part size) and at most half an input's window, so a span can
    be in flight while the one before it is being read. Close it (or use ``with``) when the
    job ends: fetches not started are dropped."""

    def __init__(self, window_bytes: int, span_bytes: int, connections: int) -> None:
        self.window_bytes, self.span_bytes = window_bytes, span_bytes
        self._pool = ThreadPoolExecutor(max(1, connections), thread_name_prefix="s3-read")

    def share(self, inputs: int) -> tuple[int, int]:
        """(window, span) bytes of one of ``inputs`` streamed inputs."""
        window = max(self.window_bytes // max(1, inputs), MIN_WINDOW_BYTES)
        return window, max(1, min(self.span_bytes, window // 2))

    def submit(self, fn: Callable[[], None]) -> Future[None]:
        return self._pool.submit(fn)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass
class _Span:
    """Whole tensors, back to back in the file: fetched by one ranged GET."""

    start: int  # file offsets, end exclusive
    end: int
    pending: set[str]  # tensors of the span the merge has not read yet
    fetching: bool = False
    data: bytes | None = None
    hashed: bool = False
    released: bool = False

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class StreamStats:
    """What a streamed input did, for tests and the benchmark."""

    gets: int = 0  # ranged GETs after the header (spans and lone modules)
    span_bytes: int = 0  # bytes fetched in spans (each byte of the data section once)
    direct_bytes: int = 0  # bytes fetched again for modules requested outside the window
    held_bytes: int = 0  # bytes held now (fetched or in flight, not yet dropped)
    peak_held_bytes: int = 0


def _spans(entries: dict[str, TensorEntry], data_start: int, span_bytes: int) -> list[_Span]:
    """The data section cut at tensor boundaries into spans of about ``span_bytes`` (a
    larger tensor is a span of its own), in file order."""
    spans: list[_Span] = []
    for key, entry in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        start, end = data_start + entry.start, data_start + entry.end
        if spans and end - spans[-1].start <= span_bytes:
            spans[-1].end = end
            spans[-1].pending.add(key)
        else:
            spans.append(_Span(start, end, {key}))
    return spans


def _decode(data: bytes | memoryview, entry: TensorEntry) -> torch.Tensor:
    """A tensor from its bytes (little-endian, as safetensors stores it), in its own
    writable memory: the span it came from can be dropped at once."""
    raw = bytearray(data)
    return torch.frombuffer(raw, dtype=_TORCH_DTYPES[entry.dtype]).reshape(entry.shape)


class StreamedLoraReader:
    """A PEFT LoRA adapter's weights in object storage, read as the merge asks for them.

    ``weights.head`` is the object's first bytes as the input check read them (at least the
    9-byte prefix; usually the whole header); ``weights.fetch`` reads any other range,
    pinned. Opening reads the rest of the header if the head stops short (within the bound
    ``max_modules`` sets, ``worker.adapters.header``), and refuses what
    :class:`worker.adapters.lora.LoraReader` refuses, with the same messages. The reader's
    share of the job's look-ahead is ``window_bytes``, in spans of at most ``span_bytes``.
    """

    streamed = True  # the digest comes from the bytes as they arrive

    def __init__(
        self,
        name: str,
        config: LoraAdapterConfig,
        weights: RemoteFile,
        *,
        read_ahead: ReadAhead,
        window_bytes: int,
        span_bytes: int,
        max_modules: int | None = None,
    ) -> None:
        self.name, self.config, self.nbytes = name, config, weights.size
        self._fetch_range, self._read_ahead = weights.fetch, read_ahead
        self._sha = hashlib.sha256()
        header = self._header(weights.head, max_modules)
        self._data_start = PREFIX_BYTES - 1 + len(header)
        entries = parse_bounded(name, header, self.nbytes - self._data_start, max_modules)
        modules, stored = lora_modules(name, config, entries)
        self._entries_by_key = entries
        self._prefetched = weights.head[self._data_start :]  # data bytes the check already read
        self._spans = _spans(entries, self._data_start, span_bytes)
        self._span_of = {k: i for i, s in enumerate(self._spans) for k in s.pending}
        self._module_of = {key: m for m in modules for key in lora_keys(m)}
        # Reads under way: module → whether it waits for a span beyond the window.
        self._reading: dict[str, bool] = {}
        # A read outside the window holds the module's fetched bytes besides its tensors.
        self.modules: dict[str, ModuleInfo] = {
            m: replace(info, read_bytes=info.read_bytes + stored[m]) for m, info in modules.items()
        }
        self._window = window_bytes
        parsed = held_for_header(len(header))
        self.held_bytes = max([window_bytes, *(s.nbytes for s in self._spans)]) + parsed
        self.stats = StreamStats()
        self._cond = threading.Condition()
        self._next = 0  # the next span to fetch
        self._front = 0  # no span before this one holds bytes or unread tensors
        self._hash_next = 0  # the next span to hash
        self._hashing = False  # a thread is hashing a span (outside the lock)
        self._draining = False  # sha256() asked: drop spans once hashed
        self._closed = False
        self._error: BaseException | None = None

    # -- opening

    def _header(self, head: bytes, max_modules: int | None) -> bytes:
        """The JSON header, checked (prefix and length first) and hashed with the prefix."""
        try:
            check_prefix(head[:PREFIX_BYTES], self.nbytes)
        except ValueError as exc:
            raise invalid(self.name, exc) from None
        check_header_length(f"adapter {self.name!r}", header_length(head), max_modules)
        end = PREFIX_BYTES - 1 + header_length(head)
        if len(head) < end:
            head = head + self._fetch_range(len(head), end)
        self._sha.update(head[:end])
        return head[PREFIX_BYTES - 1 : end]

    # -- fetching and hashing, in file order (call with the lock held unless said otherwise)

    def _account(self, delta: int) -> None:
        s = self.stats
        s.held_bytes += delta
        s.peak_held_bytes = max(s.peak_held_bytes, s.held_bytes)

    def _schedule(self) -> None:
        """Start fetching the next spans while the window has room (one span at least)."""
        while self._next < len(self._spans) and not self._closed and self._error is None:
            span = self._spans[self._next]
            if self.stats.held_bytes and self.stats.held_bytes + span.nbytes > self._window:
                return
            span.fetching = True
            self._account(span.nbytes)
            index = self._next
            self._next += 1
            self._read_ahead.submit(lambda i=index: self._fetch_span(i))

    def _span_bytes(self, span: _Span) -> bytes:
        """The span's bytes: what the input check read already, then one ranged GET."""
        have_end = self._data_start + len(self._prefetched)
        if span.start >= have_end:
            return self._get(span.start, span.end)
        local = self._prefetched[span.start - self._data_start : span.end - self._data_start]
        return local if span.end <= have_end else local + self._get(have_end, span.end)

    def _get(self, start: int, end: int) -> bytes:
        """One pinned ranged GET (outside the lock)."""
        data = self._fetch_range(start, end)
        if len(data) != end - start:
            raise StorageError(
                f"adapter {self.name!r}: a read of {WEIGHTS_NAME} returned {len(data)} of "
                f"{end - start} bytes; nothing was published"
            )
        with self._cond:
            self.stats.gets += 1
        return data

    def _fetch_span(self, index: int) -> None:
        """A pool thread: fetch one span, keep it, and hash whatever is next in order."""
        span = self._spans[index]
        try:
            data = None if self._closed else self._span_bytes(span)
        except BaseException as exc:  # raised to the merge at its next read
            with self._cond:
                self._error = self._error or exc
                self._cond.notify_all()
            return
        with self._cond:
            if self._closed or data is None:
                return
            span.data = data
            self.stats.span_bytes += len(data)
            self._cond.notify_all()
        self._hash_in_order()

    def _hash_in_order(self) -> None:
        """Feed the spans that are next in file order to the digest, one thread at a time;
        hashlib releases the GIL while it hashes, so this runs beside the merge."""
        while True:
            with self._cond:
                if self._hashing or self._hash_next >= len(self._spans):
                    return
                span = self._spans[self._hash_next]
                if span.data is None or self._closed:
                    return
                self._hashing = True
            self._sha.update(span.data)
            with self._cond:
                self._hashing = False
                span.hashed = True
                self._hash_next += 1
                self._release_if_done(span)
                self._cond.notify_all()

    def _release_if_done(self, span: _Span) -> None:
        """Drop a span read in full and hashed, and fetch further."""
        if span.hashed and not span.released and (self._draining or not span.pending):
            span.data, span.released = None, True
            self._account(-span.nbytes)
            self._schedule()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise read_after_close(self.name)

    # -- reading

    def _reachable(self, index: int, module: str) -> bool:
        """Whether the read of ``module`` may wait for span ``index``: it is on its way, or
        every tensor still unread before it belongs to another read under way that waits
        for nothing beyond the window (so the window will move). False: fetch it alone."""
        span = self._spans[index]
        if span.released:
            return False  # read once already, and dropped
        if index >= self._next:
            self._schedule()
        if index < self._next:
            return True
        while self._front < index and self._spans[self._front].released:
            self._front += 1
        for earlier in self._spans[self._front : index]:
            for key in earlier.pending:
                owner = self._module_of[key]
                if owner == module or self._reading.get(owner) is not False:
                    return False
        self._reading[module] = True  # waits beyond the window: no one may wait on it
        return True

    def _take(
        self, module: str, keys: tuple[str, ...]
    ) -> list[tuple[bytes | memoryview, TensorEntry]] | None:
        """The keys' bytes from the window (waiting for their spans), each marked read;
        None when a key lies outside the window (to be fetched on its own)."""
        with self._cond:
            self._raise_if_failed()
            self._reading[module] = False
            try:
                indices = sorted({self._span_of[k] for k in keys})
                # A module read before (its keys no longer pending) is not waited for: its
                # spans may be dropped as soon as they are hashed.
                unread = all(k in self._spans[self._span_of[k]].pending for k in keys)
                inside = unread and all(self._reachable(i, module) for i in indices)
                if inside:
                    self._cond.wait_for(
                        lambda: (
                            self._error is not None
                            or self._closed
                            or all(self._spans[i].data is not None for i in indices)
                        )
                    )
                    self._raise_if_failed()
                taken = []
                for key in keys:
                    span, entry = self._spans[self._span_of[key]], self._entries_by_key[key]
                    if inside:
                        at = self._data_start + entry.start - span.start
                        taken.append((memoryview(span.data)[at : at + entry.nbytes], entry))
                    span.pending.discard(key)
                    self._release_if_done(span)
                return taken if inside else None
            finally:
                del self._reading[module]

    def _fetch_alone(self, keys: tuple[str, ...]) -> list[tuple[bytes, TensorEntry]]:
        """The keys' bytes by ranged GETs of their own (outside the window)."""
        out = []
        for key in keys:
            entry = self._entries_by_key[key]
            data = self._get(self._data_start + entry.start, self._data_start + entry.end)
            with self._cond:
                self.stats.direct_bytes += len(data)
            out.append((data, entry))
        return out

    def read(
        self, module: str, device: torch.device | str = "cpu", *, check: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r × n) and B (m × r) of ``module`` as float32 on ``device``; no scaling applied
        (``check`` as in ``AdapterSource.read``). Waits for the module's span when it is in
        the window; fetches the module alone otherwise."""
        keys = lora_keys(module)
        parts = self._take(module, keys) or self._fetch_alone(keys)
        A, B = (_decode(data, entry) for data, entry in parts)
        return as_factors(self.name, module, A, B, device, check)

    # -- the digest and the end

    def sha256(self) -> str:
        """The object's sha256 (hex): every byte went through the digest as it arrived; the
        spans the merge did not need (if any) are fetched now, and dropped once hashed."""
        with self._cond:
            self._draining = True
            for span in self._spans:
                self._release_if_done(span)
            self._schedule()
            self._cond.wait_for(
                lambda: (
                    self._error is not None or self._closed or self._hash_next >= len(self._spans)
                )
            )
            self._raise_if_failed()
        return self._sha.hexdigest()

    def close(self) -> None:
        """Stop: spans not fetched yet are not, those in flight are dropped when they land,
        and every byte held goes; final (``AdapterSource``)."""
        with self._cond:
            self._closed = True
            for span in self._spans:
                if span.fetching and not span.released:
                    span.data, span.released = None, True
                    self._account(-span.nbytes)
            self._prefetched = b""
            self._cond.notify_all()
