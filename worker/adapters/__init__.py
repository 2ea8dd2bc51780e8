"""The PEFT adapter format: reading inputs behind one interface, writing the merged adapter.

    format.py     file names, tensor key templates, the safetensors prefix check (torch-free)
    config.py     adapter_config.json: parsing, refusals, per-module scaling
    source.py     AdapterSource (the interface), open_adapter / open_adapters (the factory)
    lora.py       LoraReader: a LoRA adapter's factors, one module at a time
    vera.py       VeraReader: a VeRA adapter's update as a LoRA pair
    base_model.py input sizes of a base model's layers from its local config (VeRA)
    writer.py     the merged adapter: streamed safetensors and its PEFT config

``from worker.adapters import open_adapter`` imports torch; ``worker.adapters.format`` alone
does not (the worker's parent and the storage layer use it).
"""

from __future__ import annotations

from typing import Any

__all__ = ["AdapterSource", "ModuleInfo", "open_adapter", "open_adapters"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the torch-free ``format`` submodule does not load torch.
    if name in __all__:
        from . import source

        return getattr(source, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
