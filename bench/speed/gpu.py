"""The GPU speed check (issue 16, item 3): core merges on CUDA against the I/O floor and the CPU.

    python3 -m bench.speed.gpu preflight --device cuda   # what is missing, in plain words
    python3 -m bench.speed.gpu run --device cuda         # Llama-3-8B shapes, 8 layers (~3 min)
    python3 -m bench.speed.gpu run --device cpu          # a tiny CPU-only run (CI, ~1 min)

``bench/gpu.sh`` runs the three steps of the check (preflight, the engine tests on the device,
this ``run``); see bench/README.md. Rows, each a fresh subprocess timed wall clock from the
repository root, as the other speed profiles do (``measure.run_measured``):

- ``floor``: ``floor.py``, read every input and write an output of the core merge's size;
- ``cli``: ``python -m worker.cli merge … --space core --device D`` for each method, on the
  device and (for CUDA) on the CPU, the fastest of ``--repeat``; its ``merge_report.json``
  timings give the in-process share;
- ``engine``: this file's ``engine`` child: every module's factors loaded on the device, then
  the engine alone, in-process, synchronised: ``merge_in_core_space`` module by module (what
  the runner calls today), ``merge_stacks_in_core_space`` (modules of one shape batched), and
  on CUDA the batched merge with its small eigendecompositions on the host
  (``eigh_device="cpu"``); the fastest of ``--repeat``, after a warm-up. It also reports the
  largest relative difference of ΔW between the batched and unbatched merges.

Prints one table (what, method, device, wall s, × floor, speed-up against the same row on the
CPU, and the wall time estimated for 32 layers), writes ``bench/out/gpu-<UTC>.json`` and, for
a CUDA run (not with ``--no-results``), ``bench/results/gpu-latest.json``. The parent imports
neither torch nor the product; only the children do.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `bench` importable
    sys.path.insert(0, str(ROOT))

from bench.speed.harness import (  # noqa: E402
    floor_command,
    merge_command,
    names,
    run_stamp,
    scaled,
    warm_page_cache,
)
from bench.speed.machine import machine_info, project_state, write_json  # noqa: E402
from bench.speed.measure import Measured, MiB, fresh, log, run_measured  # noqa: E402
from bench.speed.workloads import Workload, input_set, llama_shapes  # noqa: E402

#: seconds a child may run past ``--budget`` (bench/gpu.sh's timeout leaves more than this)
GRACE = 30.0
#: the layer count the "est. 32 layers" column scales to (Llama-3-8B)
FULL_LAYERS = 32
#: the engine child's timed variants, in the table's order
ENGINE_VARIANTS = ("unbatched", "batched", "batched, eigh on host")
#: per device: layers, width, repeats (--cpu is CI's tiny run)
DEFAULTS = {"cuda": (8, 4096, 2), "cpu": (1, 1024, 1)}

#: module → (why the check needs it, which part fails without it)
NEEDED = {
    "torch": ("the engine and every merge", "all"),
    "safetensors": ("reading adapters, the floor, the CLI's output", "bench"),
    "pydantic": ("the job spec (jobs/spec.py) that the CLI and run_merge validate", "bench"),
    "regex": ("adapter rank/alpha patterns (worker/adapters/config.py)", "bench"),
    "psutil": ("the machine's description in the JSON (bench/speed/machine.py)", "bench"),
    "pytest": ("the engine tests (else test_device.py's plain runner)", "tests"),
    "hypothesis": ("tests/engine/test_properties.py (else left out)", "tests"),
}


# ----------------------------------------------------------------------------- preflight


def _import_error(module: str) -> str | None:
    """Why ``module`` does not import (None when it does): absent, or broken (a dependency)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install failing in its own code
        return f"{type(exc).__name__}: {exc}"
    return None


