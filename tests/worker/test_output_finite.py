"""A merged factor that is NaN or infinite once cast to output.dtype ends the merge with
output_not_finite naming the module and the dtype, and nothing is written at the output:
through run_merge and ``coremerge merge`` (exit status 2, one line), in every space."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from jobs.errors import OutputNotFinite
from jobs.spec import MergeSpec
from worker.adapters.writer import FINITE_CHECK_CHUNK, all_finite
from worker.cli import main
from worker.merge.runner import run_merge


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize(
    ("space", "fields"),
    [
        # float32 overflow in core space: alpha scales the merged core matrix past 3.4e38.
        ("core", {"params": {"alpha": 1e38}, "weights": 100.0}),
        # Finite in float32, infinite once cast to float16 (beyond ±65504).
        ("core", {"weights": 1e6, "dtype": "float16"}),
        # Full space: the dense update overflows before its SVD (the engine's NonFiniteError).
        ("full", {"params": {"alpha": 1e38}, "weights": 100.0}),
        # Full space without output.rank: the spilled path's writer.
        ("full", {"weights": 1e6, "dtype": "float16"}),
        ("knots", {"params": {"alpha": 1e38}, "weights": 100.0}),
        ("knots", {"weights": 1e6, "dtype": "bfloat16", "params": {"alpha": 1e36}}),
    ],
)
def test_run_merge_refuses_a_non_finite_output(
    peft_adapters: list[Path], tmp_path: Path, space: str, fields: dict
) -> None:
    out = tmp_path / "out"
    spec = MergeSpec.model_validate(
        {
            "adapters": [
                {"uri": str(d), "weight": fields.get("weights", 1.0)} for d in peft_adapters
            ],
            "method": "ta",
            "space": space,
            "params": fields.get("params", {}),
            "output": {"uri": str(out), "dtype": fields.get("dtype", "float32")},
        }
    )
    with pytest.raises(OutputNotFinite) as info:
        run_merge(spec, peft_adapters, out, device="cpu")
    assert info.value.code == "output_not_finite"
    assert info.value.message.startswith("module 'model.layers.")
    assert "NaN or infinite" in info.value.message and "nothing was written" in info.value.message
    _nothing_written(out)


def test_the_cli_exits_2_with_one_line(peft_adapters: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["merge", "-q", "--device", "cpu", *map(str, peft_adapters), "-o", str(out)]
    code = main([*args, "--method", "ta", "--weights", "1e6,1e6,1e6", "--dtype", "float16"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("coremerge: error: output_not_finite: module 'model.layers."), err
    assert "once cast to float16 (largest finite value 6.55e+04)" in err, err
    _nothing_written(out)


def test_the_same_merge_within_range_is_written(
    peft_adapters: list[Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    args = ["merge", "-q", "--device", "cpu", *map(str, peft_adapters), "-o", str(out)]
    assert main([*args, "--method", "ta", "--weights", "1e3,1e3,1e3", "--dtype", "float16"]) == 0
    assert (out / "merge_report.json").exists()


def test_all_finite_is_exact_without_copying_the_tensor() -> None:
    big = torch.full((3, FINITE_CHECK_CHUNK), 3e38)  # finite; its float32 sum overflows
    assert all_finite(big)
    assert not math.isfinite(float(big.sum()))
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = big.clone()
        t[2, -1] = bad  # in the last chunk
        assert not all_finite(t)
        assert not all_finite(t.to(torch.bfloat16))
    assert all_finite(torch.zeros(0, 5))
    assert not all_finite(torch.tensor([70000.0]).to(torch.float16))
