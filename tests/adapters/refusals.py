"""The check every refusal test makes: an ``adapter_invalid`` naming the adapter and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.errors import AdapterInvalid
from worker.adapters.lora import LoraReader


def expect_invalid(adapter_dir: Path, fragment: str) -> None:
    with pytest.raises(AdapterInvalid) as info:
        LoraReader(adapter_dir, "bad").read("model.layers.0.self_attn.q_proj")
    assert "'bad'" in info.value.message and fragment in info.value.message
    assert info.value.code == "adapter_invalid"