def preflight(device: str) -> int:
    """Say what is missing for each part; 0: all can run, 2: not the speed run, 3: nothing."""
    missing = {m: err for m in NEEDED if (err := _import_error(m)) is not None}
    for module, err in missing.items():
        why, part = NEEDED[module]
        print(f"preflight: cannot import {module!r} ({err}): needed for {why} [{part}]")
    if "torch" in missing:
        print("preflight: no torch: nothing can run")
        return 3
    import torch

    print(
        f"preflight: {sys.executable} (Python {sys.version.split()[0]}), torch {torch.__version__}"
    )
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            print(
                f"preflight: --device {device} but torch sees no GPU (torch built for CUDA "
                f"{torch.version.cuda}); run `bash bench/gpu.sh --cpu` for the CPU-only check"
            )
            return 3
        print(f"preflight: CUDA {torch.version.cuda}, {torch.cuda.get_device_name(device)}")
    blocking = [m for m in missing if NEEDED[m][1] == "bench"]
    if blocking:
        print(
            "preflight: the speed run needs " + ", ".join(blocking) + ". Without network on "
            "the machine, carry wheels (bench/README.md, 'GPU check'); the tests still run"
        )
        return 2
    print("preflight: everything the check needs imports")
    return 0


# ----------------------------------------------------------------------------- engine child


def _load_stacks(dirs: list[Path], device: Any) -> tuple[list[str], list[Any]]:
    """Every module's FactorStack on ``device``, scaling lora_alpha / r folded into B."""
    import torch
    from safetensors import safe_open

    from worker.engine import FactorStack

    names: list[str] | None = None
    parts: dict[str, list[tuple[Any, Any]]] = {}
    for d in dirs:
        config = json.loads((d / "adapter_config.json").read_text())
        scale = config["lora_alpha"] / config["r"]
        with safe_open(d / "adapter_model.safetensors", framework="pt", device="cpu") as f:
            keys = [k for k in f.keys() if k.endswith(".lora_A.weight")]  # noqa: SIM118
            modules = [k[len("base_model.model.") : -len(".lora_A.weight")] for k in keys]
            names = names or modules
            for module in modules:
                prefix = f"base_model.model.{module}"
                A = f.get_tensor(f"{prefix}.lora_A.weight").float()
                B = f.get_tensor(f"{prefix}.lora_B.weight").float() * scale
                parts.setdefault(module, []).append((A, B))
    stacks = []
    for module in names or []:
        As, Bs = zip(*parts[module], strict=True)
        stacks.append(
            FactorStack(
                torch.cat(Bs, dim=1).to(device),
                torch.cat(As, dim=0).to(device),
                [a.shape[0] for a in As],
            )
        )
    return names or [], stacks


def _delta_rel_diff(x: Any, y: Any) -> float:
    """‖B_x A_x − B_y A_y‖_F / ‖B_y A_y‖_F from R × R products only (float64)."""
    Bx, Ax, By, Ay = (t.double() for t in (x.B, x.A, y.B, y.A))

    def inner(B1: Any, A1: Any, B2: Any, A2: Any) -> float:
        return float(((B1.mT @ B2) * (A1 @ A2.mT)).sum())

    yy = inner(By, Ay, By, Ay)
    diff = inner(Bx, Ax, Bx, Ax) + yy - 2 * inner(Bx, Ax, By, Ay)
    return (max(diff, 0.0) / yy) ** 0.5 if yy > 0 else max(diff, 0.0) ** 0.5


def engine_child(args: argparse.Namespace) -> int:
    """In-process timings of the engine alone on one device; JSON to ``--json``.

    The unbatched rows merge the modules as the runner does: side by side on CPU threads of
    one intra-op thread each (``worker.merge.pipeline``), one after another on a GPU.
    """
    importlib.import_module("worker")  # first: its OpenMP settings must precede torch's import
    import torch

    from worker.engine import shape_groups
    from worker.merge.pipeline import merge_threads

    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    names, stacks = _load_stacks(args.adapters, device)
    sync()
    load_s = time.perf_counter() - t0
    threads = merge_threads(device, "core")
    variants = _engine_variants(stacks, threads, cuda)
    _warm_up(stacks, args.methods)
    sync()
    out: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "unbatched_merge_threads": threads,
        "modules": len(stacks),
        "groups": [len(g) for g in shape_groups(stacks)],
        "load_s": round(load_s, 3),
        "methods": {},
    }
    for method in args.methods:
        timing = _time_method(variants, method, args.repeat, sync, names)
        out["methods"][method] = timing
        print(f"engine {device} {method}: {timing}", file=sys.stderr, flush=True)
    if cuda:
        out["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / MiB, 1)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _engine_variants(stacks: list[Any], threads: int, cuda: bool) -> dict[str, Any]:
    """The timed merges by name: module by module as the runner merges, batched, and (CUDA)
    batched with the small eigendecompositions on the host. Each takes (method, params)."""
    import torch

    from worker.engine import merge_in_core_space, merge_stacks_in_core_space
    from worker.merge.pipeline import ordered_map

    def gens() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(i) for i in range(len(stacks))]

    def unbatched(method: str, params: dict[str, Any]) -> list[Any]:
        def one(item: tuple[Any, torch.Generator]) -> Any:
            return merge_in_core_space(item[0], method, params, None, item[1])

        return list(ordered_map(one, zip(stacks, gens(), strict=True), threads))

    variants: dict[str, Any] = {
        "unbatched": unbatched,
        "batched": lambda m, p: merge_stacks_in_core_space(stacks, m, p, None, gens()),
    }
    if cuda:
        variants["batched, eigh on host"] = lambda m, p: merge_stacks_in_core_space(
            stacks, m, p, None, gens(), eigh_device="cpu"
        )
    return variants


