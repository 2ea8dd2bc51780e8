"""Engine benchmark: coremerge's CLI against the I/O floor and the paper's reference code.

    .venv/bin/python bench/engine.py                 # the full workload (issue 3)
    .venv/bin/python bench/engine.py --layers 4      # a quick run

Workload: 8 random LoRA adapters of rank 16 on Llama-3-8B shapes (32 layers × q,k,v,o,gate,
up,down), written as real PEFT adapters and cached under ``bench/out/inputs/``. Each step runs
as a fresh subprocess (start-up counts the same for all), timed wall clock with its peak RSS:

- ``floor``: read every input tensor with safetensors and stream an output of the core
  merge's size (rank Σ r_t = 128) — the I/O any merge must pay (``bench/_floor.py``);
- ``core <method>``: ``coremerge merge … --space core`` for ta, ties, tsv;
- ``full ta``: ``--space full`` on a sample of layers, scaled linearly to the workload;
- ``reference``: the paper's core-space path (``MatrixPerLayerMerger.get_core_matrices`` +
  ``_merge_tensors``, float64, in-process, no file I/O) on one layer, extrapolated
  (``bench/_reference.py``; its code is extracted to a temp dir at run time, never vendored).

Start-up RSS comes from a probe process that only imports what the step imports; "peak −
start-up" is then the memory the work itself needs. Prints a table and the targets of issue 3
(PASS/FAIL), writes ``bench/out/engine-<timestamp>.json`` and ``bench/results/engine-latest.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import (
    GiB,
    Measured,
    MiB,
    fresh,
    machine_info,
    project_state,
    run_measured,
    wait_for_quiet,
    write_json,
)
from _inputs import Workload, adapter_dirs, input_bytes, module_shapes

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEFAULT_REFERENCE = Path("/work/.mirror/apanariello4+core-space-merging/repo")
#: coremerge method → the reference's name for it
REFERENCE_NAMES = {"ta": "tv", "tsv": "tsv"}
#: issue 3's targets
FLOOR_FACTOR = 3.0
RSS_FRACTION = 0.25
REFERENCE_SPEEDUP = 5.0
NPROC = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
#: what issue 3 quotes for the reference on a 2-core machine, per layer (for the notes)
ISSUE_REFERENCE_S_PER_LAYER = 2.3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--layers", type=int, default=32, help="decoder layers in the workload")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--input-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0, help="seed of the random factors")
    ap.add_argument("--methods", default="ta,ties,tsv", help="core-space methods to time")
    ap.add_argument(
        "--device", default="cpu", help="passed to `coremerge merge --device` (cpu, cuda, auto)"
    )
    ap.add_argument(
        "--full-layers", type=int, default=1, help="layers in the full-space sample (0: skip)"
    )
    ap.add_argument(
        "--ref-layers", type=int, default=1, help="layers timed with the reference (0: skip)"
    )
    ap.add_argument("--reference-repo", type=Path, default=DEFAULT_REFERENCE)
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per step (not the full-space sample); the fastest is kept",
    )
    ap.add_argument(
        "--max-contention",
        type=float,
        default=0.10,
        help="a run during which other processes used more than this share of the CPUs "
        "is repeated (see --extra-attempts)",
    )
    ap.add_argument(
        "--extra-attempts", type=int, default=3, help="runs allowed per step beyond --repeat"
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="before each step, wait up to this many seconds for other processes to leave the CPUs",
    )
    ap.add_argument("--coremerge", type=Path, default=ROOT / ".venv" / "bin" / "coremerge")
    ap.add_argument(
        "--wait-cli", type=float, default=0.0, help="seconds to wait for a working coremerge"
    )
    ap.add_argument("--out-dir", type=Path, default=BENCH / "out")
    ap.add_argument("--results", type=Path, default=BENCH / "results" / "engine-latest.json")
    ap.add_argument(
        "--no-results", action="store_true", help="do not update bench/results/engine-latest.json"
    )
    ap.add_argument("--keep-outputs", action="store_true", help="keep the merged adapters")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per subprocess, seconds")
    return ap.parse_args(argv)


def _timings(timings: dict[str, float]) -> str:
    """A report's timings on one line: seconds where the key says so (``_s``), counts as is."""
    return ", ".join(
        f"{k} {v:.2f} s" if k.endswith("_s") else f"{k} {v:g}" for k, v in timings.items()
    )


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the CLI


