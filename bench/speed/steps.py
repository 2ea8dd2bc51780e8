"""Where a merge's time goes: the engine's public functions called one step at a time.

    python bench/speed/steps.py --space core --method ties --json OUT.json \\
        [--out-dir DIR] [--device cpu] [--engine-check] ADAPTER_DIR...

Per module, on the real inputs (every module the adapters share, in file order):

| step | core space | full space |
|---|---|---|
| read | ``AdapterReader.read`` of every adapter (as ``run_merge`` reads), scaling folded into B | same |
| bases | ``reference_bases`` (QR/Gram + small SVD of the stacked factors) | — |
| project | ``core_factors`` and their products, the R × R M_t | ΔW_t = B_t A_t (m × n each) |
| merge | ``merge_tasks`` on the M_t (with their thin factors, as the engine passes them) | ``apply_method`` on the ΔW_t |
| reconstruct | B = U M, A = Vᵀ (``Basis.apply`` / ``transposed``; SVD of M when not square) | SVD of ΔW, cut at its numerical rank |
| self_check | ``projection_residual`` (the report's residual) | — |
| write | ``safetensors.torch.save_file`` of the module's (A, B), one file per module | same |

``--engine-check`` also times ``merge_module`` (the engine's own entry point) on the same
factors, so the sum of the steps can be compared with what the runner really calls. Prints
nothing; writes JSON: seconds per step (summed over modules), modules, output rank, threads,
and with CUDA ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

T_START = time.perf_counter()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from jobs.spec import METHOD_PARAMS  # noqa: E402
from worker.adapters import open_adapter  # noqa: E402
from worker.engine import (  # noqa: E402
    LoraFactors,
    Tasks,
    apply_method,
    linalg,
    merge_module,
    merge_tasks,
    reference_bases,
)
from worker.engine.core_space import projection_residual, through_the_stacks  # noqa: E402

IMPORT_S = time.perf_counter() - T_START
STEPS = ("read", "bases", "project", "merge", "reconstruct", "self_check", "write")


def default_params(method: str) -> dict:
    return {p.name: p.default for p in METHOD_PARAMS[method]}


def module_generator(seed: int, module: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def reconstruct_core(bases, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U M, A = Vᵀ as the engine writes them: through the stacks when both bases lie on
    them, else through the bases (U stays implicit); the SVD of M when it is not square."""
    left, right = bases.left, bases.right
    if M.shape[0] == M.shape[1]:
        pair = through_the_stacks(left, right, M)
        return pair if pair is not None else (left.apply(M), right.transposed())
    P, S, Qh = torch.linalg.svd(M, full_matrices=False)
    return left.apply(P * S), right.apply_t(Qh)


def reconstruct_full(dW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    k = int(linalg.numerical_ranks(S, tuple(dW.shape)))
    return U[:, :k] * S[:k], Vh[:k]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapters", nargs="+", type=Path)
    ap.add_argument("--space", choices=("core", "full"), default="core")
    ap.add_argument("--method", default="ta")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--out-dir", type=Path, help="where the per-module outputs go (default: none)")
    ap.add_argument("--engine-check", action="store_true")
    return ap.parse_args(argv)


def read_factors(readers: list, module: str, device: torch.device) -> list[LoraFactors]:
    """Every adapter's factors of ``module`` on ``device``, scaling folded into B (as
    ``run_merge`` reads them)."""
    factors = []
    for reader in readers:
        A, B = reader.read(module, device)
        factors.append(LoraFactors(A=A, B=B * reader.modules[module].scaling))
    return factors


class Stopwatch:
    """Each step's seconds summed over modules: ``lap(step)`` charges the time since the last
    lap (or ``restart``) to ``step``. CUDA runs asynchronously, so the clock synchronises the
    device first; on CUDA the device is initialised and its peak-memory count reset."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.init()
            torch.cuda.reset_peak_memory_stats(device)
        self.seconds = dict.fromkeys(STEPS, 0.0)
        self.last = 0.0

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def restart(self) -> None:
        self.last = self.now()

    def elapsed(self) -> float:
        return self.now() - self.last

    def lap(self, step: str) -> None:
        t = self.now()
        self.seconds[step] += t - self.last
        self.last = t


def core_steps(
    factors: list[LoraFactors], method: str, params: dict, gen: torch.Generator, watch: Stopwatch
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One module in core space, step by step: the merged B and A and the projection residual."""
    bases = reference_bases(factors)
    watch.lap("bases")
    tasks = Tasks(
        factors=(bases.left.coords, bases.right.coords.mT, [f.A.shape[0] for f in factors]),
        layer_k=min(factors[0].B.shape[0], factors[0].A.shape[1]),
        generators=[gen],
    )
    tasks.matrices  # noqa: B018  (formed here: the projection step)
    watch.lap("project")
    M = merge_tasks(method, tasks, params)[0][0]
    watch.lap("merge")
    B, A = reconstruct_core(bases, M)
    watch.lap("reconstruct")
    residual = float(projection_residual(factors, bases))
    watch.lap("self_check")
    return B, A, residual


def full_steps(
    factors: list[LoraFactors], method: str, params: dict, gen: torch.Generator, watch: Stopwatch
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One module in full space (dense ΔW_t, the method, the SVD back to factors): the merged
    B and A, and a residual of 0 (nothing is projected)."""
    dWs = [f.B @ f.A for f in factors]
    watch.lap("project")
    M = apply_method(method, dWs, params, gen)
    del dWs
    watch.lap("merge")
    B, A = reconstruct_full(M)
    watch.lap("reconstruct")
    return B, A, 0.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    watch = Stopwatch(device)
    params = default_params(args.method)
    watch.restart()
    readers = [open_adapter(d, d.name) for d in args.adapters]
    modules = list(readers[0].modules)
    open_s = watch.elapsed()
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    steps = core_steps if args.space == "core" else full_steps
    engine_s = residual = 0.0
    ranks: list[int] = []
    for i, module in enumerate(modules):
        watch.restart()
        factors = read_factors(readers, module, device)
        watch.lap("read")
        gen = module_generator(args.seed, module)
        B, A, res = steps(factors, args.method, params, gen, watch)
        residual = max(residual, res)
        ranks.append(A.shape[-2])  # A is (…, rank, in): the core path keeps a group dimension
        if args.out_dir is not None:
            save_file(
                {"lora_A": A.cpu().contiguous(), "lora_B": B.cpu().contiguous()},
                args.out_dir / f"{i:05d}.safetensors",
            )
        watch.lap("write")
        if args.engine_check:
            watch.restart()
            merge_module(factors, args.method, params, space=args.space, generator=gen)
            engine_s += watch.elapsed()
        del factors, B, A
    for reader in readers:
        reader.close()
    seconds = watch.seconds
    result = {
        "space": args.space,
        "method": args.method,
        "params": params,
        "device": str(device),
        "modules": len(modules),
        "adapters": len(readers),
        "threads": torch.get_num_threads(),
        "import_s": IMPORT_S,
        "open_s": open_s,
        "steps_s": seconds,
        "compute_s": sum(seconds[s] for s in ("bases", "project", "merge", "reconstruct")),
        "in_process_s": time.perf_counter() - T_START,
        "output_rank_max": max(ranks, default=0),
        "max_projection_residual": residual if args.space == "core" else None,
        "engine_merge_module_s": engine_s if args.engine_check else None,
        "cuda_max_memory_allocated": torch.cuda.max_memory_allocated(device)
        if watch.cuda
        else None,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
