"""Adapters as merge inputs: one interface, :class:`AdapterSource`, and one factory.

Whatever its PEFT type, an input adapter hands out one module's update at a time as a LoRA
pair (A r × n, B m × r, float32): a LoRA adapter its stored factors, a VeRA adapter
diag(λ_d)·A and diag(λ_b)·B. Opening one reads only its config and its safetensors header,
so every refusal happens before a tensor is read.

    open_adapters(inputs, names)   the job's inputs, LoRA first, then VeRA with input sizes
    └── open_adapter(dir, name)    one input, by its config's peft_type
        ├── LoraReader             worker.adapters.lora (a local file)
        ├── VeraReader             worker.adapters.vera (a local file)
        └── StreamedLoraReader     worker.adapters.streamed (an S3 object, read as the merge
                                   goes), opened by an :class:`AdapterLocation`
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from jobs.errors import AdapterInvalid, AdapterNotFound, reason

from .base_model import BaseModelRefused, linear_input_sizes
from .config import LoraAdapterConfig, read_adapter_config
from .format import PREFIX_BYTES, WEIGHTS_NAME, check_prefix

__all__ = [
    "AdapterLocation",
    "AdapterSource",
    "InputSizes",
    "ModuleInfo",
    "check_finite",
    "open_adapter",
    "open_adapters",
    "read_header",
    "sha256_file",
]


@dataclass(frozen=True)
class ModuleInfo:
    """One module of one adapter, as its header describes it (no tensor read)."""

    module: str  # name in the base model, e.g. model.layers.0.self_attn.q_proj
    rank: int
    in_features: int  # n
    out_features: int  # m
    scaling: float
    # Bytes a read of this module allocates before its factors are copied into the merge's
    # stack (the file's tensors, their float32 conversions): the work-memory estimate's input.
    read_bytes: int = 0


class AdapterSource(Protocol):
    """A merge input, opened and validated from its config and header alone."""

    name: str
    config: LoraAdapterConfig
    nbytes: int
    modules: dict[str, ModuleInfo]
    # Memory the source may keep for the whole merge once reading starts (the file pages it
    # keeps mapped, the projections a VeRA adapter regenerates, a streamed input's
    # look-ahead window), for the work-memory estimate.
    held_bytes: int
    # True when the weights arrive as the merge reads them (an S3 object): its sha256 is
    # known once every module was read. False for a local file, hashed beside the merge.
    streamed: bool

    def read(
        self, module: str, device: torch.device | str = "cpu", *, check: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r × n) and B (m × r) of ``module``, float32 on ``device``, no scaling applied;
        ``check`` refuses NaN or inf (a caller that checks the values anyway passes False)."""
        ...

    def sha256(self) -> str:
        """The weights file's sha256 (hex), which the report records. A streamed source
        answers once the merge has read every module (it then reads what is left, if any)."""
        ...

    def close(self) -> None:
        """Release what the source holds open (a later read reopens it)."""
        ...


class AdapterLocation(Protocol):
    """An input adapter that is not a local folder: its config was copied to ``directory``
    (small), and ``open`` makes the source of its weights where they lie."""

    directory: Path

    def open(self, name: str, config: LoraAdapterConfig, known: InputSizes) -> AdapterSource:
        """The adapter's source, ``config`` being its checked ``adapter_config.json``."""
        ...


#: ``{module: in_features}``: what a VeRA adapter does not record and needs to be read.
InputSizes = dict[str, int]


def check_finite(adapter: str, module: str, A: torch.Tensor, B: torch.Tensor) -> None:
    """Refuse NaN or ±inf in a module's factors (one pass each: any makes the sum non-finite)."""
    if not (torch.isfinite(A.sum()) and torch.isfinite(B.sum())):
        raise AdapterInvalid(
            f"adapter {adapter!r}: module {module!r} has NaN or infinite values "
            "(or values too large to sum in float32)"
        )


