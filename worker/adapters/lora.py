"""Lazy reading of a PEFT LoRA adapter, one module's factors at a time (an ``AdapterSource``).

Opening an adapter reads only ``adapter_config.json`` and the safetensors header (names,
shapes, dtypes); :meth:`LoraReader.read` loads one module's A and B through a
``safetensors.safe_open`` memory map. The map is dropped and reopened every
``REOPEN_EVERY`` reads: pages of a map count as the process's memory for as long as it is
open, so an adapter held open for a whole merge would end up resident in full, while
reopening for every read costs a header parse each time. Peak memory follows the modules at
hand, not the adapter's size.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from jobs.errors import AdapterInvalid, AdapterNotFound, LimitExceeded, reason

from .config import (
    LoraAdapterConfig,
    PatternBudget,
    PatternBudgetExceeded,
    PatternTimeout,
    read_adapter_config,
)
from .factors import as_factors, read_after_close, sha256_file
from .format import LORA_KEY, WEIGHTS_NAME, TensorEntry, check_weights_file, lora_keys
from .header import held_for_header, read_header
from .source import ModuleInfo

__all__ = ["REOPEN_EVERY", "LoraReader", "lora_modules"]

#: Bytes per value of the float dtypes a factor may be stored in.
_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
#: Reads served by one memory map before it is dropped (see the module docstring).
REOPEN_EVERY = 16
F32 = 4


def _unsupported_key(key: str) -> str:
    """Why a tensor key that is not a plain LoRA factor is refused (docs/methods.md)."""
    if "lora_embedding_" in key:
        return "embedding LoRA is not supported"
    if "lora_magnitude_vector" in key:
        return "DoRA (lora_magnitude_vector) is not supported"
    if key.endswith(".lora_B.bias"):
        return "lora_bias is not supported"
    if "modules_to_save" in key or "lora_" not in key:
        return "a full weight (modules_to_save or a non-LoRA tensor) is not supported"
    return "not a LoRA factor of the form base_model.model.<module>.lora_{A,B}.weight"


def _check_factor(name: str, key: str, shape: tuple[int, ...], dtype: str) -> re.Match[str]:
    """The key's module and factor, refused unless it is a 2-D float LoRA factor."""
    match = LORA_KEY.match(key)
    if match is None:
        raise AdapterInvalid(f"adapter {name!r}: tensor {key!r}: {_unsupported_key(key)}")
    if dtype not in _FLOAT_DTYPES:
        raise AdapterInvalid(
            f"adapter {name!r}: tensor {key!r} has dtype {dtype}, expected a float type"
        )
    if len(shape) != 2:
        raise AdapterInvalid(
            f"adapter {name!r}: tensor {key!r} has shape {shape}: "
            "convolution LoRA (or any non-2-D factor) is not supported"
        )
    return match


#: ``{"A": entry, "B": entry}``: one module's two factors in a header.
_Pair = dict[str, TensorEntry]


def _module_info(
    name: str, config: LoraAdapterConfig, module: str, pair: _Pair, budget: PatternBudget
) -> tuple[ModuleInfo, int]:
    """One module checked against its config (both factors, ranks, patterns), and its bytes
    in the file."""
    if set(pair) != {"A", "B"}:
        missing = "lora_B" if "A" in pair else "lora_A"
        raise AdapterInvalid(f"adapter {name!r}: module {module!r} has no {missing}.weight")
    (r, n), (m, r_b) = pair["A"].shape, pair["B"].shape
    if r != r_b:
        raise AdapterInvalid(
            f"adapter {name!r}: module {module!r}: lora_A has rank {r} but lora_B has rank {r_b}"
        )
    try:
        expected = config.expected_rank(module, budget)
        scaling = config.scaling(module, budget)
    except PatternTimeout as exc:
        raise AdapterInvalid(f"adapter {name!r}: {exc}") from None
    except PatternBudgetExceeded as exc:
        raise LimitExceeded(f"adapter {name!r}: {exc}") from None
    if r != expected:
        raise AdapterInvalid(
            f"adapter {name!r}: module {module!r} has rank {r} but the config says {expected}"
        )
    if min(r, n, m) < 1:
        raise AdapterInvalid(f"adapter {name!r}: module {module!r} has an empty factor")
    dtypes = pair["A"].dtype, pair["B"].dtype
    stored = r * n * _FLOAT_DTYPES[dtypes[0]] + m * r * _FLOAT_DTYPES[dtypes[1]]
    converted = F32 * r * (n + m) if set(dtypes) != {"F32"} else 0
    return ModuleInfo(module, r, n, m, scaling, read_bytes=stored + converted), stored


