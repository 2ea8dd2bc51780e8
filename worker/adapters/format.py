"""The PEFT adapter format on disk, spelled out once: file names, tensor key templates, the
first bytes of a safetensors file, and the refusal of pickle weights (torch-free).

An adapter is a folder (or an S3 prefix) holding :data:`CONFIG_NAME` and :data:`WEIGHTS_NAME`.
A LoRA module's factors are stored as ``base_model.model.<module>.lora_A.weight`` (r × in) and
``.lora_B.weight`` (out × r); a VeRA module's as ``base_model.model.<module>.vera_lambda_b``
and ``.vera_lambda_d``, beside the shared projections :data:`VERA_PROJECTIONS`.

A safetensors file starts with a little-endian u64, the length of the JSON header that
follows, then ``{``. :func:`check_prefix` runs on a local file (the readers) and on the
first ranged GET the worker makes of an S3 input (``worker.storage``), so a broken file is
refused with the same words on either path, and a header length that would make a reader
allocate gigabytes is refused before anything allocates it. :func:`parse_header` reads the
JSON header itself with safetensors' own rules (known dtypes, shapes matching byte ranges,
tensors back to back and filling the data section), for a reader that never has the file
locally (``worker.adapters.streamed``) and for the tensors' offsets, which safetensors'
Python API does not expose.

>>> check_prefix(b"\\x00\\x00\\x00\\x00\\x00\\x01\\x00\\x00{", size=4096)
Traceback (most recent call last):
...
ValueError: header length 1099511627776 is over the 100000000-byte limit of safetensors
>>> lora_keys("model.layers.0.self_attn.q_proj")[0]
'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from jobs.errors import AdapterInvalid

__all__ = [
    "CONFIG_NAME",
    "DTYPE_SIZES",
    "HEADER_BYTES_PER_TENSOR",
    "HEADER_METADATA_BYTES",
    "LORA_KEY",
    "MAX_CONFIG_BYTES",
    "MAX_HEADER_BYTES",
    "MODEL_CARD_NAME",
    "PICKLE_NAMES",
    "PREFIX_BYTES",
    "REPORT_NAME",
    "VERA_LAMBDA_KEY",
    "VERA_PROJECTIONS",
    "WEIGHTS_NAME",
    "TensorEntry",
    "check_prefix",
    "check_weights_file",
    "count_entries",
    "header_length",
    "lora_keys",
    "max_header_bytes",
    "max_tensors",
    "module_order",
    "parse_header",
    "vera_lambda_keys",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: coremerge's own file beside a merged adapter; written last, it marks a complete output.
REPORT_NAME = "merge_report.json"
#: The merged adapter's model card (the Hugging Face convention: YAML front matter, Markdown).
MODEL_CARD_NAME = "README.md"
#: A config larger than this is not a PEFT config: refused before it is read (locally) or
#: copied (from the HEAD of a remote one).
MAX_CONFIG_BYTES = 1 << 20
#: Weights saved by ``torch.save``: never loaded (unpickling runs code).
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
VERA_LAMBDA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.vera_lambda_(?P<which>[bd])$")
VERA_PROJECTIONS = ("base_model.vera_A", "base_model.vera_B")

#: safetensors' own limit on the JSON header (``MAX_HEADER_SIZE``, 100 MB); a longer one is
#: refused by every safetensors reader, so it is refused here first, with a clearer message.
MAX_HEADER_BYTES = 100_000_000
#: Header bytes one tensor may take when a header is bounded by a module limit: its key (a
#: module name of a few hundred characters) with its dtype, shape and byte range, written
#: compactly as safetensors writes them (about 120 bytes for a Llama module's factor).
HEADER_BYTES_PER_TENSOR = 512
#: Header bytes allowed besides the tensors: ``__metadata__`` (PEFT writes
#: ``{"format": "pt"}``) and safetensors' alignment padding.
HEADER_METADATA_BYTES = 64 << 10
#: Bytes needed to check a file's prefix: the u64 length and the header's first byte.
PREFIX_BYTES = 9
#: Bytes per value of every dtype safetensors knows (a header naming another is invalid).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its dtype, shape and byte range in the data
    section (``start`` and ``end`` counted from the first byte after the header)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def lora_keys(module: str) -> tuple[str, str]:
    """The keys of ``module``'s lora_A and lora_B factors."""
    return f"{_PREFIX}{module}.lora_A.weight", f"{_PREFIX}{module}.lora_B.weight"


