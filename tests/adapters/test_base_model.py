"""A VeRA adapter's base model class is untrusted text: only an allowed transformers model
class for the config's model type is ever built (on the meta device); any other name is a
clear adapter_invalid, and nothing it names is called."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from jobs.errors import AdapterInvalid
from tests.conftest import edit_config
from worker.adapters import open_adapters
from worker.adapters.base_model import BaseModelRefused, linear_input_sizes
from worker.demo import make_tiny_vera, tiny_base_model

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base")
    tiny_base_model().config.save_pretrained(path)
    return path


@pytest.fixture
def tripwires(monkeypatch) -> list[str]:
    """Callables of transformers an adapter could name; each records a call instead of running."""
    calls: list[str] = []

    def trip(name: str):
        def called(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called")

        return called

    monkeypatch.setattr(transformers, "pipeline", trip("pipeline"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", trip("AutoTokenizer"))
    monkeypatch.setattr(transformers, "AutoTokenizer", trip("AutoTokenizer()"))
    return calls


@pytest.mark.parametrize(
    "model_class",
    ["pipeline", "AutoTokenizer", "os", "__import__", "BertForMaskedLM", "LlamaModelX"],
)
def test_a_class_name_outside_the_allow_list_is_refused(
    base_dir: Path, tripwires: list[str], model_class: str
) -> None:
    with pytest.raises(BaseModelRefused, match=f"base_model_class '{model_class}' is not an"):
        linear_input_sizes(str(base_dir), model_class, MODULES)
    assert tripwires == []


def test_allowed_classes_and_no_class_give_the_layer_sizes(base_dir: Path) -> None:
    want = {MODULES[0]: 64, MODULES[1]: 128}
    assert linear_input_sizes(str(base_dir), "LlamaForCausalLM", MODULES) == want
    assert linear_input_sizes(str(base_dir), None, MODULES) == want
    assert linear_input_sizes(str(base_dir), "LlamaModel", ["layers.0.mlp.down_proj"]) == {
        "layers.0.mlp.down_proj": 128
    }


def test_an_unreadable_base_config_is_refused_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(BaseModelRefused, match=r"config\.json cannot be read"):
        linear_input_sizes(str(tmp_path), None, MODULES)


def test_a_hostile_vera_adapter_is_adapter_invalid_naming_it(
    tmp_path: Path, base_dir: Path, tripwires: list[str]
) -> None:
    vera = make_tiny_vera(
        tmp_path, r=4, seed=1, save_projection=False, target_modules=["q_proj"],
        base_model_name_or_path=str(base_dir),
    )  # fmt: skip
    edit_config(vera, auto_mapping={"base_model_class": "pipeline"})
    with pytest.raises(AdapterInvalid) as info:
        open_adapters([vera], ["hostile"])
    assert info.value.message.startswith(
        "adapter 'hostile': base_model_class 'pipeline' is not an allowed model class for "
        "model_type 'llama' (allowed: "
    )
    assert tripwires == []
    edit_config(vera, auto_mapping={"base_model_class": ["not", "a", "string"]})
    with pytest.raises(AdapterInvalid, match="base_model_class must be a string, got list"):
        open_adapters([vera], ["hostile"])
