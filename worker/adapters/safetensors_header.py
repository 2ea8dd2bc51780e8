"""The first bytes of a safetensors file, checked before anything else reads it (torch-free).

A safetensors file starts with a little-endian u64, the length of the JSON header that
follows, then ``{``. The same check runs on a local file (``AdapterReader``) and on the
9-byte ranged GET the worker makes before downloading from S3 (``worker.storage``), so a
broken file is refused with the same words on either path, and a header length that would
make a reader allocate gigabytes is refused before anything allocates it.

>>> check_prefix(b"\\x00\\x00\\x00\\x00\\x00\\x01\\x00\\x00{", size=4096)
Traceback (most recent call last):
...
ValueError: header length 1099511627776 is over the 100000000-byte limit of safetensors
"""

from __future__ import annotations

import struct

__all__ = ["MAX_HEADER_BYTES", "PREFIX_BYTES", "check_prefix"]

#: safetensors' own limit on the JSON header (``MAX_HEADER_SIZE``, 100 MB); a longer one is
#: refused by every safetensors reader, so it is refused here first, with a clearer message.
MAX_HEADER_BYTES = 100_000_000
#: Bytes needed to check a file's prefix: the u64 length and the header's first byte.
PREFIX_BYTES = 9


def check_prefix(head: bytes, size: int) -> None:
    """Raise ``ValueError`` (the reason, in words) unless ``head``, the first
    :data:`PREFIX_BYTES` of a ``size``-byte file, starts a plausible safetensors file."""
    if size < PREFIX_BYTES or len(head) < PREFIX_BYTES:
        raise ValueError(f"{size} bytes is too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > MAX_HEADER_BYTES:
        raise ValueError(
            f"header length {header_len} is over the {MAX_HEADER_BYTES}-byte limit of safetensors"
        )
    if header_len < 2 or 8 + header_len > size:
        raise ValueError(
            f"header length {header_len} does not fit in the file's {size} bytes "
            "(truncated, or not a safetensors file)"
        )
    if head[8:9] != b"{":
        raise ValueError("the header is not a JSON object (not a safetensors file)")
