"""Per-layer and per-module weights, module filters and normalize, end to end: PEFT adapters
→ ``coremerge merge`` → stock PEFT loads the result, and each layer computes the base
weight plus exactly the weighted sum the spec asked for (task arithmetic in core space is
lossless, so the comparison is exact up to float32)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.cli.test_merge import _delta_weights, _peft_model
from worker.cli import main

Q0 = "model.layers.0.self_attn.q_proj"


def _weights(module: str) -> list[float]:
    """The weights the job below gives the three adapters in ``module``."""
    layer = int(module.split(".")[2])
    fade_in = [0.0, 1.0][layer]  # [0, 1] over the two layers
    by_kind = 2.0 if "self_attn" in module else 0.5
    return [fade_in, by_kind, -1.0]


def test_per_layer_and_per_module_weights_through_peft(
    peft_adapters: list[Path], tmp_path: Path
) -> None:
    job = {
        "adapters": [
            {"uri": str(peft_adapters[0]), "weight": [0, 1]},
            {"uri": str(peft_adapters[1]),
             "weight": [{"modules": "self_attn", "value": 2}, {"value": 0.5}]},
            {"uri": str(peft_adapters[2]), "weight": -1},
        ],
        "method": "ta",
        "params": {"alpha": 1.0},  # the unscaled sum the reference adds up
        "modules": {"exclude": ["k_proj"]},
        "output": {"uri": str(tmp_path / "merged")},
    }  # fmt: skip
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert main(["merge", "-q", "--spec", str(tmp_path / "job.json")]) == 0
    out = tmp_path / "merged"

    deltas = [_delta_weights(a) for a in peft_adapters]
    modules = sorted({m for d in deltas for m in d} - {m for m in deltas[2] if "k_proj" in m})
    model = _peft_model(out)
    gen = torch.Generator().manual_seed(0)
    for name in modules:
        want = sum(w * d[name] for w, d in zip(_weights(name), deltas, strict=True) if name in d)
        layer = model.base_model.model.get_submodule(name)
        x = torch.randn(3, layer.in_features, generator=gen)
        with torch.no_grad():
            got = layer(x)
        assert torch.allclose(got, x @ (layer.base_layer.weight + want).T, atol=1e-5), name
    # Left out: not in the file, and not wrapped by PEFT either (target_modules names exactly).
    tensors = load_file(out / "adapter_model.safetensors")
    assert not any("k_proj" in k for k in tensors)
    assert not hasattr(model.base_model.model.get_submodule(Q0.replace("q_", "k_")), "lora_A")

    report = json.loads((out / "merge_report.json").read_text())
    records = {r["module"]: r for r in report["modules"]}
    # Weight 0 takes adapter 0 (r 4) out of layer 0: its stack is 8 + 2, not 14.
    assert records[Q0]["sources"] == ["task-1", "task-2"]
    assert records[Q0]["weights"] == [2.0, -1.0] and records[Q0]["total_rank"] == 10
    assert records[Q0.replace("0", "1", 1)]["weights"] == [1.0, 2.0, -1.0]
    assert report["inputs"][1]["weight"] == [
        {"modules": "self_attn", "value": 2.0},
        {"modules": None, "value": 0.5},
    ]
    card = (out / "README.md").read_text()
    assert '`[{"modules":"self_attn","value":2.0},{"modules":null,"value":0.5}]`' in card


def test_cli_flags_normalize_include_exclude(peft_adapters: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    args = ["merge", "-q", *map(str, peft_adapters), "-o", str(out), "--method", "ta",
            "--param", "alpha=1"]  # fmt: skip
    args += ["--weights", "1,1,2", "--normalize", "--include", "q_proj", "--include", "v_proj"]
    assert main([*args, "--exclude", "layers\\.1\\."]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    records = {r["module"]: r for r in report["modules"]}
    assert set(records) == {Q0, "model.layers.0.self_attn.v_proj"}
    assert records[Q0]["weights"] == [0.25, 0.25, 0.5]
    # Adapter 2 has no v_proj: its weight still counts in the sum (mergekit's models).
    assert records["model.layers.0.self_attn.v_proj"]["weights"] == [0.25, 0.25]
    assert report["normalize"] is True
    assert report["module_filter"] == {
        "include": ["q_proj", "v_proj"],
        "exclude": ["layers\\.1\\."],
    }


def _ties_reference(deltas: list[torch.Tensor], densities: list[float]) -> torch.Tensor:
    """TIES as docs/methods.md defines it, each task trimmed to its own density."""
    kept = []
    for x, density in zip(deltas, densities, strict=True):
        flat = x.reshape(-1).clone()
        if density < 1:
            kth = flat.numel() - int(density * flat.numel())
            flat *= flat.abs() >= flat.abs().kthvalue(kth).values
        kept.append(flat)
    stacked = torch.stack(kept)
    sign = torch.sign(stacked.sum(0))
    sign = torch.where(sign == 0, torch.sign(sign.sum()), sign)
    agree = torch.sign(stacked) == sign
    merged = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    return merged.reshape(deltas[0].shape)


def test_per_adapter_density_trims_each_task_to_its_own(
    peft_adapters: list[Path], tmp_path: Path
) -> None:
    """Two adapters, one TIES density each, in full space: every module's update is the
    reference TIES of the two ΔW_t, each trimmed to its adapter's density."""
    job = {
        "adapters": [
            {"uri": str(peft_adapters[0]), "density": 0.5},
            {"uri": str(peft_adapters[1]), "density": 0.2},
        ],
        "method": "ties",
        "space": "full",
        "params": {"alpha": 1.0},
        "output": {"uri": str(tmp_path / "merged")},
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert main(["merge", "-q", "--spec", str(tmp_path / "job.json")]) == 0
    tensors = load_file(tmp_path / "merged" / "adapter_model.safetensors")
    deltas = [_delta_weights(a) for a in peft_adapters[:2]]
    for name in deltas[0].keys() & deltas[1].keys():
        key = f"base_model.model.{name}.lora_"
        got = tensors[key + "B.weight"] @ tensors[key + "A.weight"]
        want = _ties_reference([deltas[0][name], deltas[1][name]], [0.5, 0.2])
        assert torch.allclose(got, want, atol=1e-5), name