def sha256_file(path: Path) -> str:
    """The sha256 (hex) of the file at ``path``."""
    # file_digest reads into one reused buffer: a fifth faster than read() chunks (1.33 vs
    # 1.08 GB/s on the benchmark's inputs), and this runs beside the merge on a shared CPU.
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def as_factors(
    adapter: str,
    module: str,
    A: torch.Tensor,
    B: torch.Tensor,
    device: torch.device | str,
    check: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored module's factors as the merge takes them: float32 on ``device``, refused when
    ``check`` finds NaN or inf (:func:`check_finite`)."""
    A = A.to(device=device, dtype=torch.float32)
    B = B.to(device=device, dtype=torch.float32)
    if check:
        check_finite(adapter, module, A, B)
    return A, B


def read_header(path: Path, name: str, nbytes: int) -> dict[str, tuple[list[int], str]]:
    """``{key: (shape, dtype)}`` of the safetensors file at ``path``, its prefix checked first."""
    try:
        with open(path, "rb") as f:
            check_prefix(f.read(PREFIX_BYTES), nbytes)
        with safe_open(path, framework="pt") as f:
            return {
                k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype())
                for k in f.keys()  # noqa: SIM118 (safe_open is not iterable)
            }
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterInvalid(
            f"adapter {name!r}: {WEIGHTS_NAME} is not a valid safetensors file ({reason(exc)})"
        ) from None


def open_adapter(
    directory: Path, name: str, *, known_input_sizes: InputSizes | None = None
) -> AdapterSource:
    """The source for the adapter in ``directory``: LoRA or VeRA, by its config's peft_type.

    A VeRA adapter's input sizes come from ``known_input_sizes`` (e.g. the LoRA inputs of the
    same job), else from the base model's local config; see :func:`open_adapters`.
    """
    return _open(Path(directory), name, _config(Path(directory), name), known_input_sizes or {})


def open_adapters(
    inputs: Sequence[Path | AdapterLocation], names: Sequence[str]
) -> list[AdapterSource]:
    """Open a job's inputs (in their order): local folders, or adapters elsewhere
    (:class:`AdapterLocation`: an S3 adapter read as the merge goes). The LoRA ones are
    opened first: their modules' input sizes are what a VeRA input of the same job, opened
    next, needs."""
    dirs = [Path(d) if isinstance(d, str | os.PathLike) else d for d in inputs]
    configs = [_config(_folder(d), name) for d, name in zip(dirs, names, strict=True)]
    sources: dict[int, AdapterSource] = {}
    known: InputSizes = {}
    for vera in (False, True):
        for i, config in enumerate(configs):
            if (config.peft_type == "VERA") == vera:
                sources[i] = _open(dirs[i], names[i], config, known)
                known.update({m: info.in_features for m, info in sources[i].modules.items()})
    return [sources[i] for i in range(len(configs))]


def _folder(where: Path | AdapterLocation) -> Path:
    """The local folder holding the input's config."""
    return where if isinstance(where, Path) else where.directory


def _config(directory: Path, name: str) -> LoraAdapterConfig:
    if not directory.is_dir():
        raise AdapterNotFound(f"adapter {name!r}: no directory at {directory}")
    return read_adapter_config(directory, name)


def _open(
    directory: Path | AdapterLocation, name: str, config: LoraAdapterConfig, known: InputSizes
) -> AdapterSource:
    from .lora import LoraReader
    from .vera import VeraReader

    if not isinstance(directory, Path):
        return directory.open(name, config, known)
    if config.peft_type == "VERA":
        return VeraReader(directory, name, config, known)
    return LoraReader(directory, name, config)


def vera_input_sizes(
    name: str, config: LoraAdapterConfig, modules: Sequence[str], known: InputSizes
) -> InputSizes:
    """Each module's input size: from ``known``, else from the base model's local config; a
    clear error when neither knows."""
    missing = [m for m in modules if m not in known]
    sizes = {m: known[m] for m in modules if m in known}
    if missing:
        try:
            from_base = linear_input_sizes(
                config.base_model_name_or_path, config.base_model_class, missing
            )
        except BaseModelRefused as exc:
            raise AdapterInvalid(f"adapter {name!r}: {exc}") from None
        if from_base is None:
            raise AdapterInvalid(
                f"adapter {name!r}: a VeRA adapter does not record its layers' input sizes, "
                f"and neither a LoRA input of this job nor a local base model config "
                f"(base_model_name_or_path={config.base_model_name_or_path!r}) gives them for "
                f"{len(missing)} module(s), e.g. {missing[0]!r}"
            )
        sizes.update(from_base)
    return sizes
