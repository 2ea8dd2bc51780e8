"""The LoRA reader against adapters written by peft itself, and every refusal of its weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from jobs.errors import AdapterInvalid, AdapterNotFound
from tests.adapters.refusals import expect_invalid as _expect_invalid
from worker.adapters.lora import LoraReader as AdapterReader
from worker.demo import tiny_base_model


def _peft_layers(adapter_dir: Path):
    """The adapter loaded by stock PEFT: {module name: LoRA layer}."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_base_model(), adapter_dir)
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def test_modules_ranks_and_scalings_match_peft(peft_adapters: list[Path]) -> None:
    for adapter_dir in peft_adapters:
        reader = AdapterReader(adapter_dir, adapter_dir.name)
        layers = _peft_layers(adapter_dir)
        assert set(reader.modules) == set(layers)
        for name, info in reader.modules.items():
            layer = layers[name]
            assert info.rank == layer.r["default"]
            assert info.scaling == pytest.approx(layer.scaling["default"])
            A, B = reader.read(name)
            assert torch.equal(A, layer.lora_A["default"].weight)
            assert torch.equal(B, layer.lora_B["default"].weight)


def test_missing_directory_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFound, match="no directory"):
        AdapterReader(tmp_path / "nope", "gone")


def test_missing_config(adapter_copy) -> None:
    adapter = adapter_copy(0)
    (adapter / "adapter_config.json").unlink()
    _expect_invalid(adapter, "no adapter_config.json")


def test_pickle_weights_are_never_loaded(adapter_copy) -> None:
    adapter = adapter_copy(0)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    _expect_invalid(adapter, "only pickle weights (adapter_model.bin)")


def test_truncated_safetensors(adapter_copy) -> None:
    adapter = adapter_copy(0)
    path = adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    _expect_invalid(adapter, "not a valid safetensors file")


def _rewrite_tensors(adapter: Path, edit) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_rank_mismatch_between_a_and_b(adapter_copy) -> None:
    adapter = adapter_copy(0)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    _rewrite_tensors(adapter, lambda t: t.__setitem__(key, t[key][:, :3].contiguous()))
    _expect_invalid(adapter, "lora_A has rank 4 but lora_B has rank 3")


def test_nan_factor(adapter_copy) -> None:
    adapter = adapter_copy(0)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite_tensors(adapter, lambda t: t[key].__setitem__((0, 0), float("nan")))
    _expect_invalid(adapter, "NaN or infinite")


def test_embedding_lora_key(adapter_copy) -> None:
    adapter = adapter_copy(0)
    key = "base_model.model.model.embed_tokens.lora_embedding_A"
    _rewrite_tensors(adapter, lambda t: t.__setitem__(key, torch.zeros(4, 8)))
    _expect_invalid(adapter, "embedding LoRA")


def test_a_read_error_names_no_local_path(adapter_copy) -> None:
    """The job's message says what failed, not where on the worker: an OSError's file name
    (a path in the worker's scratch space) stays in the worker's log."""
    adapter = adapter_copy(0)
    reader = AdapterReader(adapter, "gone")  # the header is read; the file is mapped later
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterInvalid) as info:
        reader.read("model.layers.0.self_attn.q_proj")
    message = info.value.message
    assert "cannot read module" in message and str(adapter) not in message, message
