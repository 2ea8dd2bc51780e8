"""The floor: read every input tensor and write an output of the merged adapter's size, nothing else.

    python bench/speed/floor.py -o OUT.safetensors [--dtype float32] ADAPTER_DIR...

Every tensor of every input is read with ``safetensors.safe_open(...).get_tensor`` and its
bytes copied into a buffer (get_tensor alone only maps the file). Then one safetensors file
with the core merge's layout is written: per module lora_A (R × in) and lora_B (out × R),
R = Σ r_t (the exact rank of a core-space merge), here zeros, streamed in the safetensors
format (8-byte header length, JSON header, tensors back to back) without holding the output
in memory; it loads with ``safe_open``. Any merge has to pay at least this: it is the I/O
cost of the job.

    python bench/speed/floor.py --gemm ADAPTER_DIR...

The compute floor instead (no I/O): for each module, on random float32 stacks of its shapes
(B_stack m × R, A_stack R × n), the three products that core space through the reference
bases cannot avoid on its fast (Gram) route: the Gram matrices B_stackᵀ B_stack and
A_stack A_stackᵀ, and the map back on the narrower side, B_stack C or C A_stack with an
R × R matrix C, about (2 (m + n) + 2 min(m, n)) R² flops, timed with torch's default
threads. A core merge other than plain
task arithmetic (written as the stacked factors, with no product at all) does at least
this; when it exceeds the I/O floor, the merge is bound by arithmetic, not by I/O.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script (the benchmarks' child): make `bench` importable
    sys.path.insert(0, str(ROOT))

from bench.speed.workloads import DTYPES, lora_header  # noqa: E402

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def _modules(paths: list[Path]) -> tuple[dict[str, dict], int]:
    """module -> in, out, Σ rank, from the headers alone; and the largest input tensor's bytes
    (at float64 size, an upper bound)."""
    modules: dict[str, dict] = {}
    largest_input = 0
    for path in paths:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                match = _KEY.match(key)
                if match is None:
                    continue
                shape = f.get_slice(key).get_shape()
                largest_input = max(largest_input, shape[0] * shape[1] * 8)
                entry = modules.setdefault(match["module"], {"rank": 0})
                if match["which"] == "A":
                    entry["rank"] += shape[0]
                    entry["in"] = shape[1]
                else:
                    entry["out"] = shape[0]
    return modules, largest_input


def gemm_floor(adapters: list[Path]) -> dict:
    """The compute floor (see the module's docstring): seconds and flops of the products."""
    modules, _ = _modules([d / "adapter_model.safetensors" for d in adapters])
    shapes: dict[tuple[int, int, int], int] = {}
    for e in modules.values():
        key = (e["out"], e["rank"], e["in"])
        shapes[key] = shapes.get(key, 0) + 1
    gen = torch.Generator().manual_seed(0)
    seconds = flops = 0.0
    for (m, R, n), count in shapes.items():
        B = torch.randn(m, R, generator=gen)
        A = torch.randn(R, n, generator=gen)
        K = torch.randn(R, R, generator=gen)
        (B.mT @ B).sum()  # warm-up: the first product of a shape pays for buffers
        t0 = time.perf_counter()
        for _ in range(count):
            B.mT @ B
            A @ A.mT
            _ = B @ K if m < n else K @ A
        seconds += time.perf_counter() - t0
        flops += count * (2 * (m + n) + 2 * min(m, n)) * R * R
    return {"seconds": seconds, "flops": flops, "gflops_per_s": flops / seconds / 1e9,
            "modules": len(modules), "shapes": len(shapes)}  # fmt: skip


def read_all(paths: list[Path], largest_input: int) -> int:
    """Copy every tensor's bytes of every file; the bytes read.

    get_tensor maps the file without copying (safetensors ≥ 0.6), so each tensor's bytes are
    copied into a reused buffer, as read(2) would, to be sure every byte is loaded. One file
    at a time, closed after, so the mapped pages of at most one input stay resident."""
    scratch = torch.empty(largest_input, dtype=torch.uint8)
    read_bytes = 0
    for path in paths:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118
                t = f.get_tensor(key).reshape(-1).view(torch.uint8)
                scratch[: t.numel()].copy_(t)
                read_bytes += t.numel()
    return read_bytes


def write_core_layout(modules: dict[str, dict], output: Path, dtype: str) -> int:
    """The core merge's output layout (Σ r_t per module) as zeros, streamed; bytes written."""
    head, _ = lora_header(
        ((name, e["in"], e["out"], e["rank"]) for name, e in modules.items()), dtype
    )
    itemsize = DTYPES[dtype][1]
    largest = max(max(e["rank"] * e["in"], e["out"] * e["rank"]) for e in modules.values())
    zeros = memoryview(bytearray(largest * itemsize))
    with open(output, "wb") as out:
        out.write(head)
        for e in modules.values():
            out.write(zeros[: e["rank"] * e["in"] * itemsize])
            out.write(zeros[: e["out"] * e["rank"] * itemsize])
    return output.stat().st_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapters", nargs="+", type=Path)
    ap.add_argument("-o", "--output", type=Path)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--gemm", action="store_true", help="time the compute floor instead")
    args = ap.parse_args(argv)
    if args.gemm:
        print(json.dumps(gemm_floor(args.adapters)))
        return 0
    if args.output is None:
        ap.error("-o/--output is required (but with --gemm)")
    t0 = time.perf_counter()
    # Copies are memory-bound: one thread is as fast, and intra-op threads that spin-wait for
    # a core would only make the floor fragile on a shared machine.
    torch.set_num_threads(1)
    paths = [d / "adapter_model.safetensors" for d in args.adapters]
    modules, largest_input = _modules(paths)
    read_bytes = read_all(paths, largest_input)
    written = write_core_layout(modules, args.output, args.dtype)
    print(
        json.dumps(
            {
                "read_bytes": read_bytes,
                "written_bytes": written,
                "modules": len(modules),
                "seconds": time.perf_counter() - t0,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
