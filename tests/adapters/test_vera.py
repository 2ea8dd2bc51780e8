"""VeRA adapters made by peft, merged alone and with LoRA adapters (issue 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import edit_config
from worker.cli import main
from worker.demo import make_tiny_adapters, make_tiny_vera, tiny_base_model

TARGETS = ["q_proj", "down_proj"]  # 64 → 64 and 128 → 64: different input sizes


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base model's config.json in a local folder (no weights needed)."""
    path = tmp_path_factory.mktemp("base")
    tiny_base_model().config.save_pretrained(path)
    return path


def _make_vera(workdir: Path, base_dir: Path, save_projection: bool, r: int, seed: int) -> Path:
    return make_tiny_vera(
        workdir,
        r=r,
        seed=seed,
        save_projection=save_projection,
        target_modules=TARGETS,
        base_model_name_or_path=str(base_dir),
    )


def _delta_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """ΔW per module as stock PEFT computes it (get_delta_weight), LoRA or VeRA alike."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = PeftModel.from_pretrained(tiny_base_model(), adapter_dir)
    return {
        name.removeprefix("base_model.model."): module.get_delta_weight("default").detach()
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer)
    }


def _merge_ta(adapters: list[Path], out: Path) -> None:
    """The unscaled sum (alpha 1) of the adapters, by the CLI, into ``out``."""
    argv = ["merge", "-q", *map(str, adapters), "-o", str(out), "--method", "ta"]
    assert main([*argv, "--param", "alpha=1"]) == 0


def _merged_deltas(out: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(out / "adapter_model.safetensors")
    return {
        key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): tensors[
            key.replace("lora_A", "lora_B")
        ]
        @ tensors[key]
        for key in tensors
        if key.endswith("lora_A.weight")
    }


def _expected(adapters: list[Path]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for adapter in adapters:
        for name, delta in _delta_weights(adapter).items():
            total[name] = total.get(name, 0) + delta
    return total


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, delta in want.items():
        rel = float((got[name] - delta).norm() / delta.norm())
        assert rel <= 1e-5, (name, rel)


@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_alone_equals_peft_delta_weights(
    tmp_path: Path, base_dir: Path, save_projection: bool
) -> None:
    adapters = [_make_vera(tmp_path, base_dir, save_projection, r=8, seed=s) for s in (1, 2)]
    out = tmp_path / "merged"
    _merge_ta(adapters, out)
    _assert_close(_merged_deltas(out), _expected(adapters))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    _delta_weights(out)  # loads in stock PEFT as a LoRA adapter
    report = json.loads((out / "merge_report.json").read_text())
    assert [i["peft_type"] for i in report["inputs"]] == ["VERA", "VERA"]


def test_mixed_lora_and_vera_with_heterogeneous_ranks(tmp_path: Path, base_dir: Path) -> None:
    (lora,) = make_tiny_adapters(
        tmp_path, [{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}]
    )
    edit_config(lora, base_model_name_or_path=str(base_dir))
    vera = _make_vera(tmp_path, base_dir, save_projection=False, r=16, seed=3)
    # The VeRA adapter's down_proj input size comes from the base config; q_proj's from LoRA.
    out = tmp_path / "merged"
    _merge_ta([lora, vera], out)
    _assert_close(_merged_deltas(out), _expected([lora, vera]))


def test_vera_without_any_source_of_input_sizes(tmp_path: Path, base_dir: Path, capsys) -> None:
    vera = _make_vera(tmp_path, base_dir, save_projection=True, r=8, seed=4)
    edit_config(vera, base_model_name_or_path="someone/not-here")
    out = tmp_path / "merged"
    assert main(["merge", "-q", str(vera), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not record its layers' input sizes" in err and not out.exists()


def test_inspect_shows_the_type(tmp_path: Path, base_dir: Path, capsys) -> None:
    vera = _make_vera(tmp_path, base_dir, save_projection=True, r=8, seed=5)
    assert main(["inspect", str(vera), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["type"] == "VERA"


@pytest.mark.parametrize("peft_type", ["IA3", "LOHA", "LOKR"])
def test_other_types_keep_their_error(adapter_copy, peft_type: str, capsys) -> None:
    adapter = adapter_copy(0)
    edit_config(adapter, peft_type=peft_type)
    assert main(["inspect", str(adapter)]) == 2
    assert (
        f"peft_type '{peft_type}' is not supported (LoRA and VeRA only)" in capsys.readouterr().err
    )
