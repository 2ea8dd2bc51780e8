"""An adapter's safetensors header, read and parsed within bounds (torch-free).

Every reader goes through here, a local file (``worker.adapters.lora``, ``.vera``) and an
object streamed from S3 (``.streamed``), and so does the storage layer's first look at an
S3 input (``worker.storage.inputs``): the same checks, in the same order, with the same words.

1. The 8-byte length and the first byte (:func:`worker.adapters.format.check_prefix`).
2. The length against what the service's module limit can need
   (:func:`check_header_length`): a header longer than that is refused before its bytes
   are read, let alone parsed.
3. The entries counted in the raw bytes against the same limit, before the JSON is parsed
   into objects (:func:`parse_bounded`): a header of many tiny tensors costs a byte count,
   not a dictionary per tensor.
4. The JSON parsed and checked as safetensors checks it
   (:func:`worker.adapters.format.parse_header`).

``max_modules`` is ``COREMERGE_MAX_MODULES`` in the service and ``None`` in the CLI, where
safetensors' own 100 MB limit is the bound.
"""

from __future__ import annotations

from pathlib import Path

from jobs.errors import AdapterInvalid, LimitExceeded, reason

from .format import (
    PREFIX_BYTES,
    WEIGHTS_NAME,
    TensorEntry,
    check_prefix,
    count_entries,
    header_length,
    max_header_bytes,
    max_tensors,
    parse_header,
)

__all__ = [
    "PARSED_BYTES_PER_HEADER_BYTE",
    "check_header_length",
    "held_for_header",
    "parse_bounded",
    "read_header",
]

#: Memory an opened source keeps per byte of its JSON header, for as long as it is open: the
#: parsed entries, the modules and the lookups built from them. Measured (tracemalloc) at
#: 7.0 for a LoRA adapter of 1 × 1 modules read as the merge goes, the most of the readers,
#: and 2.5 for a local one; tests/adapters/test_header.py holds every reader to it.
PARSED_BYTES_PER_HEADER_BYTE = 8
#: Header bytes whose parsed form the work-memory estimate's fixed allowance for the process
#: covers (``worker.merge.memory``): an adapter of about 64 modules, 128 KiB parsed.
HEADER_BYTES_ALLOWED = 16 << 10


def held_for_header(length: int) -> int:
    """What a source counts in ``held_bytes`` for its parsed ``length``-byte header."""
    return PARSED_BYTES_PER_HEADER_BYTE * max(0, length - HEADER_BYTES_ALLOWED)


def invalid(name: str, why: BaseException) -> AdapterInvalid:
    """The refusal of a weights file that is not valid safetensors (``why`` in words that
    name no local path)."""
    return AdapterInvalid(
        f"adapter {name!r}: {WEIGHTS_NAME} is not a valid safetensors file ({reason(why)})"
    )


def check_header_length(what: str, length: int, max_modules: int | None) -> None:
    """Refuse a header of ``length`` bytes longer than an adapter of ``max_modules`` modules
    can need; ``what`` names the adapter (its name, or its location)."""
    bound = max_header_bytes(max_modules)
    if max_modules is not None and length > bound:
        raise LimitExceeded(
            f"{what}: {WEIGHTS_NAME} has a {length}-byte header, more than the {bound} bytes "
            f"that this service's limit of {max_modules} modules can need (COREMERGE_MAX_MODULES)"
        )


def parse_bounded(
    name: str, header: bytes, data_bytes: int, max_modules: int | None
) -> dict[str, TensorEntry]:
    """The tensors of a JSON header, its entries counted against ``max_modules`` first."""
    check_header_length(f"adapter {name!r}", len(header), max_modules)
    if max_modules is not None:
        count, most = count_entries(header), max_tensors(max_modules)
        if count > most:
            raise LimitExceeded(
                f"adapter {name!r}: {WEIGHTS_NAME} lists {count} tensors, more than the {most} "
                f"that this service's limit of {max_modules} modules can hold "
                "(COREMERGE_MAX_MODULES)"
            )
    try:
        return parse_header(header, data_bytes)
    except ValueError as exc:
        raise invalid(name, exc) from None


def read_header(
    path: Path, name: str, nbytes: int, max_modules: int | None
) -> tuple[dict[str, TensorEntry], int]:
    """The tensors of the ``nbytes``-byte safetensors file at ``path`` and its header's
    length, read within bounds (the module docstring's steps)."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(PREFIX_BYTES)
            check_prefix(prefix, nbytes)
            length = header_length(prefix)
            check_header_length(f"adapter {name!r}", length, max_modules)
            header = prefix[8:] + f.read(length - 1)
    except (OSError, ValueError) as exc:
        raise invalid(name, exc) from None
    return parse_bounded(name, header, nbytes - 8 - length, max_modules), length
