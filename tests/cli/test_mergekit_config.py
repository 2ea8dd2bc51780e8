"""``coremerge merge --config merge.yml``: mergekit configurations on real PEFT adapters,
checked against what mergekit's definitions give (PEFT's own ΔW of each adapter)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.cli.test_merge import _delta_weights, _peft_model
from worker.cli import main


def _write(tmp_path: Path, text: str, **names: Path) -> Path:
    path = tmp_path / "merge.yml"
    path.write_text(textwrap.dedent(text).format(**{k: str(v) for k, v in names.items()}))
    return path


def _check_layers(out: Path, expected: dict[str, torch.Tensor]) -> None:
    """Stock PEFT loads ``out``, and each layer computes x (W + expected ΔW)ᵀ (a layer the
    merge left out has no adapter, and must have been expected to get none)."""
    model = _peft_model(out)
    gen = torch.Generator().manual_seed(0)
    for name, delta in expected.items():
        layer = model.base_model.model.get_submodule(name)
        if not hasattr(layer, "base_layer"):  # left out of the merge: no update expected
            assert not torch.any(delta), name
            continue
        x = torch.randn(3, layer.in_features, generator=gen)
        with torch.no_grad():
            got = layer(x)
        assert torch.allclose(got, x @ (layer.base_layer.weight + delta).T, atol=1e-5), name


def test_linear_config_as_mergekit_yaml_runs_it(peft_adapters: list[Path], tmp_path: Path) -> None:
    """mergekit's linear: Σ w_t ΔW_t / Σ w_t (normalize is its default), written with the
    output folder as mergekit-yaml takes it."""
    a, b, c = peft_adapters
    config = _write(tmp_path, """
        models:
          - model: {a}
            parameters:
              weight: 1.0
          - model: {b}
            parameters:
              weight: 0.3
          - model: {c}
            parameters:
              weight: 0.5
        merge_method: linear
        dtype: float32
    """, a=a, b=b, c=c)  # fmt: skip
    out = tmp_path / "merged"
    assert main(["merge", "-q", "--config", str(config), str(out)]) == 0
    deltas = [_delta_weights(p) for p in peft_adapters]
    weights = [1.0, 0.3, 0.5]
    expected = {
        name: sum(w * d[name] for w, d in zip(weights, deltas, strict=True) if name in d) / 1.8
        for name in {m for d in deltas for m in d}
    }
    _check_layers(out, expected)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == "ta" and report["normalize"] is True


def test_task_arithmetic_with_gradient_filter_lambda_and_base(
    peft_adapters: list[Path], tmp_path: Path
) -> None:
    a, b, _ = peft_adapters
    config = _write(tmp_path, """
        models:
          - model: {a}
            parameters:
              weight: [0, 1]
          - model: {b}
            parameters:
              weight:
                - filter: v_proj
                  value: -1
                - value: 0.5
        merge_method: task_arithmetic
        base_model: coremerge/tiny-llama-demo
        parameters:
          lambda: 0.5
    """, a=a, b=b)  # fmt: skip
    out = tmp_path / "merged"
    assert main(["merge", "-q", "--config", str(config), "-o", str(out)]) == 0
    da, db = _delta_weights(a), _delta_weights(b)

    def weights(name: str) -> tuple[float, float]:
        return (float(name.split(".")[2]), -1.0 if "v_proj" in name else 0.5)

    expected = {}
    for name in da.keys() | db.keys():
        wa, wb = weights(name)
        expected[name] = 0.5 * (wa * da.get(name, 0) + wb * db.get(name, 0))
    _check_layers(out, expected)


def test_ties_with_equal_weights_is_coremerges_ties(
    peft_adapters: list[Path], tmp_path: Path
) -> None:
    """mergekit's TIES with normalize and equal weights: the weights cancel, and it is
    exactly coremerge's TIES at the same density."""
    a, b, c = peft_adapters
    config = _write(tmp_path, """
        models:
          - model: {a}
            parameters: {{density: 0.5, weight: 0.5}}
          - model: {b}
            parameters: {{density: 0.5, weight: 0.5}}
          - model: {c}
            parameters: {{density: 0.5, weight: 0.5}}
        merge_method: ties
        base_model: coremerge/tiny-llama-demo
        parameters:
          normalize: true
          int8_mask: true
        dtype: float32
    """, a=a, b=b, c=c)  # fmt: skip
    assert main(["merge", "-q", "--config", str(config), str(tmp_path / "cfg")]) == 0
    plain = ["merge", "-q", *map(str, peft_adapters), "-o", str(tmp_path / "plain")]
    assert main([*plain, "--method", "ties", "--param", "density=0.5", "--param", "alpha=1"]) == 0
    got = load_file(tmp_path / "cfg" / "adapter_model.safetensors")
    want = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_config_refusals_are_one_line(peft_adapters: list[Path], tmp_path: Path, capsys) -> None:
    a, b, _ = peft_adapters
    body = """
        models:
          - model: {a}
            parameters: {{weight: 1}}
          - model: {b}
            parameters: {{weight: 1}}
        merge_method: task_arithmetic
        base_model: {base}
    """
    wrong_base = _write(tmp_path, body, a=a, b=b, base="meta-llama/Llama-2-7b-hf")
    out = tmp_path / "out"
    assert main(["merge", "-q", "--config", str(wrong_base), str(out)]) == 2
    err = capsys.readouterr().err
    assert "adapter_incompatible" in err and "base_model 'meta-llama/Llama-2-7b-hf'" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()

    slerp = _write(tmp_path, body.replace("task_arithmetic", "slerp"), a=a, b=b, base="x/y")
    assert main(["merge", "-q", "--config", str(slerp), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--config {slerp}: merge_method: mergekit's 'slerp' has no equivalent" in err, err
    assert len(err.strip().splitlines()) == 1

    ok = _write(tmp_path, body, a=a, b=b, base="coremerge/tiny-llama-demo")
    assert main(["merge", "-q", "--config", str(ok), str(a), "-o", str(out)]) == 2
    assert "give no ADAPTER_DIR" in capsys.readouterr().err
    (tmp_path / "bad.yml").write_text("models: [\n")
    assert main(["merge", "-q", "--config", str(tmp_path / "bad.yml"), str(out)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and len(err.strip().splitlines()) == 1, err
