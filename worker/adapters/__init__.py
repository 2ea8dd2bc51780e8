"""The PEFT adapter format: reading inputs behind one interface, writing the merged adapter.

    format.py     file names, tensor key templates, the safetensors prefix and header rules (torch-free)
    header.py     a safetensors header read and parsed within bounds (torch-free)
    config.py     adapter_config.json: parsing, refusals, per-module scaling
    source.py     AdapterSource (the interface every reader keeps) and RemoteAdapter (what
                  storage hands out for an input elsewhere): a leaf
    opening.py    open_adapter / open_adapters: the one factory that picks each input's reader
    factors.py    what every reader shares: factors as the merge takes them, a file's sha256
    lora.py       LoraReader: a local LoRA adapter's factors, one module at a time
    vera.py       VeraReader: a VeRA adapter's update as a LoRA pair
    streamed.py   StreamedLoraReader: a remote LoRA adapter read as the merge goes
    base_model.py input sizes of a base model's layers from its local config (VeRA)
    writer.py     the merged adapter: streamed safetensors and its PEFT config

``from worker.adapters import open_adapter`` imports torch; ``worker.adapters.format``,
``.header`` and ``.source`` alone do not (the worker's parent and the storage layer use them).
"""

from __future__ import annotations

from typing import Any

__all__ = ["AdapterSource", "ModuleInfo", "open_adapter", "open_adapters"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a torch-free submodule does not load torch.
    if name in ("AdapterSource", "ModuleInfo"):
        from . import source

        return getattr(source, name)
    if name in __all__:
        from . import opening

        return getattr(opening, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