def _warm_up(stacks: list[Any], methods: list[str]) -> None:
    """Merge the first module of each shape once: cuBLAS/cuSOLVER handles, lazy kernel loading."""
    from jobs.spec import validate_params
    from worker.engine import merge_in_core_space, merge_stacks_in_core_space, shape_groups

    firsts = [stacks[g[0]] for g in shape_groups(stacks)]
    for method in methods:
        p = validate_params(method, {})
        for s in firsts:
            merge_in_core_space(s, method, p)
        merge_stacks_in_core_space(firsts, method, p)


def _time_method(
    variants: dict[str, Any], method: str, repeat: int, sync: Any, names: list[str]
) -> dict[str, Any]:
    """Each variant's fastest of ``repeat`` runs, and how far batched and unbatched differ."""
    from jobs.spec import validate_params

    p = validate_params(method, {})
    timing: dict[str, Any] = {}
    results: dict[str, list[Any]] = {}
    for name, fn in variants.items():
        best = float("inf")
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            results[name] = fn(method, p)
            sync()
            best = min(best, time.perf_counter() - t0)
        timing[name] = round(best, 4)
    diffs = [
        _delta_rel_diff(b, u) for b, u in zip(results["batched"], results["unbatched"], strict=True)
    ]
    timing["batched_vs_unbatched_max_rel_diff"] = max(diffs)
    timing["worst_module"] = names[diffs.index(max(diffs))]
    # None for plain TA: written as the stacked factors, nothing is projected.
    residuals = [m.residual for m in results["batched"] if m.residual is not None]
    timing["max_residual"] = max(residuals) if residuals else None
    return timing


# ----------------------------------------------------------------------------- the run


