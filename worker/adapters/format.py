"""The PEFT adapter format on disk, spelled out once: file names, tensor key templates, the
first bytes of a safetensors file, and the refusal of pickle weights (torch-free).

An adapter is a folder (or an S3 prefix) holding :data:`CONFIG_NAME` and :data:`WEIGHTS_NAME`.
A LoRA module's factors are stored as ``base_model.model.<module>.lora_A.weight`` (r × in) and
``.lora_B.weight`` (out × r); a VeRA module's as ``base_model.model.<module>.vera_lambda_b``
and ``.vera_lambda_d``, beside the shared projections :data:`VERA_PROJECTIONS`.

A safetensors file starts with a little-endian u64, the length of the JSON header that
follows, then ``{``. :func:`check_prefix` runs on a local file (the readers) and on the
9-byte ranged GET the worker makes before downloading from S3 (``worker.storage``), so a
broken file is refused with the same words on either path, and a header length that would
make a reader allocate gigabytes is refused before anything allocates it.

>>> check_prefix(b"\\x00\\x00\\x00\\x00\\x00\\x01\\x00\\x00{", size=4096)
Traceback (most recent call last):
...
ValueError: header length 1099511627776 is over the 100000000-byte limit of safetensors
>>> lora_keys("model.layers.0.self_attn.q_proj")[0]
'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from jobs.errors import AdapterInvalid

__all__ = [
    "CONFIG_NAME",
    "LORA_KEY",
    "MAX_HEADER_BYTES",
    "MODEL_CARD_NAME",
    "PICKLE_NAMES",
    "PREFIX_BYTES",
    "REPORT_NAME",
    "VERA_LAMBDA_KEY",
    "VERA_PROJECTIONS",
    "WEIGHTS_NAME",
    "check_prefix",
    "check_weights_file",
    "lora_keys",
    "vera_lambda_keys",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: coremerge's own file beside a merged adapter; written last, it marks a complete output.
REPORT_NAME = "merge_report.json"
#: The merged adapter's model card (the Hugging Face convention: YAML front matter, Markdown).
MODEL_CARD_NAME = "README.md"
#: Weights saved by ``torch.save``: never loaded (unpickling runs code).
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
VERA_LAMBDA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.vera_lambda_(?P<which>[bd])$")
VERA_PROJECTIONS = ("base_model.vera_A", "base_model.vera_B")

#: safetensors' own limit on the JSON header (``MAX_HEADER_SIZE``, 100 MB); a longer one is
#: refused by every safetensors reader, so it is refused here first, with a clearer message.
MAX_HEADER_BYTES = 100_000_000
#: Bytes needed to check a file's prefix: the u64 length and the header's first byte.
PREFIX_BYTES = 9


def lora_keys(module: str) -> tuple[str, str]:
    """The keys of ``module``'s lora_A and lora_B factors."""
    return f"{_PREFIX}{module}.lora_A.weight", f"{_PREFIX}{module}.lora_B.weight"


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
