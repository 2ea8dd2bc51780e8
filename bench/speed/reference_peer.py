"""The paper's reference code as a peer: its core-space path, timed per layer, in-process.

    python bench/speed/reference_peer.py --repo MIRROR_GIT_DIR --layers 1 --methods tv,tsv \\
        --json OUT.json [--dump-deltas OUT.safetensors] ADAPTER_DIR...

At run time, ``task_merger.py``, ``merging_functions.py``, ``masking_ops.py`` and ``utils.py``
are extracted from the reference repository (a git directory, e.g. the mirror of
github.com/apanariello4/core-space-merging) into a temporary folder outside this project;
none of that code is part of coremerge. Third-party modules those files import but this
environment lacks (clip, scipy, scikit-learn, einops, the repo's own model zoo…) are
replaced by inert stubs: the timed path (``MatrixPerLayerMerger.get_core_matrices`` and
``_merge_tensors``) uses none of them, and the report lists every stub.

The merger is built without its ``__init__`` (which wants fine-tuned models): only the
attributes that path reads are set. The factors of the first ``--layers`` layers are loaded
first (scaling folded into B, as coremerge does); the clock then runs over the reference's
own calls only: no file I/O, float64 as the reference computes, the core cache cleared before
each layer so every layer pays for its bases; each layer is timed ``--rounds`` times and the
fastest round kept (other processes on a shared machine come and go). The dense ΔW = U M Vh of one module per method
can be dumped (after timing) to cross-check coremerge's output.
"""

from __future__ import annotations

import argparse
import ast
import importlib.abc
import importlib.machinery
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REFERENCE_FILES = ("task_merger.py", "merging_functions.py", "masking_ops.py", "utils.py")
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


class _Inert:
    """Stands for any attribute of a stubbed module: callable, subclassable, never used."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __getattr__(self, name: str):
        return _Inert()

    def __mro_entries__(self, bases):
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()


class _StubMissing(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on ``sys.meta_path``, for the named top-level modules (and their submodules) only."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.stubbed: list[str] = []

    def find_spec(self, fullname, path, target=None):
        if fullname.partition(".")[0] not in self.names:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        self.stubbed.append(spec.name)
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        pass


def extract_reference(repo: Path, dest: Path) -> str:
    """Copy the reference files at HEAD of the git directory ``repo`` into ``dest``."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "--git-dir", str(repo), *args], capture_output=True, text=True, check=True
        ).stdout

    commit = git("rev-parse", "HEAD").strip()
    for name in REFERENCE_FILES:
        (dest / name).write_text(git("show", f"HEAD:{name}"))
    return commit