def wait_for_cli(coremerge: Path, seconds: float) -> None:
    """Until ``coremerge merge --help`` works and knows ``--space`` (or raise)."""
    deadline = time.monotonic() + seconds
    while True:
        problem = None
        if not coremerge.exists():
            problem = f"{coremerge} does not exist"
        else:
            m = run_measured([str(coremerge), "merge", "--help"], cwd=ROOT, timeout=120)
            if m.returncode != 0 or "--space" not in m.stdout:
                problem = f"`coremerge merge --help` failed: {(m.stderr or m.stdout)[-300:]}"
        if problem is None:
            return
        if time.monotonic() >= deadline:
            raise SystemExit(f"engine bench: {problem}")
        log(f"waiting for the CLI: {problem}")
        time.sleep(min(30.0, max(1.0, deadline - time.monotonic())))


def cli_python(coremerge: Path) -> str:
    """The interpreter the console script runs under (its shebang)."""
    try:
        first = coremerge.read_text(errors="replace").splitlines()[0]
        if first.startswith("#!") and Path(first[2:].strip()).exists():
            return first[2:].strip()
    except (OSError, IndexError):
        pass
    return sys.executable


# ---------------------------------------------------------------------------- steps


def contention(m: Measured) -> float:
    """Share of the machine's CPU time that other processes used while ``m`` ran."""
    return (m.other_cpu_s or 0.0) / (m.wall_s * NPROC)


def best_of(repeat: int, fn, *, max_contention: float, extra_attempts: int):
    """Run ``fn`` until ``repeat`` runs saw little contention (or attempts run out).

    Returns the fastest uncontended result (the fastest of all if none was), every attempt's
    wall time and contention, and whether the kept run was contended.
    """
    results, clean = [], []
    for _ in range(max(1, repeat) + max(0, extra_attempts)):
        result = fn()
        results.append(result)
        if contention(result[0]) <= max_contention:
            clean.append(result)
        elif len(results) < max(1, repeat) + extra_attempts:
            log(f"  contended run ({100 * contention(result[0]):.0f}% CPU elsewhere); again")
        if len(clean) >= max(1, repeat):
            break
    best = min(clean or results, key=lambda r: r[0].wall_s)
    attempts = [
        {"wall_s": round(r[0].wall_s, 3), "other_cpu_share": round(contention(r[0]), 3)}
        for r in results
    ]
    return best, attempts, not clean


QUIET_LOG: list[dict[str, Any]] = []


def settle(step: str, max_wait: float) -> None:
    """Before a timed step: flush the previous step's dirty pages (so their write-back does not
    overlap this one), then wait for the CPUs to be quiet (a shared machine)."""
    if hasattr(os, "sync"):
        os.sync()
    waited, busy = wait_for_quiet(max_wait)
    QUIET_LOG.append({"step": step, "waited_s": round(waited, 1), "busy_before": busy})
    if busy is not None and busy > 0.15:
        log(
            f"  {step}: CPUs still {100 * busy:.0f}% busy after waiting {waited:.0f} s; timing anyway"
        )


def warm_page_cache(dirs: list[Path]) -> None:
    for d in dirs:
        with open(d / "adapter_model.safetensors", "rb") as f:
            while f.read(16 << 20):
                pass


def startup_probe(python: str, code: str) -> Measured:
    return run_measured([python, "-c", code], cwd=ROOT, timeout=600).check("start-up probe")