def module_order(module: str) -> str:
    """The sort key of the order in which modules are merged: the name of the module's
    lora_A tensor. safetensors writes a file's tensors sorted by name (within one dtype), so
    this is the data order of every adapter PEFT saves, and of the adapters coremerge writes
    (in merge order): a merge that follows it reads each input front to back."""
    return lora_keys(module)[0]


def vera_lambda_keys(module: str) -> tuple[str, str]:
    """The keys of ``module``'s VeRA vectors λ_b and λ_d."""
    return f"{_PREFIX}{module}.vera_lambda_b", f"{_PREFIX}{module}.vera_lambda_d"


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


def max_tensors(max_modules: int) -> int:
    """The most tensors an adapter of ``max_modules`` modules holds: two per module (LoRA's
    A and B, VeRA's λ_b and λ_d) and VeRA's two shared projections."""
    return 2 * max_modules + 2


def max_header_bytes(max_modules: int | None) -> int:
    """The longest header an adapter of at most ``max_modules`` modules can need (with no
    module limit, safetensors' own :data:`MAX_HEADER_BYTES`).

    >>> max_header_bytes(128)
    197632
    """
    if max_modules is None:
        return MAX_HEADER_BYTES
    needed = HEADER_METADATA_BYTES + max_tensors(max_modules) * HEADER_BYTES_PER_TENSOR
    return min(MAX_HEADER_BYTES, needed)


def count_entries(header: bytes) -> int:
    """How many tensors a JSON header lists at most, counted in its bytes before anything is
    parsed: every entry has one ``"data_offsets"`` key (a key or a string that contains
    the same bytes only makes the count larger, never smaller)."""
    return header.count(b'"data_offsets"')


def header_length(head: bytes) -> int:
    """The JSON header's length, from a file's first 8 bytes (after :func:`check_prefix`)."""
    return struct.unpack("<Q", head[:8])[0]


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_entry(key: str, info: object) -> TensorEntry:
    """One header entry, checked as safetensors checks it (``ValueError``: the reason, in
    safetensors' own words)."""
    bad = f"invalid shape, data type, or offset for tensor {key!r}"
    if not isinstance(info, dict):
        raise ValueError(f"{bad}: not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"{bad}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise ValueError(f"{bad}: shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_size(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise ValueError(f"{bad}: data_offsets {offsets!r}")
    if math.prod(shape) * DTYPE_SIZES[dtype] != offsets[1] - offsets[0]:
        raise ValueError(
            f"{bad}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, "
            f"not those of a {dtype} {shape}"
        )
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def parse_header(header: bytes, data_bytes: int) -> dict[str, TensorEntry]:
    """The tensors of a safetensors header (the JSON after the 8-byte length), checked as
    safetensors checks a file before it reads a tensor: a JSON object whose optional
    ``__metadata__`` maps strings to strings, known dtypes, each shape's size equal to its
    byte range, and the ranges back to back from 0 to ``data_bytes`` (the data section's
    size), so every byte of the file belongs to the header or to exactly one tensor.
    ``ValueError`` gives the reason, worded as safetensors words it.

    >>> parse_header(b'{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8)
    {'t': TensorEntry(dtype='F32', shape=(2,), start=0, end=8)}
    """
    try:
        raw = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"invalid JSON in header: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("invalid JSON in header: not an object")
    metadata = raw.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("invalid metadata: __metadata__ must map strings to strings")
    entries = {key: _tensor_entry(key, info) for key, info in raw.items()}
    end = 0
    for key, entry in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if entry.start != end:
            raise ValueError(
                f"invalid offset for tensor {key!r}: it starts at {entry.start}, not {end}"
            )
        end = entry.end
    if end != data_bytes:
        raise ValueError(
            f"incomplete metadata, file not fully covered ({end} of {data_bytes} data bytes)"
        )
    return entries


def check_weights_file(directory: Path, name: str) -> None:
    """Refuse a folder without :data:`WEIGHTS_NAME` (pickle weights are never loaded)."""
    if not (directory / WEIGHTS_NAME).is_file():
        pickles = [p for p in PICKLE_NAMES if (directory / p).exists()]
        reason = (
            f"only pickle weights ({pickles[0]}) found: they are never loaded; "
            "save the adapter with safe_serialization=True"
            if pickles
            else f"no {WEIGHTS_NAME}"
        )
        raise AdapterInvalid(f"adapter {name!r}: {reason}")
