"""The benchmarks' inputs: T random LoRA adapters on Llama-3-shaped layers, as real PEFT adapters.

Each adapter is a folder with ``adapter_config.json`` (written from peft's own ``LoraConfig``
when peft is importable) and ``adapter_model.safetensors`` holding
``base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A,B}.weight``: A is r × in,
B is out × r. peft cannot build an 8B model here, so the tensors are written with safetensors
directly. Every factor is drawn from its own generator seeded by (seed, adapter, layer,
module), so a one-layer set is exactly the first layer of a 32-layer set.

Shapes follow Llama-3's ratios at a width w: q, o w → w; k, v w → w/4; gate, up w → 3.5 w;
down 3.5 w → w (w = 4096 is Llama-3-8B). The engine profile uses Llama-3-8B itself
(``lora_alpha`` 32, base model ``meta-llama/Meta-Llama-3-8B``); the speed profile's sets use
``lora_alpha = r`` (PEFT's ``add_weighted_adapter`` has known trouble otherwise),
so every scaling is 1.

Sets are generated in a child process (``python bench/speed/workloads.py --root DIR --workload
JSON``: the benchmark's own process stays free of torch, and a child's ``ru_maxrss`` inherits
the parent's) and cached under ``bench/out/inputs/`` in a folder named after the configuration;
a set is built in a temporary folder and renamed into place when complete, so an interrupted
run is never reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CurvePoint",
    "InputSet",
    "Workload",
    "adapter_dirs",
    "curve_points",
    "ensure_inputs",
    "input_set",
    "llama_shapes",
    "llama_workload",
    "lora_header",
    "module_shapes",
    "tensor_bytes",
]

#: safetensors' name and the bytes per element of each dtype the sets and outputs use
DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}
#: Bump when the generated tensors or config change, so stale caches are not reused.
GENERATOR_VERSION = 1
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Workload:
    """The shapes and sizes of one input set (defaults: Llama-3-8B, 8 adapters of rank 16)."""

    layers: int = 32
    adapters: int = 8
    rank: int = 16
    lora_alpha: int = 32
    hidden: int = 4096
    kv: int = 1024
    mlp: int = 14336
    dtype: str = "float32"
    seed: int = 0
    base_model: str = "meta-llama/Meta-Llama-3-8B"

    @property
    def key(self) -> str:
        blob = json.dumps({**asdict(self), "v": GENERATOR_VERSION}, sort_keys=True)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
        return f"L{self.layers}-T{self.adapters}-r{self.rank}-{self.dtype}-{digest}"

    def with_layers(self, layers: int) -> Workload:
        return Workload(**{**asdict(self), "layers": layers})


def llama_shapes(width: int) -> dict[str, int]:
    """Llama-3's layer sizes at hidden size ``width``: k/v ``width``/4, the MLP 3.5 ``width``."""
    return {"hidden": width, "kv": width // 4, "mlp": width * 7 // 2}


def llama_workload(
    *, width: int, layers: int, adapters: int, rank: int, seed: int = 0, dtype: str = "float32"
) -> Workload:
    """The speed profile's sets: ``layers`` Llama-3-shaped layers of width ``width``; alpha = r."""
    return Workload(
        layers=layers,
        adapters=adapters,
        rank=rank,
        lora_alpha=rank,
        **llama_shapes(width),
        dtype=dtype,
        seed=seed,
        base_model=f"bench/llama3-shapes-w{width}",
    )


def module_shapes(w: Workload) -> list[tuple[str, int, int]]:
    """(module name in the base model, in_features, out_features), layer by layer."""
    h, kv, mlp = w.hidden, w.kv, w.mlp
    per_layer = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (h, kv),
        "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (h, mlp),
        "mlp.up_proj": (h, mlp),
        "mlp.down_proj": (mlp, h),
    }
    return [
        (f"model.layers.{i}.{name}", n, m)
        for i in range(w.layers)
        for name, (n, m) in per_layer.items()
    ]


def tensor_bytes(w: Workload, itemsize: int, rank: int) -> int:
    """Bytes of one adapter's (or one merged output's) factors: (in + out) × rank per module."""
    return sum(n + m for _, n, m in module_shapes(w)) * rank * itemsize


