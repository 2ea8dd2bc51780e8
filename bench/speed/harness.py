"""What every profile shares: the child commands, start-up probes, input sets and the record.

Every timed step is a fresh subprocess started from the repository root (this process never
imports torch or the product):

- ``coremerge merge …`` (the CLI, as a user runs it; its ``merge_report.json`` is read back);
- ``floor.py``: read every input, write an output of the core merge's size (the I/O floor);
- ``steps.py``: the engine's public functions one step at a time (where the time goes);
- the peers: ``peft_peer.py`` (PEFT's ``add_weighted_adapter``) and ``reference_peer.py``
  (the paper's own code, extracted at run time from a local git mirror).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.speed.machine import ROOT, load_average, machine_info, project_state, write_json
from bench.speed.measure import Measured, MiB, Runner, fresh, log, run_measured
from bench.speed.workloads import InputSet, Workload, input_set

BENCH = ROOT / "bench"
SPEED = BENCH / "speed"
#: where the paper's code is read from (github.com/apanariello4/core-space-merging)
DEFAULT_REFERENCE = Path("/work/.mirror/apanariello4+core-space-merging/repo")
#: what the CLI start-up probe imports (the console script's own imports, so torch)
CLI_IMPORTS = "from worker.cli import build_parser; build_parser(); import worker.runner"


def cli_python(coremerge: Path) -> str:
    """The interpreter the console script runs under (its shebang)."""
    try:
        first = coremerge.read_text(errors="replace").splitlines()[0]
        if first.startswith("#!") and Path(first[2:].strip()).exists():
            return first[2:].strip()
    except (OSError, IndexError):
        pass
    return sys.executable


def mib(x: int | None) -> float | None:
    return None if x is None else round(x / MiB, 1)


class Harness:
    """One benchmark run: its measured children, start-up probes, inputs and JSON record."""

    benchmark = "bench"

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.coremerge = args.coremerge
        self.python = cli_python(self.coremerge)
        self.stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.out = args.out_dir.resolve()
        self.work = self.out / "runs" / f"{self.benchmark}-{self.stamp}"
        self.work.mkdir(parents=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if args.threads > 0:
            env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        self.runner = Runner(
            ROOT,
            args.quiet_wait,
            args.timeout,
            env,
            max_contention=args.max_contention,
            extra_attempts=args.extra_attempts,
        )
        self.startup: dict[str, dict[str, Any]] = {}
        self.record: dict[str, Any] = {}
        self.failures: list[dict[str, str]] = []
        self.t_start = time.monotonic()

    def attempt(self, step: str, argv: list[str], json_path: Path | None = None):
        """One measured child, or None when it failed (recorded; the run goes on without it)."""
        try:
            return self.runner.run(step, argv, json_path)
        except RuntimeError as exc:
            log(f"  {step} FAILED: {str(exc)[-500:]}")
            self.failures.append({"step": step, "error": str(exc)[-2000:]})
            return None

    # ------------------------------------------------------------------ child commands

    def cli(self, dirs: list[Path], method: str, space: str, out: Path) -> list[str]:
        argv = [str(self.coremerge), "merge", *map(str, dirs), "-o", str(fresh(out))]
        argv += ["--method", method, "--space", space, "--device", self.args.device]
        return [*argv, "--quiet"]

    def floor(self, dirs: list[Path], out: Path) -> list[str]:
        return [self.python, str(SPEED / "floor.py"), "-o", str(fresh(out)), *map(str, dirs)]

    def gemm_floor(self, dirs: list[Path]) -> list[str]:
        return [self.python, str(SPEED / "floor.py"), "--gemm", *map(str, dirs)]

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

    def reference(
        self, dirs: list[Path], layers: int, methods: list[str], js: Path, deltas: Path
    ) -> list[str]:
        argv = [
            self.python,
            str(SPEED / "reference_peer.py"),
            "--repo",
            str(self.args.reference_repo),
        ]
        argv += ["--layers", str(layers), "--methods", ",".join(methods), "--json", str(js)]
        return [*argv, "--dump-deltas", str(deltas), *map(str, dirs)]

    def cli_report(self, out: Path) -> dict[str, Any]:
        path = out / "merge_report.json"
        return json.loads(path.read_text()) if path.exists() else {}

    # ------------------------------------------------------------------ pieces

    def wait_for_cli(self, seconds: float) -> None:
        """Until ``coremerge merge --help`` works and knows ``--space`` (or exit)."""
        deadline = time.monotonic() + seconds
        while True:
            problem = None
            if not self.coremerge.exists():
                problem = f"{self.coremerge} does not exist"
            else:
                m = run_measured([str(self.coremerge), "merge", "--help"], cwd=ROOT, timeout=120)
                if m.returncode != 0 or "--space" not in m.stdout:
                    problem = f"`coremerge merge --help` failed: {(m.stderr or m.stdout)[-300:]}"
            if problem is None:
                return
            if time.monotonic() >= deadline:
                raise SystemExit(f"{self.benchmark} bench: {problem}")
            log(f"waiting for the CLI: {problem}")
            time.sleep(min(30.0, max(1.0, deadline - time.monotonic())))

    def probe(self, name: str, code: str) -> Measured:
        """A process that only imports what a step imports: its RSS is that step's start-up."""
        if self.args.device.startswith("cuda"):
            code += "; import torch; torch.zeros(1, device='cuda')"
        m = run_measured([self.python, "-c", code], cwd=ROOT, env=self.runner.env, timeout=600)
        m.check(f"start-up probe {name}")
        self.startup[name] = {"wall_s": round(m.wall_s, 3), "rss_mib": mib(m.peak_rss)}
        return m

    def inputs(self, workload: Workload) -> InputSet:
        """The cached set for ``workload`` (generated if absent), read once: warm page cache."""
        s = input_set(self.python, workload, self.out / "inputs")
        for d in s.dirs:
            with open(d / "adapter_model.safetensors", "rb") as f:
                while f.read(16 << 20):
                    pass
        return s

    def header(self, machine: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """The record's opening: what ran, where, on which code, with which options."""
        a = self.args
        return {
            "benchmark": self.benchmark,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine
            | {
                "load_average_start": load_average(),
                "child_threads": a.threads or "torch default",
            },
            "project": project_state(),
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
            **extra,
        }

    def machine(self) -> dict[str, Any]:
        m = machine_info()
        log(f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['ram_total_gib']} GiB")
        return m

    def finish(self) -> None:
        """The closing fields: load at the end, quiet-waits, failures, a change of code."""
        self.record["machine"]["load_average_end"] = load_average()
        self.record["quiet_wait"] = self.runner.quiet_log
        self.record["failures"] = self.failures
        self.record["run_wall_s"] = round(time.monotonic() - self.t_start, 1)
        if project_state() != self.record["project"]:
            self.record["project_at_end"] = project_state()
            log("warning: the project's code changed during the run (see project_at_end)")

    def checkpoint(self) -> None:
        write_json(self.out / f"{self.benchmark}-{self.stamp}.json", self.record)
