"""What every profile shares: the child commands, start-up probes, input sets and the record.

Written once here, and used by the GPU check (``gpu.py``) and ``bench/service.py`` as well:
the command lines of the CLI and the floor, warming the page cache, scaling a sample's wall
time to the whole model, a measured row, writing the record to ``out/`` and ``results/``.
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
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.speed.machine import ROOT, load_average, machine_info, project_state, write_json
from bench.speed.measure import GiB, Measured, MiB, Runner, contention, fresh, log, run_measured
from bench.speed.workloads import InputSet, Workload, input_set

BENCH = ROOT / "bench"
SPEED = BENCH / "speed"
#: where the paper's code is read from (github.com/apanariello4/core-space-merging)
DEFAULT_REFERENCE = Path("/work/.mirror/apanariello4+core-space-merging/repo")
#: what the CLI start-up probe imports (the console script's own imports, so torch)
CLI_IMPORTS = "from worker.cli import build_parser; build_parser(); import worker.merge.runner"


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


def names(text: str) -> list[str]:
    """The items of a comma-separated option (``--methods ta,ties``), blanks dropped."""
    return [x.strip() for x in text.split(",") if x.strip()]


def run_stamp() -> str:
    """The UTC time a run's files are named after (``20250101T120000Z``)."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def scaled(wall: float, in_process: float | None, factor: float) -> float:
    """A whole process's wall time scaled to ``factor`` times the work: start-up is paid once,
    the in-process time grows (without an in-process time, all of it grows)."""
    if in_process is None:
        return wall * factor
    return (wall - in_process) + in_process * factor


def warm_page_cache(dirs: list[Path]) -> None:
    """Read every input's weights once, so that no timed step pays for a cold disk."""
    for d in dirs:
        with open(d / "adapter_model.safetensors", "rb") as f:
            while f.read(16 << 20):
                pass


def merge_command(
    prefix: list[str],
    dirs: list[Path],
    out: Path,
    method: str,
    space: str,
    device: str,
    *extra: str,
) -> list[str]:
    """``coremerge merge`` as a user runs it: ``prefix`` is the console script, or an
    interpreter and ``-m worker.cli``; ``out`` is cleared first."""
    argv = [*prefix, "merge", *map(str, dirs), "-o", str(fresh(out))]
    argv += ["--method", method, "--space", space, "--device", device]
    return [*argv, *extra, "--quiet"]


def floor_command(python: str, dirs: list[Path], out: Path) -> list[str]:
    """The I/O floor (``floor.py``) writing to ``out``, cleared first."""
    return [python, str(SPEED / "floor.py"), "-o", str(fresh(out)), *map(str, dirs)]


def measured_row(
    name: str,
    m: Measured | None,
    *,
    wall: float,
    floor_wall: float | None,
    startup: Measured | None,
    inputs: int | None,
    **extra: Any,
) -> dict[str, Any]:
    """A table row of the engine and scale profiles: wall time, its ratio to the floor, and
    ``m``'s memory, CPU time and contention (``m`` None: a peer timed in-process)."""
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
            r["other_cpu_share"] = round(contention(m), 3)
    if m is not None and startup is not None:
        r["startup_rss_mib"] = round(startup.peak_rss / MiB, 1)
        r["peak_minus_startup_mib"] = round((m.peak_rss - startup.peak_rss) / MiB, 1)
    r["inputs_gib"] = round(inputs / GiB, 3) if inputs else None
    r.update(extra)
    return r


class Harness:
    """One benchmark run: its measured children, start-up probes, inputs and JSON record."""

    benchmark = "bench"

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.coremerge = args.coremerge
        self.python = cli_python(self.coremerge)
        self.stamp = run_stamp()
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
        #: the probes' measurements, by name, where a profile keeps them for its rows
        self.startup_m: dict[str, Measured] = {}
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
        return merge_command([str(self.coremerge)], dirs, out, method, space, self.args.device)

    def floor(self, dirs: list[Path], out: Path) -> list[str]:
        return floor_command(self.python, dirs, out)

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
        warm_page_cache(s.dirs)
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

    def require_disk(self, need: int, what: str = "") -> None:
        """Stop before the first step when the output folder has not ``need`` bytes (+20 %)."""
        free = shutil.disk_usage(self.out).free
        log(f"disk: {free / GiB:.1f} GiB free at {self.out}, about {need / GiB:.1f} GiB needed")
        if free < need * 1.2:
            raise SystemExit(f"{self.benchmark} bench: not enough disk at {self.out}{what}")

    def publish(self, markdown: str | None = None) -> list[Path]:
        """The record (and its Markdown) as ``out/<benchmark>-<UTC>`` and, unless
        ``--no-results``, ``results/<benchmark>-latest``: the paths without their suffix."""
        bases = [self.out / f"{self.benchmark}-{self.stamp}"]
        if not self.args.no_results:
            bases.append(self.args.results_dir / f"{self.benchmark}-latest")
        for base in bases:
            write_json(base.with_suffix(".json"), self.record)
            if markdown is not None:
                base.with_suffix(".md").write_text(markdown)
        return bases