def run_cli_merge(
    args: argparse.Namespace, dirs: list[Path], out: Path, method: str, space: str
) -> tuple[Measured, dict[str, Any]]:
    settle(f"{space} {method}", args.quiet_wait)
    argv = [str(args.coremerge), "merge", *map(str, dirs), "-o", str(fresh(out))]
    argv += ["--method", method, "--space", space, "--device", args.device, "--quiet"]
    m = run_measured(argv, cwd=ROOT, timeout=args.timeout).check(f"coremerge {method} {space}")
    report_path = out / "merge_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return m, report


def run_floor(args: argparse.Namespace, dirs: list[Path], out: Path) -> tuple[Measured, dict]:
    settle("floor", args.quiet_wait)
    argv = [
        cli_python(args.coremerge),
        str(BENCH / "_floor.py"),
        "-o",
        str(fresh(out)),
        *map(str, dirs),
    ]
    m = run_measured(argv, cwd=ROOT, timeout=args.timeout).check("floor")
    return m, json.loads(m.stdout.strip().splitlines()[-1])


def run_reference(
    args: argparse.Namespace, dirs: list[Path], work: Path
) -> tuple[Measured, dict] | None:
    repo = args.reference_repo
    if not (repo / "HEAD").exists():
        log(
            f"reference skipped: no git directory at {repo} (fetch apanariello4/core-space-merging)"
        )
        return None
    settle("reference", args.quiet_wait)
    methods = ",".join(REFERENCE_NAMES[m] for m in args.methods.split(",") if m in REFERENCE_NAMES)
    json_path, deltas = work / "reference.json", work / "reference-deltas.safetensors"
    argv = [cli_python(args.coremerge), str(BENCH / "_reference.py"), "--repo", str(repo)]
    argv += ["--layers", str(args.ref_layers), "--methods", methods, "--json", str(json_path)]
    argv += ["--dump-deltas", str(deltas), *map(str, dirs)]
    m = run_measured(argv, cwd=ROOT, timeout=args.timeout).check("reference")
    data = json.loads(json_path.read_text())
    data["deltas_path"] = str(deltas)
    return m, data


def ensure_inputs(python: str, workload: Workload, root: Path) -> Path:
    """Generate (or find) an input set in a child process: this process stays free of torch."""
    cmd = [python, str(BENCH / "_inputs.py"), "--root", str(root)]
    cmd += ["--workload", json.dumps(asdict(workload))]
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


def cross_check(out: Path, reference: dict | None, method: str) -> float | None:
    """Relative Frobenius distance between coremerge's ΔW and the reference's, one module.

    numpy, not torch, keeps this process small (see ``ensure_inputs``); float32 outputs only.
    """
    name = REFERENCE_NAMES.get(method)
    if reference is None or name is None or not reference.get("dump_module"):
        return None
    import numpy as np
    from safetensors import safe_open

    module = reference["dump_module"]
    with safe_open(reference["deltas_path"], framework="np") as f:
        if name not in f.keys():  # noqa: SIM118
            return None
        expected = f.get_tensor(name).astype(np.float64)
    with safe_open(out / "adapter_model.safetensors", framework="np") as f:
        A = f.get_tensor(f"base_model.model.{module}.lora_A.weight").astype(np.float64)
        B = f.get_tensor(f"base_model.model.{module}.lora_B.weight").astype(np.float64)
    return float(np.linalg.norm(B @ A - expected) / np.linalg.norm(expected))


# ---------------------------------------------------------------------------- report


