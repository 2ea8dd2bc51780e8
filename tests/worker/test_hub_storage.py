"""Hub inputs of a service job (``worker.storage.Storage``): sized and pinned before a byte
of them is fetched, and held to the same limits as S3 inputs, counted with them."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest

from jobs.errors import LimitExceeded
from tests.hub_cache import put_in_cache
from worker.storage import Storage


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, peft_adapters: list[Path]) -> dict:
    cache = tmp_path / "hf-cache"
    commit = put_in_cache(cache, "org/adapter-a", peft_adapters[0], refs=("main", "v1"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return {"commit": commit, "size": sum(p.stat().st_size for p in peft_adapters[0].iterdir()
                                          if p.name.startswith("adapter_"))}  # fmt: skip


def _open(storage: Storage, uris: list[str], tmp_path: Path) -> list:
    return storage.open_inputs(uris, tmp_path / "inputs")


def test_hub_inputs_are_pinned_and_given_as_folders(
    cache: dict, peft_adapters: list[Path], tmp_path: Path
) -> None:
    storage = Storage()
    inputs = _open(storage, ["hf://org/adapter-a@v1", f"file://{peft_adapters[1]}"], tmp_path)
    assert inputs[0].name == cache["commit"]  # the cache's snapshot of that commit
    assert (inputs[0] / "adapter_model.safetensors").read_bytes() == (
        peft_adapters[0] / "adapter_model.safetensors"
    ).read_bytes()
    assert inputs[1] == peft_adapters[1]
    assert list(storage.hub_inputs) == [0]
    assert storage.hub_inputs[0].uri == f"hf://org/adapter-a@{cache['commit']}"
    assert storage.hub_inputs[0].nbytes == cache["size"]


def test_hub_inputs_count_against_the_limits(
    cache: dict, peft_adapters: list[Path], tmp_path: Path
) -> None:
    with pytest.raises(LimitExceeded, match=r"hf://org/adapter-a@[0-9a-f]{40}/: \d+ bytes, over"):
        _open(Storage(max_adapter_bytes=cache["size"] - 1), ["hf://org/adapter-a"], tmp_path)
    local = f"file://{peft_adapters[1]}"
    local_size = sum(p.stat().st_size for p in peft_adapters[1].iterdir()
                     if p.name.startswith("adapter_"))  # fmt: skip
    just = Storage(max_job_bytes=cache["size"] + local_size)
    assert len(_open(just, ["hf://org/adapter-a", local], tmp_path / "a")) == 2
    with pytest.raises(LimitExceeded, match="the inputs total"):
        _open(Storage(max_job_bytes=cache["size"] + local_size - 1),
              ["hf://org/adapter-a", local], tmp_path / "b")  # fmt: skip