def lora_header(modules: Iterable[tuple[str, int, int, int]], dtype: str) -> tuple[bytes, int]:
    """The opening of a safetensors file holding, for each (module, in, out, r), lora_A
    (r × in) and lora_B (out × r) back to back in ``dtype``: the 8-byte length and the JSON
    header (padded to 8 bytes, as the format asks); and the size of the data that follows.

    Written by hand where the tensors are never in memory: the floor's streamed output, and
    header-only inputs whose data is a hole in a sparse file."""
    code, itemsize = DTYPES[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for module, n, m, r in modules:
        for which, shape in (("A", [r, n]), ("B", [m, r])):
            size = shape[0] * shape[1] * itemsize
            key = f"base_model.model.{module}.lora_{which}.weight"
            header[key] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, offset


def adapter_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("adapter-"))


def input_bytes(root: Path) -> int:
    return sum((d / "adapter_model.safetensors").stat().st_size for d in adapter_dirs(root))


# ----------------------------------------------------------------------------- generation


def _config_json(w: Workload) -> str:
    fields = {
        "r": w.rank,
        "lora_alpha": w.lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": list(PROJECTIONS),
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": w.base_model,
        "bias": "none",
    }
    try:
        from peft import LoraConfig

        config = LoraConfig(**fields).to_dict()
    except ImportError:  # a bare machine: the same fields PEFT reads
        config = {**fields, "peft_type": "LORA", "fan_in_fan_out": False, "use_rslora": False}
    config["target_modules"] = sorted(config["target_modules"])
    return json.dumps(config, indent=2, sort_keys=True, default=sorted) + "\n"


def _generator_seed(w: Workload, adapter: int, module: str) -> int:
    digest = hashlib.sha256(f"{w.seed}:{adapter}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _write_adapter(w: Workload, t: int, directory: Path) -> int:
    import torch
    from safetensors.torch import save_file

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[w.dtype]
    tensors = {}
    for module, n, m in module_shapes(w):
        g = torch.Generator().manual_seed(_generator_seed(w, t, module))
        # A like PEFT's Kaiming init (std ≈ 1/√n); B small and non-zero, as after training.
        A = torch.randn(w.rank, n, generator=g) / n**0.5
        B = torch.randn(m, w.rank, generator=g) * (0.02 / w.rank**0.5)
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = A.to(dtype)
        tensors[f"{prefix}.lora_B.weight"] = B.to(dtype)
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(_config_json(w))
    path = directory / "adapter_model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path.stat().st_size


def ensure_inputs(w: Workload, root: Path, log=print) -> Path:
    """The folder holding ``adapter-0`` … ``adapter-{T-1}`` for ``w``; generated if absent."""
    final = root / w.key
    if (final / "workload.json").exists():
        return final
    tmp = root / f".{w.key}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        total = 0
        for t in range(w.adapters):
            total += _write_adapter(w, t, tmp / f"adapter-{t}")
            log(f"  generated adapter {t + 1}/{w.adapters} ({total / 2**30:.2f} GiB so far)")
        (tmp / "workload.json").write_text(
            json.dumps({**asdict(w), "generator_version": GENERATOR_VERSION, "bytes": total}) + "\n"
        )
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ----------------------------------------------------------------------------- in the parent


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


def input_set(python: str, workload: Workload, root: Path) -> InputSet:
    """Generate (or find) the set for ``workload`` in a child process running this file."""
    cmd = [python, str(Path(__file__).resolve()), "--root", str(root)]
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


def main(argv: list[str] | None = None) -> int:
    """``python bench/speed/workloads.py --root DIR --workload JSON``: build (or find) a set."""
    ap = argparse.ArgumentParser(description="build a cached benchmark input set; print its path")
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--workload", required=True, help="Workload fields as JSON")
    args = ap.parse_args(argv)
    w = Workload(**json.loads(args.workload))
    path = ensure_inputs(w, args.root, lambda msg: print(msg, file=sys.stderr, flush=True))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
