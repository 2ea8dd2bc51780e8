"""adapter_config.json: rank and alpha patterns applied per module, every refused feature."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.adapters.refusals import expect_invalid as _expect_invalid
from tests.conftest import edit_config
from worker.adapters.lora import LoraReader as AdapterReader


def test_rank_and_alpha_patterns_are_applied(peft_adapters: list[Path]) -> None:
    reader = AdapterReader(peft_adapters[2], "patterns")
    assert reader.modules["model.layers.0.self_attn.k_proj"].rank == 6
    assert reader.modules["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(4 / 2)
    assert reader.modules["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(16 / 2)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
        ({"bias": "all"}, "bias='all'"),
        ({"init_lora_weights": "pissa"}, "changes the base weights"),
        ({"r": 3}, "has rank 4 but the config says 3"),
    ],
)
def test_refused_configs(adapter_copy, changes: dict, fragment: str) -> None:
    adapter = adapter_copy(0)
    edit_config(adapter, **changes)
    _expect_invalid(adapter, fragment)


def test_config_that_is_not_json(adapter_copy) -> None:
    adapter = adapter_copy(0)
    (adapter / "adapter_config.json").write_text("{not json")
    _expect_invalid(adapter, "not valid JSON")
    (adapter / "adapter_config.json").write_text(json.dumps([1, 2]))
    _expect_invalid(adapter, "not a JSON object")