class GpuRun:
    """One run: inputs, the floor, the CLI merges, the engine children, the table and JSON."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.python = args.python
        self.stamp = run_stamp()
        self.out = args.out_dir.resolve()
        self.work = self.out / "runs" / f"gpu-{self.stamp}"
        self.work.mkdir(parents=True)
        path = os.environ.get("PYTHONPATH")
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        self.t0 = time.monotonic()
        self.failures: list[dict[str, str]] = []
        self.skipped: list[str] = []

    def over_budget(self, step: str) -> bool:
        """True (and noted) when the run's time budget is spent: the step is skipped."""
        if time.monotonic() - self.t0 <= self.args.budget:
            return False
        log(f"  {step}: skipped, over the {self.args.budget:.0f} s budget")
        self.skipped.append(step)
        return True

    def measure(self, step: str, argv: list[str]) -> Measured | None:
        """A child, timed; None (recorded) when it failed."""
        # A child may run past the budget, but not so far that bench/gpu.sh's own timeout
        # kills this process before it prints the table: GRACE seconds are kept for that.
        left = self.args.budget + GRACE - (time.monotonic() - self.t0)
        timeout = max(5.0, min(self.args.timeout, left))
        m = run_measured(argv, cwd=ROOT, env=self.env, timeout=timeout)
        if m.returncode != 0:
            tail = (m.stderr or m.stdout).strip()[-1500:]
            log(f"  {step} FAILED (exit {m.returncode}):\n{tail}")
            self.failures.append({"step": step, "error": tail})
            return None
        log(f"  {step}: {m.wall_s:.2f} s, peak RSS {m.peak_rss / MiB:.0f} MiB")
        return m

    def cli(self, dirs: list[Path], method: str, device: str, out: Path) -> list[str]:
        return merge_command([self.python, "-m", "worker.cli"], dirs, out, method, "core", device)

    def run(self) -> int:
        a = self.args
        devices = [a.device] + (["cpu"] if a.device != "cpu" and not a.no_cpu else [])
        workload = Workload(
            layers=a.layers,
            adapters=a.adapters,
            rank=a.rank,
            **llama_shapes(a.width),
        )
        log(f"inputs: {workload.key} ({a.layers} layers, width {a.width})")
        inputs = input_set(self.python, workload, self.out / "inputs")
        warm_page_cache(inputs.dirs)  # as the other profiles do
        scale = FULL_LAYERS / a.layers
        rows: list[dict[str, Any]] = []
        floor_wall = self.floor_row(inputs.dirs, scale, rows)
        engine = self.timed_rows(devices, inputs.dirs, scale, rows)
        order = {"floor": 0, "cli": 1}
        rows.sort(key=lambda r: (order.get(r["what"], 2), r["method"] != "—", r["method"]))
        self._ratios(rows, floor_wall)
        record = self.record(devices, workload, inputs.bytes, rows, engine)
        print()
        print(self.table(record))
        path = self.out / f"gpu-{'' if a.device != 'cpu' else 'cpu-'}{self.stamp}.json"
        write_json(path, record)
        print(f"\nwrote {path}")
        results = a.results if a.results is not None else a.device != "cpu"
        if results:
            latest = a.results_dir / "gpu-latest.json"
            write_json(latest, record)
            print(f"wrote {latest}")
        if not a.keep_outputs:
            shutil.rmtree(self.work, ignore_errors=True)
        return 1 if self.failures or self.skipped else 0

    def floor_row(self, dirs: list[Path], scale: float, rows: list[dict[str, Any]]) -> float | None:
        """The I/O floor, once, into ``rows``; its wall time (None when it failed)."""
        log("floor")
        floor_out = self.work / "floor.safetensors"
        m = self.measure("floor", floor_command(self.python, dirs, floor_out))
        fresh(floor_out)
        if m is None:
            return None
        seconds = json.loads(m.stdout.strip().splitlines()[-1])["seconds"]
        rows.append(
            self._row("floor", "—", "cpu", m.wall_s, scaled(m.wall_s, seconds, scale))
            | {"peak_rss_mib": round(m.peak_rss / MiB, 1)}
        )
        return m.wall_s

    def timed_rows(
        self, devices: list[str], dirs: list[Path], scale: float, rows: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The engine and CLI rows into ``rows``, most telling first, so that a slow machine
        loses the least of the table: the engine on the device, one pass of the CLI rows, the
        engine on the CPU, then the CLI's repeats. Returns the engine children's JSON."""
        a = self.args
        engine: dict[str, Any] = {}
        best: dict[tuple[str, str], tuple[Measured, dict[str, Any]]] = {}
        self.engine(devices[0], dirs, engine, rows, scale)
        for attempt in range(max(1, a.repeat)):
            for method in a.methods:
                for device in devices:
                    self.cli_attempt(method, device, dirs, best)
            if attempt == 0:
                for device in devices[1:]:
                    self.engine(device, dirs, engine, rows, scale)
        for (method, device), (m, report) in best.items():
            timings = report.get("timings", {})
            in_process = timings.get("total_s", m.wall_s)
            rows.append(
                self._row("cli", method, device, m.wall_s, scaled(m.wall_s, in_process, scale))
                | {
                    "peak_rss_mib": round(m.peak_rss / MiB, 1),
                    "timings": timings,
                    "report_device": report.get("device"),
                    "self_check": report.get("self_check"),
                }
            )
        return engine

    def record(
        self,
        devices: list[str],
        workload: Workload,
        inputs_bytes: int,
        rows: list[dict[str, Any]],
        engine: dict[str, Any],
    ) -> dict[str, Any]:
        """The run's JSON record: machine, code, configuration, rows, the engine's details."""
        a = self.args
        return {
            "benchmark": "gpu",
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "project": project_state(),
            "config": {
                "device": a.device,
                "devices": devices,
                "workload": asdict(workload),
                "inputs_bytes": inputs_bytes,
                "methods": a.methods,
                "repeat": a.repeat,
                "python": self.python,
                "scaled_to_layers": FULL_LAYERS,
            },
            "rows": rows,
            "engine": engine,
            "failures": self.failures,
            "skipped": self.skipped,
            "run_wall_s": round(time.monotonic() - self.t0, 1),
        }

    def cli_attempt(
        self,
        method: str,
        device: str,
        dirs: list[Path],
        best: dict[tuple[str, str], tuple[Measured, dict[str, Any]]],
    ) -> None:
        """One CLI merge, kept in ``best`` when it is the fastest of its row so far."""
        step = f"cli {method} {device}"
        if self.over_budget(step):
            return
        out = self.work / f"core-{method}-{device}"
        m = self.measure(step, self.cli(dirs, method, device, out))
        if m is None:
            return
        report = json.loads((out / "merge_report.json").read_text())
        fresh(out)
        key = (method, device)
        if key not in best or m.wall_s < best[key][0].wall_s:
            best[key] = (m, report)

    def engine(
        self,
        device: str,
        dirs: list[Path],
        engine: dict[str, Any],
        rows: list[dict[str, Any]],
        scale: float,
    ) -> None:
        """The engine child on ``device``: its JSON into ``engine``, its rows into ``rows``."""
        a, step = self.args, f"engine {device}"
        if self.over_budget(step):
            return
        js = self.work / f"engine-{device}.json"
        argv = [self.python, "-m", "bench.speed.gpu", "engine", "--device", device]
        argv += ["--methods", ",".join(a.methods), "--repeat", str(max(1, a.repeat))]
        if self.measure(step, [*argv, "--json", str(js), *map(str, dirs)]) is None:
            return
        engine[device] = json.loads(js.read_text())
        for method, timing in engine[device]["methods"].items():
            for variant in ENGINE_VARIANTS:
                if variant in timing:
                    seconds = timing[variant]
                    rows.append(
                        self._row(f"engine {variant}", method, device, seconds, seconds * scale)
                    )

    @staticmethod
    def _row(what: str, method: str, device: str, wall: float, est: float) -> dict[str, Any]:
        return {
            "what": what,
            "method": method,
            "device": device,
            "wall_s": round(wall, 4),
            "est_32_layers_s": round(est, 3),
        }

    @staticmethod
    def _ratios(rows: list[dict[str, Any]], floor_wall: float | None) -> None:
        """× floor (whole processes only) and the speed-up against the same row on the CPU
        (the engine's rows against the CPU's unbatched merge)."""
        cpu = {(r["what"], r["method"]): r["wall_s"] for r in rows if r["device"] == "cpu"}
        for r in rows:
            whole = r["what"] in ("floor", "cli")
            r["ratio_to_floor"] = (
                round(r["wall_s"] / floor_wall, 2) if whole and floor_wall else None
            )
            base_what = r["what"] if whole else "engine unbatched"
            base = cpu.get((base_what, r["method"]))
            r["speedup_vs_cpu"] = (
                round(base / r["wall_s"], 2) if base and r["what"] != "floor" else None
            )

    @staticmethod
    def table(record: dict[str, Any]) -> str:
        cfg, machine = record["config"], record["machine"]
        w = cfg["workload"]
        gpus = ", ".join(machine.get("gpus") or []) or "no GPU"
        head = (
            f"GPU check: {w['adapters']} adapters × rank {w['rank']}, {w['layers']} layer(s) of "
            f"Llama-3 shapes (width {w['hidden']}), inputs {cfg['inputs_bytes'] / MiB:.0f} MiB "
            f"float32; {machine['nproc']} CPUs, {gpus}, torch {machine['torch']}"
        )
        cols = ["what", "method", "device", "wall s", "× floor", "speed-up vs CPU"]
        cols.append(f"est. {FULL_LAYERS} layers s")
        lines = []
        for r in record["rows"]:
            lines.append(
                [
                    r["what"],
                    r["method"],
                    r["device"],
                    f"{r['wall_s']:.3f}",
                    "—" if r["ratio_to_floor"] is None else f"{r['ratio_to_floor']:.2f}",
                    "—" if r["speedup_vs_cpu"] is None else f"{r['speedup_vs_cpu']:.2f}×",
                    f"{r['est_32_layers_s']:.2f}",
                ]
            )
        widths = [
            max(len(c), *(len(x[i]) for x in lines)) if lines else len(c)
            for i, c in enumerate(cols)
        ]
        fmt = "  ".join(f"{{:<{n}}}" if i < 3 else f"{{:>{n}}}" for i, n in enumerate(widths))
        text = [head, "", fmt.format(*cols), "-" * (sum(widths) + 2 * (len(widths) - 1))]
        text += [fmt.format(*x) for x in lines]
        text.append(
            "cli: `python -m worker.cli merge --space core` as a whole process (start-up, read, "
            "merge, write); engine: the merge alone, in-process, on factors already on the "
            "device; × floor for whole processes only; speed-up: the same row on the CPU (engine: "
            f"the CPU's unbatched merge) ÷ this row; est.: in-process time × {FULL_LAYERS}/layers "
            "+ start-up."
        )
        for device, e in record["engine"].items():
            for method, t in e["methods"].items():
                text.append(
                    f"engine {device} {method}: batched vs unbatched ΔW, max relative difference "
                    f"{t['batched_vs_unbatched_max_rel_diff']:.1e} ({t['worst_module']}); "
                    + (
                        f"max self-check residual {t['max_residual']:.1e}"
                        if t["max_residual"] is not None
                        else "no self-check (stacked factors, nothing projected)"
                    )
                )
        for f in record["failures"]:
            text.append(f"FAILED {f['step']}: {f['error'].splitlines()[-1] if f['error'] else ''}")
        for s in record["skipped"]:
            text.append(f"SKIPPED {s} (time budget)")
        return "\n".join(text)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("preflight", help="say what is missing for the check")
    pre.add_argument("--device", default="cuda")

    run = sub.add_parser("run", help="the speed table (bench/gpu.sh's part b)")
    run.add_argument("--device", default="cuda", help="cuda (also runs the CPU rows) or cpu")
    run.add_argument("--layers", type=int, help="default: cuda 8, cpu 1")
    run.add_argument("--width", type=int, help="default: cuda 4096 (Llama-3-8B), cpu 1024")
    run.add_argument("--repeat", type=int, help="fastest of N per row; default: cuda 2, cpu 1")
    run.add_argument("--adapters", type=int, default=8)
    run.add_argument("--rank", type=int, default=16)
    run.add_argument("--methods", default="ta,ties,tsv")
    run.add_argument("--no-cpu", action="store_true", help="no CPU rows beside the device's")
    run.add_argument("--python", default=sys.executable, help="the children's interpreter")
    run.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "out")
    run.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    results = run.add_mutually_exclusive_group()
    results.add_argument(
        "--results", action="store_true", default=None, help="write results/gpu-latest.json"
    )
    results.add_argument(
        "--no-results", dest="results", action="store_false", help="(default for --device cpu)"
    )
    run.add_argument("--budget", type=float, default=270.0, help="seconds; later rows skipped")
    run.add_argument("--timeout", type=float, default=240.0, help="seconds per child")
    run.add_argument("--keep-outputs", action="store_true")

    eng = sub.add_parser("engine", help="(child) in-process engine timings on one device")
    eng.add_argument("adapters", nargs="+", type=Path)
    eng.add_argument("--device", required=True)
    eng.add_argument("--methods", default="ta,ties,tsv")
    eng.add_argument("--repeat", type=int, default=2)
    eng.add_argument("--json", type=Path, required=True)

    args = ap.parse_args(argv)
    if hasattr(args, "methods"):
        args.methods = names(args.methods)
    if args.command == "run":
        kind = "cpu" if args.device == "cpu" else "cuda"
        layers, width, repeat = DEFAULTS[kind]
        args.layers = args.layers or layers
        args.width = args.width or width
        args.repeat = args.repeat or repeat
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "preflight":
        return preflight(args.device)
    if args.command == "engine":
        return engine_child(args)
    return GpuRun(args).run()


if __name__ == "__main__":
    sys.exit(main())