def row(
    name: str,
    m: Measured | None,
    *,
    wall: float,
    floor_wall: float | None,
    startup: Measured | None,
    inputs: int | None,
    **extra: Any,
) -> dict[str, Any]:
    r: dict[str, Any] = {"name": name, "wall_s": round(wall, 3)}
    r["ratio_to_floor"] = round(wall / floor_wall, 2) if floor_wall else None
    if m is not None:
        r["peak_rss_mib"] = round(m.peak_rss / MiB, 1)
        r["peak_anon_mib"] = round(m.peak_anon / MiB, 1)
        r["peak_file_mib"] = round(m.peak_file / MiB, 1)
        r["rss_samples"] = m.samples
        r["ru_maxrss_mib"] = round(m.ru_maxrss / MiB, 1)
        r["child_cpu_s"] = round(m.child_cpu_s, 2)
        if m.other_cpu_s is not None:
            r["other_cpu_s"] = round(m.other_cpu_s, 2)
            # share of the machine's CPU time taken by other processes while this step ran
            r["other_cpu_share"] = round(m.other_cpu_s / (m.wall_s * NPROC), 3)
    if m is not None and startup is not None:
        r["startup_rss_mib"] = round(startup.peak_rss / MiB, 1)
        r["peak_minus_startup_mib"] = round((m.peak_rss - startup.peak_rss) / MiB, 1)
    r["inputs_gib"] = round(inputs / GiB, 3) if inputs else None
    r.update(extra)
    return r


def print_table(rows: list[dict[str, Any]]) -> None:
    def fmt(v: Any, spec: str) -> str:
        width = int(spec.split(".")[0])
        return "—".rjust(width) if v is None else format(v, spec)

    names = [r["name"] + (" *" if r.get("contended") else "") for r in rows]
    width = max(map(len, names))
    head = (
        f"{'name':<{width}} {'wall s':>9} {'× floor':>8} {'peak RSS MiB':>13} "
        f"{'peak − start-up MiB':>20} {'inputs GiB':>11} {'CPU busy elsewhere':>19}"
    )
    print(head)
    print("-" * len(head))
    for name, r in zip(names, rows, strict=True):
        share = r.get("other_cpu_share")
        print(
            f"{name:<{width}} {fmt(r['wall_s'], '9.2f')} {fmt(r['ratio_to_floor'], '8.2f')} "
            f"{fmt(r.get('peak_rss_mib'), '13.0f')} {fmt(r.get('peak_minus_startup_mib'), '20.0f')} "
            f"{fmt(r['inputs_gib'], '11.2f')} {fmt(None if share is None else 100 * share, '18.0f')}"
            + ("" if share is None else "%")
        )
    print(
        "CPU busy elsewhere: share of all CPUs' time used by other processes during the step "
        "(a shared machine); well above a few % means the wall time is inflated."
    )
    if any(r.get("contended") for r in rows):
        print("* no run of this step was free of contention: its figures are unreliable.")


def _mean(xs: list[float] | None) -> float | None:
    return sum(xs) / len(xs) if xs else None


