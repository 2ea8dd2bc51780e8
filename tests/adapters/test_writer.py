"""The streaming safetensors writer produces files the safetensors library reads back."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from worker.adapters.writer import SafetensorsStreamWriter, TensorSlot


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip(tmp_path: Path, dtype: str) -> None:
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7, 1), "c": torch.randn(2, 2)}
    path = tmp_path / "x.safetensors"
    writer = SafetensorsStreamWriter(
        path, [TensorSlot(k, tuple(v.shape)) for k, v in tensors.items()], dtype
    )
    for k, v in tensors.items():
        writer.write(k, v)
    sha = writer.close()
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert writer.nbytes == path.stat().st_size
    with safe_open(path, framework="pt") as f:
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == getattr(torch, dtype)
            assert torch.equal(got, v.to(got.dtype))


def test_out_of_order_or_missing_tensors_fail(tmp_path: Path) -> None:
    slots = [TensorSlot("a", (2,)), TensorSlot("b", (2,))]
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", slots, "float32")
    with pytest.raises(ValueError, match="expected a"):
        writer.write("b", torch.zeros(2))
    writer = SafetensorsStreamWriter(tmp_path / "y.safetensors", slots, "float32")
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="not written"):
        writer.close()
