"""What a merge input is, as the merge sees it: :class:`AdapterSource`, the one interface
every reader keeps, and what the storage layer hands out for an input that is not a local
folder (:class:`RemoteAdapter`: bytes, not a reader). A leaf: it imports nothing of the
project, so readers, the factory that picks them (``worker.adapters.opening``), the plan
and the storage layer all depend on it and it on none of them.

Whatever its PEFT type, a source hands out one module's update at a time as a LoRA pair
(A r × n, B m × r, float32): a LoRA adapter its stored factors, a VeRA adapter
diag(λ_d)·A and diag(λ_b)·B. Opening one reads only its config and its safetensors header,
so every refusal happens before a tensor is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the readers use torch; this interface does not need it
    import torch

    from .config import LoraAdapterConfig

__all__ = ["AdapterSource", "InputSizes", "ModuleInfo", "RemoteAdapter", "RemoteFile"]

#: ``{module: in_features}``: what a VeRA adapter does not record and needs to be read.
InputSizes = dict[str, int]


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
    """A merge input, opened and validated from its config and header alone.

    **Closing.** ``close()`` releases everything the source holds (a file's memory map, the
    bytes of a streamed input, fetches in flight, regenerated projections). It may be called
    more than once, and it is final: a source is not read after it (a read raises a
    ``jobs.errors.MergeError``); a caller that needs the adapter again opens it again.
    """

    name: str
    config: LoraAdapterConfig
    nbytes: int
    modules: dict[str, ModuleInfo]
    # Memory the source keeps for the whole merge once open (its parsed header; the file
    # pages it keeps mapped, the projections a VeRA adapter regenerates, a streamed input's
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
        """Release what the source holds; final (see the class docstring)."""
        ...


class RemoteFile(Protocol):
    """A file that is not on local disk (an S3 object), pinned to the version that was
    checked: every read of it is refused once the object has changed."""

    size: int
    head: bytes  # its first bytes (up to the whole safetensors header), as the check read them

    def fetch(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file."""
        ...

    def download(self, dest: Path) -> None:
        """Copy the whole file to the local path ``dest``."""
        ...


class RemoteAdapter(Protocol):
    """An input adapter that is not a local folder, as storage hands it out: its (small)
    config copied into ``directory``, its weights where they lie. The same object stands
    for every entry of a job that names the same adapter (URI and ETag): it is opened once."""

    directory: Path
    weights: RemoteFile