def lora_modules(
    name: str, config: LoraAdapterConfig, header: Mapping[str, TensorEntry]
) -> tuple[dict[str, ModuleInfo], dict[str, int]]:
    """A LoRA adapter's modules from its safetensors header's entries, and each module's
    bytes in the file. Every refusal of a LoRA input's header is made here, so a local file
    (:class:`LoraReader`) and a streamed object (``worker.adapters.streamed``) are refused
    alike, with the same words."""
    factors: dict[str, _Pair] = {}
    for key, entry in header.items():
        match = _check_factor(name, key, entry.shape, entry.dtype)
        factors.setdefault(match["module"], {})[match["which"]] = entry
    if not factors:
        raise AdapterInvalid(f"adapter {name!r}: {WEIGHTS_NAME} holds no LoRA factors")
    modules, stored = {}, {}
    budget = PatternBudget()  # all of this adapter's pattern matching, together
    for module, pair in factors.items():
        modules[module], stored[module] = _module_info(name, config, module, pair, budget)
    return modules, stored


class LoraReader:
    """A PEFT LoRA adapter on local disk, validated from its config and header alone.

    >>> reader = LoraReader(Path("my-adapter"), name="snli")  # doctest: +SKIP
    >>> A, B = reader.read("model.layers.0.self_attn.q_proj")  # doctest: +SKIP

    ``max_modules`` bounds the header (``worker.adapters.header``).
    """

    streamed = False  # a local file: hashed beside the merge

    def __init__(
        self,
        directory: Path,
        name: str,
        config: LoraAdapterConfig | None = None,
        *,
        max_modules: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.name = name
        if not self.directory.is_dir():
            raise AdapterNotFound(f"adapter {name!r}: no directory at {self.directory}")
        self.config: LoraAdapterConfig = config or read_adapter_config(self.directory, name)
        if self.config.peft_type != "LORA":
            raise AdapterInvalid(
                f"adapter {name!r}: a {self.config.peft_type} adapter (use worker.adapters.open_adapter)"
            )
        check_weights_file(self.directory, name)
        self.path = self.directory / WEIGHTS_NAME
        self.nbytes = self.path.stat().st_size
        self.modules: dict[str, ModuleInfo] = self._index(max_modules)
        self.held_bytes = self._mapped_bytes() + held_for_header(self._header_bytes)
        self._handle = None
        self._reads = 0
        self._closed = False
        self._lock = threading.Lock()  # the runner reads modules from several threads
        self._keys = {m: lora_keys(m) for m in self.modules}

    def _index(self, max_modules: int | None) -> dict[str, ModuleInfo]:
        entries, self._header_bytes = read_header(self.path, self.name, self.nbytes, max_modules)
        modules, self._stored = lora_modules(self.name, self.config, entries)
        return modules

    def _mapped_bytes(self) -> int:
        """The file pages one memory map may hold at most: the tensors of the
        ``REOPEN_EVERY`` largest modules (a map is dropped after that many reads)."""
        return sum(sorted(self._stored.values(), reverse=True)[:REOPEN_EVERY])

    def read(
        self, module: str, device: torch.device | str = "cpu", *, check: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r × n) and B (m × r) of ``module`` as float32 on ``device``; no scaling applied.

        ``check=False`` skips the NaN/inf check, for a caller that checks the values as it
        copies them anyway (the runner, which checks its stacked factors in one pass).
        """
        key_a, key_b = self._keys[module]
        try:
            with self._lock:
                if self._closed:
                    raise read_after_close(self.name)
                if self._handle is None or self._reads >= REOPEN_EVERY:
                    self._handle, self._reads = None, 0
                    self._handle = safe_open(self.path, framework="pt")
                self._reads += 1
                handle = self._handle
            A, B = handle.get_tensor(key_a), handle.get_tensor(key_b)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterInvalid(
                f"adapter {self.name!r}: cannot read module {module!r} ({reason(exc)})"
            ) from None
        return as_factors(self.name, module, A, B, device, check)

    def sha256(self) -> str:
        """The weights file's sha256 (hex), read from disk."""
        return sha256_file(self.path)

    def close(self) -> None:
        """Drop the memory map; final (``AdapterSource``)."""
        with self._lock:
            self._closed, self._handle = True, None