def evaluate_targets(
    args: argparse.Namespace, rows: dict[str, dict], inputs: int, reference: dict | None
) -> list[dict[str, Any]]:
    targets = []
    for method in args.methods.split(","):
        r = rows[f"core {method}"]
        targets.append(
            {
                "target": f"core {method} within {FLOOR_FACTOR:g}× of the floor",
                "value": r["ratio_to_floor"],
                "limit": FLOOR_FACTOR,
                "passed": r["ratio_to_floor"] <= FLOOR_FACTOR,
            }
        )
        limit = RSS_FRACTION * inputs / MiB
        targets.append(
            {
                "target": f"core {method} peak RSS − start-up < {RSS_FRACTION:g} × inputs",
                "value": r["peak_minus_startup_mib"],
                "limit": round(limit, 1),
                "unit": "MiB",
                "passed": r["peak_minus_startup_mib"] < limit,
            }
        )
        name = REFERENCE_NAMES.get(method)
        if name is None:
            continue
        if reference is None or name not in reference["methods"]:
            targets.append(
                {
                    "target": f"core {method} ≥ {REFERENCE_SPEEDUP:g}× faster than the reference",
                    "passed": None,
                    "note": "reference not run",
                }
            )
            continue
        measured = reference["methods"][name]
        core_s = measured["mean_layer_s"]
        dense_s = _mean(measured.get("dense_delta_w_per_layer_s")) or 0.0
        # The reference's core-space merge() goes per module from the factors to its output,
        # the dense ΔW = U M Vh: that whole path is the peer (the issue's 2.3 s/layer matches
        # it, not the core matrices alone); the compute-only ratio is printed beside it.
        ref_total = (core_s + dense_s) * args.layers
        speedup = ref_total / r["wall_s"]
        targets.append(
            {
                "target": f"core {method} ≥ {REFERENCE_SPEEDUP:g}× faster than the reference",
                "value": round(speedup, 2),
                "limit": REFERENCE_SPEEDUP,
                "passed": speedup >= REFERENCE_SPEEDUP,
                "note": (
                    f"reference {name}: {core_s:.2f} s/layer to the merged core matrix + "
                    f"{dense_s:.2f} s/layer to its output ΔW, × {args.layers} layers = "
                    f"{ref_total:.1f} s (in-process, no I/O) vs coremerge {r['wall_s']:.1f} s wall "
                    f"(whole process, with I/O); to the core matrix only: "
                    f"{core_s * args.layers / r['wall_s']:.1f}×; at the issue's "
                    f"{ISSUE_REFERENCE_S_PER_LAYER} s/layer: "
                    f"{ISSUE_REFERENCE_S_PER_LAYER * args.layers / r['wall_s']:.1f}×"
                ),
            }
        )
    return targets


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.methods = ",".join(m.strip() for m in args.methods.split(",") if m.strip())
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out_root = args.out_dir.resolve()
    work = out_root / "runs" / stamp
    work.mkdir(parents=True)

    workload = Workload(
        layers=args.layers,
        adapters=args.adapters,
        rank=args.rank,
        dtype=args.input_dtype,
        seed=args.seed,
    )
    machine = machine_info()
    log(
        f"machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['ram_total_gib']} GiB"
    )

    # Disk: the inputs (unless cached) plus one merged adapter (as large as all inputs).
    size = sum(n + m for _, n, m in module_shapes(workload)) * workload.rank * workload.adapters * 4
    need = size * (1 if (out_root / "inputs" / workload.key).exists() else 2)
    free = shutil.disk_usage(out_root).free
    log(f"disk: {free / GiB:.1f} GiB free at {out_root}, about {need / GiB:.1f} GiB needed")
    if free < need * 1.2:
        raise SystemExit(f"engine bench: not enough disk at {out_root}")

    wait_for_cli(args.coremerge, args.wait_cli)

    python = cli_python(args.coremerge)
    log(f"inputs: {workload.key}")
    root = ensure_inputs(python, workload, out_root / "inputs")
    dirs = adapter_dirs(root)
    inputs = input_bytes(root)
    sample_dirs, sample_inputs = None, None
    if args.full_layers > 0:
        sample_root = ensure_inputs(
            python, workload.with_layers(args.full_layers), out_root / "inputs"
        )
        sample_dirs, sample_inputs = adapter_dirs(sample_root), input_bytes(sample_root)
    warm_page_cache(dirs + (sample_dirs or []))
    cuda_init = (
        "import torch; torch.zeros(1, device='cuda'); " if args.device.startswith("cuda") else ""
    )
    log("start-up probes")
    startup_cli = startup_probe(
        python,
        "from worker.cli import build_parser; build_parser(); import worker.runner; " + cuda_init,
    )
    startup_floor = startup_probe(python, "import torch, safetensors.torch")

    record: dict[str, Any] = {
        "benchmark": "engine",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "project": project_state(),
        "config": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "workload": asdict(workload),
            "inputs_dir": str(root),
            "page_cache": "warm (inputs read once before timing)",
        },
        "inputs_bytes": inputs,
        "startup": {
            "cli": startup_cli.as_json() | {"rss_mib": round(startup_cli.peak_rss / MiB, 1)},
            "floor": startup_floor.as_json() | {"rss_mib": round(startup_floor.peak_rss / MiB, 1)},
        },
    }
    rows: dict[str, dict[str, Any]] = {}

    retry = {"max_contention": args.max_contention, "extra_attempts": args.extra_attempts}
    log("floor")
    (floor_m, floor_info), floor_walls, floor_contended = best_of(
        args.repeat, lambda: run_floor(args, dirs, work / "floor.safetensors"), **retry
    )
    floor_wall = floor_m.wall_s
    rows["floor"] = row(
        "floor (read all + write rank-Σr output)",
        floor_m,
        wall=floor_wall,
        floor_wall=floor_wall,
        startup=startup_floor,
        inputs=inputs,
        attempts=floor_walls,
        contended=floor_contended,
        written_bytes=floor_info["written_bytes"],
        read_bytes=floor_info["read_bytes"],
    )

    reference = None
    if args.ref_layers > 0:
        log(f"reference ({args.ref_layers} layer(s))")
        runs: list[tuple[Measured, dict]] = []
        for _ in range(max(1, args.repeat) + max(0, args.extra_attempts)):
            got = run_reference(args, dirs, work)
            if got is None:
                break
            runs.append(got)
            if sum(contention(m) <= args.max_contention for m, _ in runs) >= max(1, args.repeat):
                break
            if contention(got[0]) > args.max_contention:
                log(f"  contended run ({100 * contention(got[0]):.0f}% CPU elsewhere); again")
        if runs:
            clean = [r for r in runs if contention(r[0]) <= args.max_contention] or runs
            # per method, the fastest clean run (each run dumps the same deltas)
            reference = runs[-1][1]
            for name in reference["methods"]:
                reference["methods"][name] = min(
                    (r[1]["methods"][name] for r in clean), key=lambda x: x["mean_layer_s"]
                )
            reference["other_cpu_share"] = round(min(contention(m) for m, _ in clean), 3)
            reference["contended"] = all(contention(m) > args.max_contention for m, _ in runs)
            record["reference"] = reference | {"processes": [r[0].as_json() for r in runs]}

    cross: dict[str, float | None] = {}
    for method in args.methods.split(","):
        log(f"core {method}")
        out = work / f"core-{method}"
        (m, report), walls, contended = best_of(
            args.repeat,
            lambda method=method, out=out: run_cli_merge(args, dirs, out, method, "core"),
            **retry,
        )
        cross[method] = cross_check(out, reference, method)
        out_bytes = (out / "adapter_model.safetensors").stat().st_size
        rows[f"core {method}"] = row(
            f"core {method}",
            m,
            wall=m.wall_s,
            floor_wall=floor_wall,
            startup=startup_cli,
            inputs=inputs,
            attempts=walls,
            contended=contended,
            timings=report.get("timings"),
            output_bytes=out_bytes,
            output_rank=report.get("output", {}).get("rank"),
            device=report.get("device"),
            self_check=report.get("self_check", {}).get("max_projection_residual"),
        )
        if report.get("timings"):
            log("  timings: " + _timings(report["timings"]))
        if not args.keep_outputs:
            fresh(out)

    if sample_dirs is not None:
        log(f"full ta ({args.full_layers} layer(s))")
        out = work / "full-ta"
        (m, report), walls, contended = best_of(
            1,
            lambda: run_cli_merge(args, sample_dirs, out, "ta", "full"),
            max_contention=args.max_contention,
            extra_attempts=0,  # minutes per attempt
        )
        in_process = report.get("timings", {}).get("total_s", m.wall_s)
        scale = args.layers / args.full_layers
        # start-up is paid once; the in-process time grows with the layers
        scaled = (m.wall_s - in_process) + in_process * scale
        rows["full ta"] = row(
            f"full ta ({args.full_layers} layer → {args.layers}, scaled ×{scale:g})",
            m,
            wall=scaled,
            floor_wall=floor_wall,
            startup=startup_cli,
            inputs=sample_inputs,
            measured_wall_s=round(m.wall_s, 3),
            contended=contended,
            in_process_s=in_process,
            sample_layers=args.full_layers,
            timings=report.get("timings"),
            note="wall = start-up + in-process time × layers/sample; RSS and inputs as measured on the sample",
        )
        if report.get("timings"):
            log("  timings: " + _timings(report["timings"]))
        if not args.keep_outputs:
            fresh(out)

    if reference is not None:
        for method, name in REFERENCE_NAMES.items():
            if name not in reference["methods"]:
                continue
            per_layer = reference["methods"][name]["mean_layer_s"]
            rows[f"reference {name}"] = row(
                f"reference {name} ({args.ref_layers} layer → {args.layers}, ×{args.layers / args.ref_layers:g})",
                None,
                wall=per_layer * args.layers,
                floor_wall=floor_wall,
                startup=None,
                inputs=None,
                per_layer_s=per_layer,
                dense_delta_w_per_layer_s=_mean(
                    reference["methods"][name].get("dense_delta_w_per_layer_s")
                ),
                other_cpu_share=reference.get("other_cpu_share"),
                contended=reference.get("contended"),
                note="to the merged core matrix only (in-process, float64, no I/O, no start-up)",
                compares_with=f"core {method}",
            )
            dense = _mean(reference["methods"][name].get("dense_delta_w_per_layer_s"))
            if dense is not None:
                rows[f"reference {name} to ΔW"] = row(
                    f"reference {name} to its output ΔW (×{args.layers / args.ref_layers:g})",
                    None,
                    wall=(per_layer + dense) * args.layers,
                    floor_wall=floor_wall,
                    startup=None,
                    inputs=None,
                    per_layer_s=per_layer + dense,
                    other_cpu_share=reference.get("other_cpu_share"),
                    contended=reference.get("contended"),
                    note="its merge() per module: core matrices, merge, ΔW = U M Vh (in-process, float64, no I/O)",
                    compares_with=f"core {method}",
                )
    if not args.keep_outputs:
        fresh(work / "floor.safetensors")

    targets = evaluate_targets(args, rows, inputs, reference)
    if project_state() != record["project"]:
        record["project_at_end"] = project_state()
        log("warning: the project's code changed while the benchmark ran (see project_at_end)")
    record.update(
        {
            "rows": list(rows.values()),
            "targets": targets,
            "quiet_wait": QUIET_LOG,
            "cross_check_rel_error": {k: v for k, v in cross.items() if v is not None},
        }
    )

    print()
    print(
        f"engine benchmark: {workload.adapters} adapters × rank {workload.rank}, {workload.layers} "
        f"layers of Llama-3-8B shapes, inputs {inputs / GiB:.2f} GiB {workload.dtype}, "
        f"device {args.device}; {machine['nproc']} CPUs ({machine['cpu_model']}), "
        f"{machine['ram_total_gib']} GiB RAM, torch {machine['torch']}"
    )
    print(
        f"start-up: CLI {startup_cli.wall_s:.2f} s / {startup_cli.peak_rss / MiB:.0f} MiB RSS, "
        f"floor {startup_floor.wall_s:.2f} s / {startup_floor.peak_rss / MiB:.0f} MiB RSS"
    )
    print()
    print_table(list(rows.values()))
    print()
    for r in rows.values():
        if r.get("timings"):
            print(f"{r['name']}: " + _timings(r["timings"]))
    for method, err in cross.items():
        if err is not None:
            print(
                f"cross-check core {method} vs reference ({reference['dump_module']}): rel. error {err:.1e}"
            )
    print()
    for t in targets:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[t["passed"]]
        value = (
            ""
            if t.get("value") is None
            else f": {t['value']} (limit {t['limit']}{' ' + t['unit'] if t.get('unit') else ''})"
        )
        print(f"[{verdict}] {t['target']}{value}")
        if t.get("note"):
            print(f"       {t['note']}")

    path = out_root / f"engine-{stamp}.json"
    write_json(path, record)
    print(f"\nwrote {path}")
    if not args.no_results:
        write_json(args.results, record)
        print(f"wrote {args.results}")
    if not args.keep_outputs:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(t["passed"] is not False for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
