"""``coremerge merge`` end to end on adapters written by peft, and every error path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import edit_config
from worker.cli import main
from worker.demo import tiny_base_model


def _peft_model(adapter_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny_base_model(), adapter_dir).eval()


def _delta_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA module, as stock PEFT computes it (get_delta_weight)."""
    model = _peft_model(adapter_dir)
    return {
        name.removeprefix("base_model.model."): module.get_delta_weight("default").detach()
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def _merge(*args: str) -> int:
    return main(["merge", "--quiet", *map(str, args)])


def test_ta_round_trip_through_peft(peft_adapters: list[Path], tmp_path: Path) -> None:
    """PEFT adapters → CLI core merge → PEFT load: each layer computes (W + Σ w_t ΔW_t) x
    (alpha 1: the unscaled sum)."""
    out = tmp_path / "merged"
    args = ("--method", "ta", "--weights", "1,0.5,-1", "--param", "alpha=1")
    assert _merge(*peft_adapters, "-o", out, *args) == 0
    expected: dict[str, torch.Tensor] = {}
    for w, adapter in zip((1.0, 0.5, -1.0), peft_adapters, strict=True):
        for name, delta in _delta_weights(adapter).items():
            expected[name] = expected.get(name, 0) + w * delta
    model = _peft_model(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and not config["rank_pattern"]
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "down_proj"}
    gen = torch.Generator().manual_seed(0)
    for name, delta in expected.items():
        layer = model.base_model.model.get_submodule(name)
        x = torch.randn(5, layer.in_features, generator=gen)
        with torch.no_grad():
            got = layer(x)
        want = x @ (layer.base_layer.weight + delta).T
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), name
    report = json.loads((out / "merge_report.json").read_text())
    # Plain TA is written as the stacked factors: nothing is projected, nothing to check.
    assert report["self_check"]["max_projection_residual"] is None
    assert all(m["residual"] is None for m in report["modules"])
    assert [i["weight"] for i in report["inputs"]] == [1.0, 0.5, -1.0]
    assert all(len(i["sha256"]) == 64 for i in report["inputs"])


def test_core_merges_through_the_bases_report_the_self_check(
    peft_adapters: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    assert _merge(*peft_adapters, "-o", out, "--method", "ties") == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert 0.0 <= report["self_check"]["max_projection_residual"] < 1e-5
    assert all(m["residual"] is not None for m in report["modules"])


@pytest.mark.parametrize("space", ["full", "knots"])
def test_other_spaces_equal_core_for_ta(
    peft_adapters: list[Path], tmp_path: Path, space: str
) -> None:
    outs = {}
    for s in ("core", space):
        outs[s] = tmp_path / s
        assert _merge(*peft_adapters, "-o", outs[s], "--method", "ta", "--space", s) == 0
    core, other = (
        load_file(outs["core"] / "adapter_model.safetensors"),
        load_file(outs[space] / "adapter_model.safetensors"),
    )
    for key in core:
        if key.endswith("lora_A.weight"):
            b = key.replace("lora_A", "lora_B")
            assert torch.allclose(core[b] @ core[key], other[b] @ other[key], atol=1e-5)


def test_rank_truncation_and_dtype(peft_adapters: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert _merge(*peft_adapters, "-o", out, "--rank", "4", "--dtype", "bfloat16") == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4
    tensors = load_file(out / "adapter_model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    report = json.loads((out / "merge_report.json").read_text())
    assert all(0 < m["kept_energy"] <= 1 for m in report["modules"])
    _peft_model(out)  # loads in stock PEFT


def test_dare_is_reproducible_bit_for_bit(peft_adapters: list[Path], tmp_path: Path) -> None:
    files = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert (
            _merge(*peft_adapters, "-o", tmp_path / name, "--method", "dare", "--seed", seed) == 0
        )
        files.append((tmp_path / name / "adapter_model.safetensors").read_bytes())
    assert files[0] == files[1] and files[0] != files[2]


def test_spec_file_with_overrides(peft_adapters: list[Path], tmp_path: Path) -> None:
    spec = {
        "adapters": [{"uri": f"file://{p}", "weight": 1.0} for p in peft_adapters],
        "method": "ties",
        "params": {"density": 0.5},
        "output": {"uri": str(tmp_path / "from-spec")},
    }
    (tmp_path / "job.json").write_text(json.dumps(spec))
    assert main(["merge", "-q", "--spec", str(tmp_path / "job.json"), "--param", "alpha=0.5"]) == 0
    report = json.loads((tmp_path / "from-spec" / "merge_report.json").read_text())
    assert report["method"] == "ties" and report["params"] == {
        "alpha": 0.5,
        "density": 0.5,
        "isotropize": False,
        "axes": "reference",
    }


def _fails(capsys, args: list, fragment: str, out: Path | None = None) -> None:
    code = _merge(*args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert fragment in err, err
    assert len(err.strip().splitlines()) == 1, err  # one clear line, never a traceback
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_error_paths(peft_adapters: list[Path], adapter_copy, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    a = peft_adapters
    _fails(
        capsys,
        [a[0], tmp_path / "missing", "-o", out],
        "adapter_not_found: adapter 'missing': no directory",
        out,
    )
    _fails(
        capsys,
        [*a, "-o", out, "--param", "density=2"],
        "unknown parameter 'density' for method 'tsv'",
        out,
    )
    _fails(capsys, [*a, "-o", out, "--method", "ties", "--param", "density=2"], "density", out)
    _fails(capsys, [*a, "-o", out, "--param", "alpha"], "expected NAME=VALUE", out)
    _fails(
        capsys, [*a, "-o", out, "--param", "alpha=big"], 'must be any finite number or "auto"', out
    )
    _fails(
        capsys, [*a, "-o", out, "--weights", "1,2"], "--weights has 2 values for 3 adapters", out
    )
    _fails(capsys, [*a, "-o", out, "--rank", "0"], "output.rank", out)
    _fails(capsys, [*a], "no output directory", None)
    _fails(capsys, ["-o", out], "no adapters given", out)
    _fails(capsys, [*a, "-o", out, "--method", "nope"], "invalid choice", out)
    _fails(capsys, [*a, "-o", "s3://bucket/x"], "use the service for s3://", None)
    dora = adapter_copy(0)
    edit_config(dora, use_dora=True)
    _fails(
        capsys,
        [a[1], dora, "-o", out],
        "adapter_invalid: adapter 'copy-0': DoRA (use_dora) is not supported",
        out,
    )
    out.mkdir()
    (out / "keep.txt").write_text("x")
    _fails(capsys, [*a, "-o", out], "already exists and is not empty", None)
    assert (out / "keep.txt").exists()


def test_inspect(peft_adapters: list[Path], capsys) -> None:
    assert main(["inspect", str(peft_adapters[2]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["type"] == "LORA" and info["modules"] == 6
    ranks = {m["module"]: m["rank"] for m in info["module_list"]}
    assert ranks["model.layers.1.self_attn.k_proj"] == 6
    assert main(["inspect", str(peft_adapters[0])]) == 0
    assert "model.layers.0.mlp.down_proj" in capsys.readouterr().out


def test_console_script_exit_status(tmp_path: Path) -> None:
    """The installed entry point: a bad adapter is one line on stderr and exit status 2."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "merge",
            str(tmp_path / "nope"),
            "-o",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"coremerge: error: adapter_not_found: adapter 'nope': no directory at {tmp_path / 'nope'}"
    )
