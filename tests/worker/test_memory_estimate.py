"""The work-memory estimate (``worker.memory``) against real merges: in each space, a merge
run in a fresh process peaks within 2× of what the plan estimated, either way.

Sizes are chosen so that the merge's own tensors (100–300 MB) dominate the process's noise
(allocator arenas, threads: about 14 MiB), while each case stays within seconds on 2 cores.
The measure is the child's peak RSS during ``run_merge`` less its RSS right before it
(``tests/worker/measure_merge.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.worker.synthetic import lora_adapter, spec, vera_adapter

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def _loras(tmp: Path, count: int, r: int, m: int, n: int) -> list[Path]:
    return [lora_adapter(tmp / f"lora-{t}", r=r, m=m, n=n, seed=t) for t in range(count)]


def _case(name: str, tmp: Path) -> tuple[list[Path], dict]:
    """The inputs and spec fields of each measured case."""
    if name == "core-ta":
        return _loras(tmp, 4, 128, 8192, 8192), {"method": "ta", "space": "core"}
    if name == "core-tsv":
        return _loras(tmp, 4, 128, 8192, 8192), {"method": "tsv", "space": "core"}
    if name == "full-ta":
        return _loras(tmp, 2, 64, 2048, 2048), {"method": "ta", "space": "full"}
    if name == "knots-ta":
        return _loras(tmp, 4, 128, 4096, 4096), {"method": "ta", "space": "knots"}
    if name == "knots-isotropize":
        fields = {"method": "ta", "space": "knots", "params": {"isotropize": True}}
        return _loras(tmp, 4, 128, 3072, 1024), fields
    if name == "vera-regenerated":
        # The LoRA input gives the VeRA module's input size; the VeRA file is ~40 KB and its
        # projections, regenerated, are 1024 × (8192 + 8192) float32 values (64 MiB).
        lora = lora_adapter(tmp / "lora", r=8, m=8192, n=8192)
        vera = vera_adapter(tmp / "vera", r=1024, m=8192)
        return [lora, vera], {"method": "ta", "space": "core"}
    raise ValueError(name)


CASES = ["core-ta", "core-tsv", "full-ta", "knots-ta", "knots-isotropize", "vera-regenerated"]


@pytest.mark.parametrize("case", CASES)
def test_estimate_is_within_2x_of_the_measured_peak(case: str, tmp_path: Path) -> None:
    dirs, fields = _case(case, tmp_path)
    job = {
        "spec": spec(dirs, tmp_path / "out", **fields),
        "dirs": [str(d) for d in dirs],
        "out": str(tmp_path / "out"),
        "vera": case.startswith("vera"),
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.worker.measure_merge", json.dumps(job)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    estimate, measured = result["estimate"], result["measured"]
    ratio = estimate / measured
    print(
        f"{case}: estimate {estimate / MiB:.0f} MiB, measured {measured / MiB:.0f} MiB, {ratio:.2f}"
    )
    assert measured > 80 * MiB, "the case is too small for its work to dominate the noise"
    assert 0.5 <= ratio <= 2.0, (case, estimate / MiB, measured / MiB)
