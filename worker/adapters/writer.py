"""Writing the merged adapter: a streamed safetensors file and its PEFT config (docs/guarantees.md).

The safetensors layout (names, dtypes, shapes, offsets) is fixed before the first module is
merged, so the header goes first and each module's factors are appended as soon as they
exist: the output never has to be held in memory. The result is an ordinary safetensors
file (8-byte header length, JSON header padded to 8 bytes, then the tensors back to back).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = [
    "OUTPUT_DTYPES",
    "NonFiniteTensor",
    "SafetensorsStreamWriter",
    "TensorSlot",
    "all_finite",
    "lora_config_json",
]

#: Chunks handed to the writing and hashing threads and not yet done with; a producer that
#: gets this far ahead waits. Bounds the memory the queue holds (a chunk is one tensor).
MAX_IN_FLIGHT = 4

#: Storage dtypes of the output and their safetensors names.
OUTPUT_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "F32"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "float16": (torch.float16, "F16"),
}


#: Elements the finiteness check sums at a time: its float64 temporary stays at 8 MiB.
FINITE_CHECK_CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorSlot:
    name: str
    shape: tuple[int, ...]


class NonFiniteTensor(ValueError):
    """A tensor holds NaN or ±inf once cast to the file's dtype; nothing of it was written."""

    def __init__(self, name: str, dtype: str) -> None:
        super().__init__(f"tensor {name!r} has NaN or infinite values in {dtype}")
        self.name, self.dtype = name, dtype


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite, in one pass and without a copy of ``t``.

    A sum is finite exactly when every summand is, as long as finite summands cannot overflow
    it: a float64 sum of at most :data:`FINITE_CHECK_CHUNK` float32 (or narrower) values
    cannot. So ``t`` is summed chunk by chunk in float64, and only a chunk's float64 copy is
    ever allocated (``torch.isfinite(t).all()`` would allocate about twice ``t``).
    """
    for chunk in t.reshape(-1).split(FINITE_CHECK_CHUNK):
        if not math.isfinite(float(chunk.sum(dtype=torch.float64))):
            return False
    return True


class SafetensorsStreamWriter:
    """Write tensors of a known layout one by one, in layout order; sha256 of the file as it goes.

    >>> w = SafetensorsStreamWriter(path, [TensorSlot("x", (2, 3))], "float32")  # doctest: +SKIP
    >>> w.write("x", torch.zeros(2, 3)); w.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        path: Path,
        slots: list[TensorSlot],
        dtype: str,
        metadata: dict[str, str] | None = None,
        sink: BinaryIO | None = None,
    ) -> None:
        """``sink``, when given, receives the bytes instead of a new file at ``path`` (an
        upload to the store, ``worker.storage.s3.S3UploadSink``): its ``close()`` finishes
        it, and its ``abort()``, if it has one, discards it."""
        self.dtype = dtype
        self.torch_dtype, st_dtype = OUTPUT_DTYPES[dtype]
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for slot in slots:
            size = itemsize * _numel(slot.shape)
            header[slot.name] = {
                "dtype": st_dtype,
                "shape": list(slot.shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep the tensor data 8-byte aligned
        self._pending = list(slots)
        self._sha = hashlib.sha256()
        # The file is written and hashed on two threads of their own (file writes and hashlib
        # release the GIL), each in order, beside the merge of the next module; each chunk is
        # kept alive until both are done with it.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-out")
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256-out")
        self._in_flight: deque[tuple[Future, Future]] = deque()
        self._file: BinaryIO = sink if sink is not None else open(path, "xb")  # noqa: SIM115
        self._emit(struct.pack("<Q", len(blob)) + blob)
        self.nbytes = 8 + len(blob) + offset

    def _emit(self, data: bytes | memoryview) -> None:
        while len(self._in_flight) >= MAX_IN_FLIGHT:
            self._wait_oldest()
        self._in_flight.append(
            (
                self._writer.submit(self._file.write, data),
                self._hasher.submit(self._sha.update, data),
            )
        )

    def _wait_oldest(self) -> None:
        """Wait for the oldest chunk; a failed write (a full disk) raises here."""
        for future in self._in_flight.popleft():
            future.result()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` as the next slot, which must be ``name`` with the planned shape.

        Raises :class:`NonFiniteTensor`, writing nothing of it, when a value is NaN or
        infinite once cast to the file's dtype (a float32 value beyond float16's ±65504 is
        finite before the cast and inf after it): a PEFT model would load such a file and
        produce NaN, so it is never written.
        """
        slot = self._pending.pop(0)
        if slot.name != name or tuple(tensor.shape) != slot.shape:
            raise ValueError(f"expected {slot.name} {slot.shape}, got {name} {tuple(tensor.shape)}")
        t = tensor.detach().to(device="cpu", dtype=self.torch_dtype).contiguous()
        if not all_finite(t):
            raise NonFiniteTensor(name, self.dtype)
        # numpy has no bfloat16: write the raw bytes through a same-size integer view.
        raw = t.view(torch.int16) if t.element_size() == 2 else t
        self._emit(memoryview(raw.numpy()).cast("B"))

    def close(self) -> str:
        """Finish the file; returns its sha256. Fails if a planned tensor was never written."""
        try:
            while self._in_flight:
                self._wait_oldest()
            if self._pending:
                raise ValueError(f"{len(self._pending)} planned tensors were not written")
        except BaseException:
            self.abort()
            raise
        self._stop_threads()
        self._file.close()  # a sink: the upload is finished (and can fail) here
        return self._sha.hexdigest()

    def abort(self) -> None:
        """Stop: drop what is queued, wait for what is running, discard the output."""
        self._in_flight.clear()
        self._stop_threads()
        discard = getattr(self._file, "abort", None)
        discard() if discard is not None else self._file.close()

    def _stop_threads(self) -> None:
        self._writer.shutdown(wait=True, cancel_futures=True)
        self._hasher.shutdown(wait=True, cancel_futures=True)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def lora_config_json(
    *,
    rank: int,
    target_modules: list[str] | str,
    base_model_name_or_path: str | None,
    task_type: str | None,
    fan_in_fan_out: bool,
) -> dict[str, Any]:
    """The merged adapter's ``adapter_config.json``: one rank, alpha = r, scaling baked in."""
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": target_modules,
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
