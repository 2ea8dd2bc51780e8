"""Adapters of any shape written directly in PEFT's format (no model, no peft): for the tests
whose point is the shapes, such as the work-memory estimate (``worker.merge.memory``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["lora_adapter", "spec", "vera_adapter"]

PREFIX = "base_model.model."


def lora_adapter(
    folder: Path,
    *,
    r: int,
    m: int,
    n: int,
    modules: int = 1,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    random: bool = True,
) -> Path:
    """A LoRA adapter with ``modules`` modules ``layers.<i>.q`` of rank ``r`` on m × n layers;
    ``random=False`` writes zeros (a file of that size, quickly)."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    make = (lambda *s: torch.randn(*s, generator=gen)) if random else torch.zeros
    tensors = {}
    for i in range(modules):
        tensors[f"{PREFIX}layers.{i}.q.lora_A.weight"] = make(r, n).to(dtype)
        tensors[f"{PREFIX}layers.{i}.q.lora_B.weight"] = make(m, r).to(dtype)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["q"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def vera_adapter(folder: Path, *, r: int, m: int, modules: int = 1, seed: int = 0) -> Path:
    """A VeRA adapter saved without its projections (``save_projection: false``): only λ_b (m)
    and λ_d (r) per module ``layers.<i>.q``, so a file of r + m floats per module declares
    projections of r × (n + m) floats that the reader regenerates."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(modules):
        tensors[f"{PREFIX}layers.{i}.q.vera_lambda_b"] = torch.randn(m, generator=gen)
        tensors[f"{PREFIX}layers.{i}.q.vera_lambda_d"] = torch.randn(r, generator=gen)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {
        "peft_type": "VERA",
        "r": r,
        "target_modules": ["q"],
        "save_projection": False,
        "projection_prng_key": seed,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def spec(dirs: list[Path], out: Path, **fields: object) -> dict:
    """A job spec (as a dict) merging ``dirs`` into ``out``; ``fields`` override the rest."""
    output = {"uri": str(out), **fields.pop("output", {})}  # type: ignore[dict-item]
    return {"adapters": [{"uri": str(d)} for d in dirs], "output": output, **fields}
