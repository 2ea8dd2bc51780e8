"""The speed benchmark's input sets: real PEFT adapters of random factors (``bench/_inputs.py``).

Shapes follow Llama-3's ratios at a chosen width w: q, o w → w; k, v w → w/4; gate, up
w → 3.5 w; down 3.5 w → w (w = 4096 is Llama-3-8B). Peer fixtures use ``lora_alpha = r``
(FIELD-NOTES: PEFT's ``add_weighted_adapter`` has known trouble otherwise), so every scaling
is 1. Sets are generated in a child process (this one stays free of torch) and cached under
``bench/out/inputs/``.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from bench._inputs import Workload, adapter_dirs, input_bytes, module_shapes

__all__ = ["CurvePoint", "InputSet", "curve_points", "input_set", "llama_workload"]


def llama_workload(*, width: int, layers: int, adapters: int, rank: int, seed: int = 0) -> Workload:
    """``layers`` Llama-3-shaped layers of width ``width``; lora_alpha = r."""
    return Workload(
        layers=layers,
        adapters=adapters,
        rank=rank,
        lora_alpha=rank,
        hidden=width,
        kv=width // 4,
        mlp=width * 7 // 2,
        seed=seed,
        base_model=f"bench/llama3-shapes-w{width}",
    )


@dataclass(frozen=True)
class InputSet:
    workload: Workload
    root: Path
    dirs: list[Path]
    bytes: int

    @property
    def largest_dense_stack_bytes(self) -> int:
        """T × m × n × 4 of the largest module: what full space holds as ΔW_t, float32."""
        return self.workload.adapters * max(n * m for _, n, m in module_shapes(self.workload)) * 4

    def describe(self) -> dict:
        w = self.workload
        return {
            **asdict(w),
            "modules": len(module_shapes(w)),
            "inputs_bytes": self.bytes,
            "inputs_dir": str(self.root),
        }


def input_set(python: str, bench_dir: Path, workload: Workload, root: Path) -> InputSet:
    """Generate (or find) the set for ``workload`` in a child process."""
    cmd = [python, str(bench_dir / "_inputs.py"), "--root", str(root)]
    cmd += ["--workload", json.dumps(asdict(workload))]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    path = Path(done.stdout.strip().splitlines()[-1])
    return InputSet(workload, path, adapter_dirs(path), input_bytes(path))


@dataclass(frozen=True)
class CurvePoint:
    """One point of a scaling curve: which sweep(s) it belongs to and its sizes."""

    adapters: int
    rank: int
    width: int

    @property
    def key(self) -> str:
        return f"T{self.adapters}-r{self.rank}-w{self.width}"


def curve_points(
    adapters: list[int], ranks: list[int], widths: list[int], base: CurvePoint
) -> dict[str, list[CurvePoint]]:
    """The three sweeps, each varying one size from ``base`` (shared points are measured once)."""
    return {
        "adapters": [CurvePoint(t, base.rank, base.width) for t in adapters],
        "rank": [CurvePoint(base.adapters, r, base.width) for r in ranks],
        "width": [CurvePoint(base.adapters, base.rank, w) for w in widths],
    }
