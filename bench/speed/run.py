"""Speed benchmark (issue 5): every method in core, full and knots space, PEFT's
``add_weighted_adapter`` and the I/O floor, in one run, with ratios; scaling curves in T, rank
and width; where the time goes.

    .venv/bin/python -m bench.speed.run              # the full run (about 10-20 min on 2 cores)
    .venv/bin/python -m bench.speed.run --quick      # a small debug run (a couple of minutes)
    .venv/bin/python -m bench.speed.run --device cuda

Writes ``bench/out/speed-<UTC>.{json,md,png}`` and (not with ``--quick`` or ``--no-results``)
``bench/results/speed-latest.{json,md,png}``. See bench/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `bench` importable
    sys.path.insert(0, str(ROOT))

from bench._common import MiB, machine_info, project_state, run_measured, write_json  # noqa: E402
from bench.speed import report  # noqa: E402
from bench.speed.measure import Attempts, Runner, contention, fresh, log  # noqa: E402
from bench.speed.workloads import (  # noqa: E402
    CurvePoint,
    InputSet,
    curve_points,
    input_set,
    llama_workload,
)

BENCH = ROOT / "bench"
SPEED = BENCH / "speed"
METHODS = ("ta", "ties", "dare", "dare_ties", "tsv", "cart", "iso_c")
#: PEFT combinations: the cheap ones act on the factors, the ``*svd`` ones on dense ΔW
PEFT_CHEAP = ("cat", "linear", "ties")
PEFT_DENSE = ("svd", "ties_svd")
#: the coremerge method each PEFT combination is compared with
PEFT_COUNTERPART = {"cat": "ta", "linear": "ta", "svd": "ta", "ties": "ties", "ties_svd": "ties"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat, no results/")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU memory is then recorded)")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="OMP/MKL threads of every child (0: torch's default, one per core). On a shared "
        "machine use 1: torch's threads spin-wait for busy cores and a 2-thread merge can run "
        "8x slower than a 1-thread one",
    )
    main = ap.add_argument_group("main comparison")
    main.add_argument("--width", type=int, default=1024, help="hidden size (Llama-3 ratios)")
    main.add_argument("--layers", type=int, default=16)
    main.add_argument("--adapters", type=int, default=8)
    main.add_argument("--rank", type=int, default=16)
    main.add_argument(
        "--sample-layers",
        type=int,
        default=1,
        help="layers on which full space and PEFT's dense combinations run (scaled to --layers)",
    )
    main.add_argument("--methods", default=",".join(METHODS))
    main.add_argument("--peft", default=",".join(PEFT_CHEAP + PEFT_DENSE), help="'' to skip")
    main.add_argument("--repeat", type=int, default=3, help="runs per cheap row, fastest kept")
    curves = ap.add_argument_group("scaling curves (one layer)")
    curves.add_argument("--curve-method", default="ties")
    curves.add_argument("--curve-adapters", default="2,4,8,16,32,64")
    curves.add_argument("--curve-ranks", default="4,8,16,32,64")
    curves.add_argument("--curve-widths", default="1024,2048,4096")
    curves.add_argument("--curve-base", default="8,16,1024", help="T,rank,width of the sweeps")
    curves.add_argument("--curve-repeat", type=int, default=2)
    curves.add_argument(
        "--curve-full-max-width", type=int, default=2048, help="full space only up to this width"
    )
    curves.add_argument(
        "--curve-full-max-gib",
        type=float,
        default=2.0,
        help="full space only when T × m × n × 4 bytes of the largest module is below this",
    )
    curves.add_argument("--no-curves", action="store_true")
    ap.add_argument("--quiet-wait", type=float, default=3.0, help="seconds, before each step")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per subprocess, seconds")
    ap.add_argument("--out-dir", type=Path, default=BENCH / "out")
    ap.add_argument("--results-dir", type=Path, default=BENCH / "results")
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.adapters, args.rank = 512, 2, 4, 8
        args.repeat = args.curve_repeat = 1
        args.curve_adapters, args.curve_ranks, args.curve_widths = "2,4,8", "4,8", "512,1024"
        args.curve_base = "4,8,512"
        args.no_results = True
    return args


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def python_of(coremerge: Path) -> str:
    first = coremerge.read_text(errors="replace").splitlines()[0]
    return first[2:].strip() if first.startswith("#!") else sys.executable


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class SpeedBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.coremerge = ROOT / ".venv" / "bin" / "coremerge"
        self.python = python_of(self.coremerge)
        self.stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.work = args.out_dir.resolve() / "runs" / f"speed-{self.stamp}"
        self.work.mkdir(parents=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if args.threads > 0:
            env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        self.runner = Runner(ROOT, args.quiet_wait, args.timeout, env)
        self.startup: dict[str, dict[str, Any]] = {}
        self.record: dict[str, Any] = {}
        self.failures: list[dict[str, str]] = []

    def attempt(self, step: str, argv: list[str], json_path: Path | None = None):
        """One measured child, or None when it failed (recorded; the run goes on without it)."""
        try:
            return self.runner.run(step, argv, json_path)
        except RuntimeError as exc:
            log(f"  {step} FAILED: {str(exc)[-500:]}")
            self.failures.append({"step": step, "error": str(exc)[-2000:]})
            return None

    # ------------------------------------------------------------------ child commands

    def cli(self, inputs: InputSet, method: str, space: str, out: Path) -> list[str]:
        argv = [str(self.coremerge), "merge", *map(str, inputs.dirs), "-o", str(fresh(out))]
        return [
            *argv,
            "--method",
            method,
            "--space",
            space,
            "--device",
            self.args.device,
            "--quiet",
        ]

    def steps(self, inputs: InputSet, method: str, space: str, js: Path, out: Path) -> list[str]:
        argv = [self.python, str(SPEED / "steps.py"), *map(str, inputs.dirs)]
        argv += ["--space", space, "--method", method, "--device", self.args.device]
        argv += ["--json", str(js), "--out-dir", str(fresh(out))]
        return argv + (["--engine-check"] if space == "core" else [])

    def peft(self, inputs: InputSet, combination: str, js: Path, out: Path) -> list[str]:
        w = inputs.workload
        argv = [self.python, str(SPEED / "peft_peer.py"), *map(str, inputs.dirs)]
        argv += ["--combination", combination, "--hidden", str(w.hidden), "--kv", str(w.kv)]
        argv += ["--mlp", str(w.mlp), "--layers", str(w.layers), "--device", self.args.device]
        return [*argv, "--json", str(js), "-o", str(fresh(out))]

    def floor(self, inputs: InputSet, out: Path) -> list[str]:
        return [
            self.python,
            str(BENCH / "_floor.py"),
            "-o",
            str(fresh(out)),
            *map(str, inputs.dirs),
        ]

    # ------------------------------------------------------------------ pieces

    def probe(self, name: str, code: str) -> None:
        if self.args.device.startswith("cuda"):
            code += "; import torch; torch.zeros(1, device='cuda')"
        m = run_measured([self.python, "-c", code], cwd=ROOT, env=self.runner.env, timeout=600)
        m.check(f"start-up probe {name}")
        self.startup[name] = {"wall_s": round(m.wall_s, 3), "rss_mib": round(m.peak_rss / MiB, 1)}

    def inputs(self, *, width: int, layers: int, adapters: int, rank: int) -> InputSet:
        w = llama_workload(width=width, layers=layers, adapters=adapters, rank=rank)
        s = input_set(self.python, BENCH, w, self.args.out_dir.resolve() / "inputs")
        for d in s.dirs:  # warm page cache: every row reads from memory
            with open(d / "adapter_model.safetensors", "rb") as f:
                while f.read(16 << 20):
                    pass
        return s

    def cli_report(self, out: Path) -> dict[str, Any]:
        import json

        path = out / "merge_report.json"
        return json.loads(path.read_text()) if path.exists() else {}

    # ------------------------------------------------------------------ main comparison

    def main_comparison(self, main: InputSet, sample: InputSet) -> list[dict[str, Any]]:
        a, work = self.args, self.work
        methods, peers = names(a.methods), names(a.peft)
        scale = main.workload.layers / sample.workload.layers
        cheap: dict[str, tuple[str, Any]] = {"floor": ("floor", None)}
        cheap |= {f"core {m}": ("core", m) for m in methods}
        cheap |= {f"knots {m}": ("knots", m) for m in methods}
        cheap |= {f"peft {c}": ("peft", c) for c in peers if c not in PEFT_DENSE}
        attempts = {name: Attempts() for name in cheap}
        # Round-robin over the rows, so that a burst of load elsewhere hits all rows alike.
        for rep in range(max(1, a.repeat)):
            log(f"main comparison, round {rep + 1}/{a.repeat}")
            for name, (kind, what) in cheap.items():
                out, js = work / name.replace(" ", "-"), work / f"{name.replace(' ', '-')}.json"
                if kind == "floor":
                    argv = self.floor(main, work / "floor.safetensors")
                elif kind == "peft":
                    argv = self.peft(main, what, js, out)
                else:
                    argv = self.cli(main, what, kind, out)
                got = self.attempt(name, argv, js if kind == "peft" else None)
                if got is not None:
                    attempts[name].add(
                        got[0], self.cli_report(out) if kind in ("core", "knots") else got[1]
                    )
                fresh(out)
        rows = {}
        for name, (kind, what) in cheap.items():
            if not attempts[name].runs:
                continue
            m, info = attempts[name].best
            rows[name] = self.row(name, kind, what, m, info, attempts[name], main)
        # Full space and PEFT's dense combinations: once each, on the sample, scaled.
        for name, kind, what in [("full " + m, "full", m) for m in methods] + [
            ("peft " + c, "peft", c) for c in peers if c in PEFT_DENSE
        ]:
            log(f"{name} ({sample.workload.layers} layer(s), scaled ×{scale:g})")
            out, js = work / name.replace(" ", "-"), work / f"{name.replace(' ', '-')}.json"
            if kind == "peft":
                got = self.attempt(name, self.peft(sample, what, js, out), js)
            else:
                got = self.attempt(name, self.cli(sample, what, "full", out))
                got = got and (got[0], self.cli_report(out))
            fresh(out)
            if got is None:
                continue
            m, info = got
            att = Attempts()
            att.add(m, info)
            rows[name] = self.row(name, kind, what, m, info, att, sample, scale=scale)
        return self.ratios(list(rows.values()))

    def row(
        self,
        name: str,
        kind: str,
        what: str | None,
        m,
        info: dict[str, Any],
        att: Attempts,
        inputs: InputSet,
        scale: float = 1.0,
    ) -> dict[str, Any]:
        if kind == "floor":
            work_s, startup = info.get("seconds"), self.startup.get("floor")
            rank = None
        elif kind == "peft":
            work_s = sum(info[k] for k in ("build_base_s", "load_adapters_s", "merge_s", "save_s"))
            startup, rank = self.startup.get("peft"), info.get("rank")
        else:
            work_s = info.get("timings", {}).get("total_s")
            startup, rank = self.startup.get("cli"), info.get("output", {}).get("rank")
        wall = m.wall_s if work_s is None else (m.wall_s - work_s) + work_s * scale
        r: dict[str, Any] = {
            "name": name,
            "kind": kind,
            "method": what,
            "wall_s": round(wall, 3),
            "work_s": None if work_s is None else round(work_s * scale, 3),
            "measured_wall_s": round(m.wall_s, 3),
            "scaled": scale != 1.0,
            "scale": scale,
            "layers_measured": inputs.workload.layers,
            "peak_rss_mib": round(m.peak_rss / MiB, 1),
            "peak_minus_startup_mib": (
                round(m.peak_rss / MiB - startup["rss_mib"], 1) if startup else None
            ),
            "child_cpu_s": round(m.child_cpu_s, 2),
            "other_cpu_share": round(contention(m), 3),
            "attempts": att.summary(),
            "output_rank": rank,
        }
        if kind == "peft":
            r["phases_s"] = {
                k: round(info[k], 4)
                for k in ("import_s", "build_base_s", "load_adapters_s", "merge_s", "save_s")
            }
            r["gpu_max_memory_mib"] = _mib(info.get("cuda_max_memory_allocated"))
        elif kind in ("core", "full", "knots"):
            r["timings"] = info.get("timings")
            r["self_check"] = info.get("self_check", {}).get("max_projection_residual")
        return r

    @staticmethod
    def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        by_name = {r["name"]: r for r in rows}
        floor = by_name.get("floor", {}).get("wall_s")
        for r in rows:
            r["x_floor"] = round(r["wall_s"] / floor, 2) if floor else None
            twin = None
            if r["kind"] in ("full", "knots"):
                twin = by_name.get(f"core {r['method']}")
            elif r["kind"] == "peft":
                twin = by_name.get(f"core {PEFT_COUNTERPART.get(r['method'], '')}")
            r["compared_with"] = twin["name"] if twin else None
            r["x_core"] = round(r["wall_s"] / twin["wall_s"], 2) if twin else None
            if twin and r.get("work_s") and twin.get("work_s"):
                r["x_core_work"] = round(r["work_s"] / twin["work_s"], 2)
        return rows

    # ------------------------------------------------------------------ breakdown

    def breakdown(self, inputs: InputSet, space: str, method: str, repeat: int) -> dict | None:
        tag = f"steps-{space}-{method}-{inputs.workload.key}"
        js, out = self.work / f"{tag}.json", self.work / tag
        att = Attempts()
        step = f"steps {space} {method}"
        for _ in range(max(1, repeat)):
            argv = self.steps(inputs, method, space, js, out)
            got = self.attempt(step, argv, js)
            if got is not None:
                att.add(*got)
            fresh(out)
        if not att.runs:
            return None
        m, info = att.best
        startup = self.startup["steps"]["rss_mib"]
        return {
            "space": space,
            "method": method,
            "wall_s": round(m.wall_s, 3),
            "peak_rss_mib": round(m.peak_rss / MiB, 1),
            "peak_minus_startup_mib": round(m.peak_rss / MiB - startup, 1),
            "other_cpu_share": round(contention(m), 3),
            "attempts": att.summary(),
            "steps_s": {k: round(v, 4) for k, v in info["steps_s"].items()},
            "import_s": round(info["import_s"], 3),
            "compute_s": round(info["compute_s"], 4),
            "in_process_s": round(info["in_process_s"], 3),
            "engine_merge_module_s": info.get("engine_merge_module_s"),
            "output_rank_max": info.get("output_rank_max"),
            "modules": info["modules"],
            "threads": info.get("threads"),
            "layers": inputs.workload.layers,
            "gpu_max_memory_mib": _mib(info.get("cuda_max_memory_allocated")),
        }

    # ------------------------------------------------------------------ curves

    def curves(self) -> dict[str, Any]:
        a = self.args
        t, r, w = ints(a.curve_base)
        sweeps = curve_points(
            ints(a.curve_adapters), ints(a.curve_ranks), ints(a.curve_widths), CurvePoint(t, r, w)
        )
        unique: dict[str, CurvePoint] = {}
        for pts in sweeps.values():
            for p in pts:
                unique.setdefault(p.key, p)
        points: dict[str, Any] = {}
        for i, (key, p) in enumerate(unique.items()):
            log(f"curve point {i + 1}/{len(unique)}: {key}")
            s = self.inputs(width=p.width, layers=1, adapters=p.adapters, rank=p.rank)
            entry: dict[str, Any] = {"adapters": p.adapters, "rank": p.rank, "width": p.width}
            entry["inputs_bytes"] = s.bytes
            entry["core_steps"] = self.breakdown(s, "core", a.curve_method, a.curve_repeat)
            att = Attempts()
            out = self.work / f"curve-cli-{key}"
            for _ in range(max(1, a.curve_repeat)):
                argv = self.cli(s, a.curve_method, "core", out)
                got = self.attempt(f"cli core {key}", argv)
                if got is not None:
                    att.add(got[0], self.cli_report(out))
                fresh(out)
            if entry["core_steps"] is None or not att.runs:
                continue
            m, rep = att.best
            entry["core_cli"] = {
                "wall_s": round(m.wall_s, 3),
                "peak_rss_mib": round(m.peak_rss / MiB, 1),
                "peak_minus_startup_mib": round(
                    m.peak_rss / MiB - self.startup["cli"]["rss_mib"], 1
                ),
                "timings": rep.get("timings"),
                "other_cpu_share": round(contention(m), 3),
                "attempts": att.summary(),
            }
            dense = s.largest_dense_stack_bytes / (1 << 30)
            if p.width <= a.curve_full_max_width and dense <= a.curve_full_max_gib:
                entry["full_steps"] = self.breakdown(s, "full", a.curve_method, 1)
                if entry["full_steps"] is None:
                    del entry["full_steps"]
                    entry["full_skipped"] = "failed (see failures)"
            else:
                entry["full_skipped"] = (
                    f"width {p.width} > {a.curve_full_max_width}"
                    if p.width > a.curve_full_max_width
                    else f"dense ΔW stack {dense:.1f} GiB > {a.curve_full_max_gib:g} GiB"
                )
            points[key] = entry
            self.record["curves"] = {"sweeps": {k: [p.key for p in v] for k, v in sweeps.items()}}
            self.record["curves"]["points"] = points
            self.checkpoint()
        return self.record["curves"]

    # ------------------------------------------------------------------ run

    def checkpoint(self) -> None:
        write_json(self.args.out_dir.resolve() / f"speed-{self.stamp}.json", self.record)

    def run(self) -> dict[str, Any]:
        a = self.args
        t_start = time.monotonic()
        machine = machine_info()
        log(
            f"machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['ram_total_gib']} GiB"
        )
        main = self.inputs(width=a.width, layers=a.layers, adapters=a.adapters, rank=a.rank)
        sample = self.inputs(
            width=a.width, layers=a.sample_layers, adapters=a.adapters, rank=a.rank
        )
        log("start-up probes")
        self.probe(
            "cli", "from worker.cli import build_parser; build_parser(); import worker.runner"
        )
        self.probe("floor", "import torch, safetensors.torch")
        self.probe(
            "steps", "import torch, safetensors.torch, worker.engine, worker.adapters.reader"
        )
        if names(a.peft):
            self.probe("peft", "import torch, peft, transformers; from peft import PeftModel")
        self.record = {
            "benchmark": "speed",
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine
            | {
                "load_average_start": load_average(),
                "child_threads": a.threads or "torch default",
            },
            "project": project_state(),
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
            "main_inputs": main.describe(),
            "sample_inputs": sample.describe(),
            "startup": self.startup,
        }
        self.record["main"] = self.main_comparison(main, sample)
        self.checkpoint()
        log("breakdown: core on the main inputs, full on the sample")
        done = [self.breakdown(main, "core", m, 1) for m in names(a.methods)]
        done += [self.breakdown(sample, "full", m, 1) for m in names(a.methods)]
        self.record["breakdown"] = [b for b in done if b is not None]
        self.checkpoint()
        if not a.no_curves:
            self.curves()
        self.record["machine"]["load_average_end"] = load_average()
        self.record["quiet_wait"] = self.runner.quiet_log
        self.record["failures"] = self.failures
        shares = [r["other_cpu_share"] for r in self.record["main"]]
        self.record["contention"] = {
            "main_rows_other_cpu_share_max": max(shares),
            "main_rows_other_cpu_share_mean": round(sum(shares) / len(shares), 3),
        }
        self.record["run_wall_s"] = round(time.monotonic() - t_start, 1)
        if project_state() != self.record["project"]:
            self.record["project_at_end"] = project_state()
            log("warning: the project's code changed during the run (see project_at_end)")
        self.checkpoint()
        return self.record


def _mib(x: int | None) -> float | None:
    return None if x is None else round(x / MiB, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = SpeedBench(args)
    record = bench.run()
    out = args.out_dir.resolve()
    md = report.markdown(record)
    targets = [out / f"speed-{bench.stamp}"]
    if not args.no_results:
        targets.append(args.results_dir / "speed-latest")
    for base in targets:
        write_json(base.with_suffix(".json"), record)
        base.with_suffix(".md").write_text(md)
        report.plot(record, base.with_suffix(".png"))
        log(f"wrote {base}.{{json,md,png}}")
    print(md)
    shutil.rmtree(bench.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
