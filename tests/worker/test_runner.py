"""run_merge: the output's layout, and a failure midway that leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from jobs.errors import AdapterInvalid
from jobs.spec import MergeSpec
from worker.adapters.opening import open_adapters
from worker.merge.runner import run_merge


def _spec(dirs: list[Path], out: Path, **spec: object) -> MergeSpec:
    full = {"adapters": [{"uri": str(d)} for d in dirs], "output": {"uri": str(out)}, **spec}
    return MergeSpec.model_validate(full)


def test_output_layout_is_one_rank_padded(peft_adapters: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    run_merge(_spec(peft_adapters, out, method="tsv"), peft_adapters, out, device="cpu")
    tensors = load_file(out / "adapter_model.safetensors")
    rank = json.loads((out / "adapter_config.json").read_text())["r"]
    # q_proj of layer 0 is in all three adapters: 4 + 8 + 2 = 14; k_proj only in one (6).
    assert rank == 14
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {rank}
    k_a = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"]
    assert torch.count_nonzero(k_a[6:]) == 0  # zero padding beyond the module's rank


def test_nan_midway_leaves_nothing(peft_adapters: list[Path], adapter_copy, tmp_path: Path) -> None:
    bad = adapter_copy(0)
    path = bad / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"][0, 0] = float("inf")
    save_file(tensors, path)
    out = tmp_path / "out"
    dirs = [bad, peft_adapters[1]]
    with pytest.raises(AdapterInvalid, match="NaN or infinite"):
        run_merge(_spec(dirs, out), dirs, out, device="cpu")
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize("method", ["ta", "ties", "dare", "tsv"])
def test_a_batched_window_merges_as_module_by_module(
    peft_adapters: list[Path], tmp_path: Path, method: str
) -> None:
    """What a GPU runs (modules of one shape merged in one batched call, a window at a time),
    forced here on the CPU: the same adapter as merging module by module."""
    outs = {}
    for window in (1, 5):
        out = tmp_path / f"w{window}"
        spec = _spec(peft_adapters, out, method=method, seed=3)
        run_merge(spec, peft_adapters, out, device="cpu", batch_window=window)
        outs[window] = load_file(out / "adapter_model.safetensors")
    for key, A in outs[1].items():
        if key.endswith("lora_A.weight"):
            b = key.replace("lora_A", "lora_B")
            single, batched = outs[1][b] @ A, outs[5][b] @ outs[5][key]
            assert torch.allclose(batched, single, rtol=1e-5, atol=1e-6 * single.abs().max()), key


def test_the_merged_adapter_carries_a_model_card(peft_adapters: list[Path], tmp_path: Path):
    out = tmp_path / "merged"
    spec = _spec(peft_adapters, out, method="ties", params={"density": 0.2})
    outcome = run_merge(spec, peft_adapters, out, device="cpu")
    card = (out / "README.md").read_text()
    front, _, body = card.removeprefix("---\n").partition("\n---\n")
    assert "library_name: peft" in front
    assert 'base_model: "coremerge/tiny-llama-demo"' in front
    assert all(f"- {tag}" in front for tag in ("peft", "lora", "merge", "coremerge"))
    for entry in outcome.report["inputs"]:
        assert f"| `{entry['name']}` |" in body and entry["sha256"] in body
    assert "`ties`" in body and "`density=0.2`" in body
    assert f"rank: {outcome.rank} for every module" in body


@pytest.mark.parametrize("window", [1, 5])
def test_alpha_auto_is_resolved_per_module_and_reported(
    peft_adapters: list[Path], tmp_path: Path, window: int
) -> None:
    """``alpha: "auto"`` gives every module the tasks' mean energy (docs/methods.md), one by
    one and batched alike, and the report and the model card say what it resolved to."""
    out = tmp_path / "auto"
    spec = _spec(peft_adapters, out, method="ties", params={"alpha": "auto", "axes": "aligned"})
    outcome = run_merge(spec, peft_adapters, out, device="cpu", batch_window=window)
    report = outcome.report
    assert report["params"]["alpha"] == "auto"
    alphas = {m["module"]: m["alpha"] for m in report["modules"]}
    assert report["alpha"]["auto"] is True
    assert report["alpha"]["min"] == min(alphas.values()) > 0
    assert report["alpha"]["max"] == max(alphas.values())
    merged = load_file(out / "adapter_model.safetensors")
    prefix = "base_model.model."
    readers = open_adapters(peft_adapters, [d.name for d in peft_adapters])
    for module in alphas:
        dW = merged[f"{prefix}{module}.lora_B.weight"] @ merged[f"{prefix}{module}.lora_A.weight"]
        tasks = []
        for reader in readers:
            if module in reader.modules:
                A, B = reader.read(module)
                tasks.append(float((reader.modules[module].scaling * B @ A).square().sum()))
        mean = sum(tasks) / len(tasks)
        assert float(dW.square().sum()) == pytest.approx(mean, rel=1e-4), module
    assert "alpha `auto` resolved per module to" in (out / "README.md").read_text()


def test_a_given_alpha_is_reported_as_given(peft_adapters: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "given"
    spec = _spec(peft_adapters, out, method="ta", params={"alpha": 0.5})
    report = run_merge(spec, peft_adapters, out, device="cpu").report
    assert report["alpha"] == {"auto": False, "value": 0.5}
    assert {m["alpha"] for m in report["modules"]} == {0.5}
    assert "resolved per module" not in (out / "README.md").read_text()