def missing_imports(workdir: Path) -> set[str]:
    """Top-level modules the reference files import that neither they nor this env provide."""
    names = set()
    for name in REFERENCE_FILES:
        for node in ast.walk(ast.parse((workdir / name).read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    local = {Path(n).stem for n in REFERENCE_FILES}
    return {n for n in names - local if importlib.util.find_spec(n) is None}


def load_factors(adapters: list[Path], layers: int) -> dict[str, list[tuple]]:
    """module -> [(A_t, s_t B_t)] for the first ``layers`` layers, float32, in memory."""
    out: dict[str, list[tuple]] = {}
    for d in adapters:
        config = json.loads((d / "adapter_config.json").read_text())
        scaling = config["lora_alpha"] / config["r"]
        with safe_open(d / "adapter_model.safetensors", framework="pt") as f:
            for i in range(layers):
                for proj in PROJECTIONS:
                    module = f"model.layers.{i}.{proj}"
                    prefix = f"base_model.model.{module}"
                    A = f.get_tensor(f"{prefix}.lora_A.weight").float()
                    B = f.get_tensor(f"{prefix}.lora_B.weight").float() * scaling
                    out.setdefault(module, []).append((A, B))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapters", nargs="+", type=Path)
    ap.add_argument("--repo", type=Path, required=True, help="git directory of the reference")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--methods", default="tv,tsv")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per layer; fastest kept")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--dump-deltas", type=Path, help="ΔW of one module per method, after timing")
    ap.add_argument("--dump-module", default="model.layers.0.self_attn.k_proj")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.layers < 1:
        ap.error("--rounds and --layers must be at least 1")
    return args


def import_reference(workdir: Path) -> tuple[types.ModuleType, list[str], float]:
    """The reference's ``task_merger`` from ``workdir``, its missing imports stubbed: the
    module, the stubs used and the import's seconds."""
    stubs = _StubMissing(missing_imports(workdir))
    sys.path.insert(0, str(workdir))
    sys.meta_path.append(stubs)
    t_import = time.perf_counter()
    try:
        import task_merger  # the reference's module, from workdir
    finally:
        sys.meta_path.remove(stubs)
    return task_merger, sorted(set(stubs.stubbed)), time.perf_counter() - t_import


def build_merger(task_merger: types.ModuleType, tasks: int) -> Any:
    """A ``MatrixPerLayerMerger`` without its ``__init__`` (which wants fine-tuned models):
    only the attributes the timed path reads are set."""
    merger = task_merger.MatrixPerLayerMerger.__new__(task_merger.MatrixPerLayerMerger)
    torch.nn.Module.__init__(merger)
    merger.cache = {}
    merger.lmc = False
    merger.scaling_coeffs = torch.ones(tasks)
    return merger


def time_layer(
    merger: Any, ftms_params_ab: list[dict], config: dict, layer: int, rounds: int
) -> tuple[dict[str, float], float]:
    """One layer's modules through the reference, the fastest of ``rounds`` (other processes
    come and go): seconds per module, and the seconds of the dense ΔW (not compared)."""
    best: dict[str, float] | None = None
    best_dense: float | None = None
    for _ in range(rounds):
        merger.cache.clear()
        times, dense = {}, 0.0
        for proj in PROJECTIONS:
            key = f"model.layers.{layer}.{proj}"
            t0 = time.perf_counter()
            M_list, U, Vh = merger.get_core_matrices(ftms_params_ab, key, config)
            merged = merger._merge_tensors(M_list, config)
            times[key] = time.perf_counter() - t0
            # Not in the comparison: its merge() goes on to the dense ΔW (m × n).
            t0 = time.perf_counter()
            U @ merged.to(U.dtype) @ Vh
            dense += time.perf_counter() - t0
        if best is None or sum(times.values()) < sum(best.values()):
            best = times
        best_dense = dense if best_dense is None else min(best_dense, dense)
    return best or {}, best_dense or 0.0


def time_method(merger: Any, ftms_params_ab: list[dict], method: str, layers: int, rounds: int):
    """The reference's core-space path for ``method`` over the first ``layers`` layers."""
    config = {"merge_space": "core", "merge_method": method}
    per_layer, per_module, dense_per_layer = [], {}, []
    for i in range(layers):
        best, best_dense = time_layer(merger, ftms_params_ab, config, i, rounds)
        per_layer.append(sum(best.values()))
        per_module.update(best)
        dense_per_layer.append(best_dense)
    return {
        "per_layer_s": per_layer,
        "mean_layer_s": sum(per_layer) / len(per_layer),
        "per_module_s": per_module,
        "dense_delta_w_per_layer_s": dense_per_layer,
    }


def dense_delta(merger: Any, ftms_params_ab: list[dict], method: str, module: str) -> Any:
    """The reference's merged ΔW = U M Vh of ``module`` (float32), for the cross-check."""
    config = {"merge_space": "core", "merge_method": method}
    merger.cache.clear()
    M_list, U, Vh = merger.get_core_matrices(ftms_params_ab, module, config)
    merged = merger._merge_tensors(M_list, config)
    return (U @ merged.to(U.dtype) @ Vh).float().contiguous()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="coremerge-bench-reference-"))
    try:
        commit = extract_reference(args.repo, workdir)
        task_merger, stubbed, import_s = import_reference(workdir)
        factors = load_factors(args.adapters, args.layers)
        # What get_ft_ab_parameters() returns, one dict per task: module -> (A, B).
        ftms_params_ab = [
            {m: pairs[t] for m, pairs in factors.items()} for t in range(len(args.adapters))
        ]
        merger = build_merger(task_merger, len(args.adapters))
        # Warm-up: LAPACK/BLAS initialisation is not the method's cost.
        torch.linalg.svd(torch.randn(256, 64, dtype=torch.float64), full_matrices=False)
        results, deltas = {}, {}
        for method in args.methods.split(","):
            results[method] = time_method(merger, ftms_params_ab, method, args.layers, args.rounds)
            if args.dump_deltas:
                deltas[method] = dense_delta(merger, ftms_params_ab, method, args.dump_module)
        if deltas:
            save_file(deltas, args.dump_deltas, metadata={"module": args.dump_module})
        record = {
            "repo": str(args.repo),
            "commit": commit,
            "files": list(REFERENCE_FILES),
            "stubbed_modules": stubbed,
            "import_s": import_s,
            "layers": args.layers,
            "rounds": args.rounds,
            "dtype": "float64",
            "torch_threads": torch.get_num_threads(),
            "methods": results,
            "dump_module": args.dump_module if deltas else None,
        }
        args.json.write_text(json.dumps(record, indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
