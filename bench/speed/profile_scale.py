"""The ``scale`` profile (issue 16, item 4): many adapters and large ranks at real model sizes.

Two workloads, each with Σ r = R = 1024 per module (``--workloads``):

- ``70b``: Llama-3-70B shapes (hidden 8192, MLP 28672, GQA k/v 8192 → 1024, 80 layers),
  16 adapters of rank 64;
- ``8b-t64``: Llama-3-8B shapes (hidden 4096, MLP 14336, k/v 4096 → 1024, 32 layers),
  64 adapters of rank 16.

All layers do not fit the time and disk of a 2-core machine (the 70B set alone is 24.7 GiB of
bfloat16 inputs and its core merge writes 49.4 GiB), so every row runs on the first
``--sample-layers`` layers and is scaled linearly to the model: start-up is paid once, the
in-process time grows with the layers, ``wall(N) = (wall − in-process) + in-process × N / S``.
Memory is measured on the sample: the CLI merges module by module (a few side by side) and
drops each input's file map after 16 reads, so its peak does not grow with the layers once a
map has served 16 modules: hence 3 sampled layers (21 modules) by default; a window of 16
modules at 80 layers may hold two more of the large MLP modules than the sample's first one.
The CLI's own estimate of the peak for all N layers (which assumes every input's 16 largest
modules mapped) is taken from its plan on header-only (sparse) inputs of the full size
(``--max-memory 1`` makes it stop, with the estimate, before reading any tensor).

Rows, each a fresh subprocess (framework's harness: peak RSS less start-up, CPU busy
elsewhere, fastest clean run of ``--repeat``):

- ``floor``: ``floor.py``: read every input tensor, stream an output of the core merge's size
  (float32, rank R per module);
- ``core <method>``: ``python -m worker.cli merge … --space core --method m --device D``
  (the real CLI, as a user runs it).

Targets (issue 16, measured on the sample): every core merge's peak RSS less start-up below
2 GiB, and its wall time within 1.5× the floor's. Exit status 1 when one fails. Writes
``bench/out/scale-<UTC>.{json,md}`` and (not with ``--no-results``/``--quick``)
``bench/results/scale-latest.{json,md}``.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.speed import report
from bench.speed.harness import (
    CLI_IMPORTS,
    Harness,
    measured_row,
    merge_command,
    mib,
    names,
    scaled,
)
from bench.speed.measure import GiB, MiB, fresh, log, run_measured
from bench.speed.workloads import (
    DTYPES,
    InputSet,
    Workload,
    lora_header,
    module_shapes,
    tensor_bytes,
)

__all__ = ["WORKLOADS", "ScaleProfile", "ScaleWorkload", "evaluate_targets"]

#: issue 16's targets, on the sample
RSS_LIMIT_MIB = 2 * 1024
FLOOR_FACTOR = 1.5
ITEMSIZE = {k: size for k, (_, size) in DTYPES.items()}
#: what the CLI writes: float32 (its default ``--dtype``)
OUTPUT_ITEMSIZE = 4
#: "the job's estimated peak is 1.6 GiB" in the CLI's refusal (worker.merge.memory.check_work)
_ESTIMATE = re.compile(r"estimated peak is ([0-9.]+) (B|KiB|MiB|GiB|TiB)")
_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


@dataclass(frozen=True)
class ScaleWorkload:
    """One of the profile's workloads: a model's shapes and T adapters of rank r."""

    key: str
    title: str
    layers: int
    adapters: int
    rank: int
    hidden: int
    kv: int
    mlp: int
    base_model: str

    def workload(self, dtype: str, seed: int, layers: int | None = None) -> Workload:
        return Workload(
            layers=self.layers if layers is None else layers,
            adapters=self.adapters,
            rank=self.rank,
            lora_alpha=2 * self.rank,
            hidden=self.hidden,
            kv=self.kv,
            mlp=self.mlp,
            dtype=dtype,
            seed=seed,
            base_model=self.base_model,
        )


WORKLOADS = {
    "70b": ScaleWorkload(
        key="70b",
        title="Llama-3-70B shapes, 16 adapters × rank 64",
        layers=80,
        adapters=16,
        rank=64,
        hidden=8192,
        kv=1024,
        mlp=28672,
        base_model="meta-llama/Meta-Llama-3-70B",
    ),
    "8b-t64": ScaleWorkload(
        key="8b-t64",
        title="Llama-3-8B shapes, 64 adapters × rank 16",
        layers=32,
        adapters=64,
        rank=16,
        hidden=4096,
        kv=1024,
        mlp=14336,
        base_model="meta-llama/Meta-Llama-3-8B",
    ),
}


def parse_estimate(text: str) -> int | None:
    """The estimated peak in bytes from the CLI's refusal message (None when absent)."""
    found = _ESTIMATE.search(text or "")
    return None if found is None else int(float(found[1]) * _UNITS[found[2]])


def write_header_only(w: Workload, configs: list[Path], root: Path) -> list[Path]:
    """Adapters of ``w``'s full size whose tensors are a hole in a sparse file.

    The header (and ``adapter_config.json``, copied from ``configs``) is all the CLI's plan
    reads; the data area is never read before the plan's memory check. Raises OSError when
    the file system does not keep the hole sparse."""
    head, data = lora_header(((mod, n, m, w.rank) for mod, n, m in module_shapes(w)), w.dtype)
    dirs = []
    for t, config in enumerate(configs):
        d = fresh(root / f"adapter-{t}")
        d.mkdir(parents=True)
        shutil.copyfile(config, d / "adapter_config.json")
        path = d / "adapter_model.safetensors"
        with open(path, "wb") as f:
            f.write(head)
            f.truncate(len(head) + data)
        allocated = path.stat().st_blocks * 512
        if allocated > len(head) + (4 << 20):
            raise OSError(f"{path}: {allocated} bytes allocated, the file system is not sparse")
        dirs.append(d)
    return dirs


@dataclass
class _Floors:
    """A sample's yardsticks: the I/O floor (as measured, and scaled to all layers) and the
    GEMM floor's in-process seconds (None where a floor did not run)."""

    wall: float | None = None
    scaled: float | None = None
    gemm_s: float | None = None


class ScaleProfile(Harness):
    benchmark = "scale"

    def merge_argv(self, dirs: list[Path], method: str, out: Path, *extra: str) -> list[str]:
        """The real CLI as a module: ``python -m worker.cli merge … --space core``."""
        prefix = [self.python, "-m", "worker.cli"]
        return merge_command(prefix, dirs, out, method, "core", self.args.device, *extra)

    def check_cli(self) -> None:
        m = run_measured(
            [self.python, "-m", "worker.cli", "merge", "--help"],
            cwd=self.runner.root,
            env=self.runner.env,
            timeout=120,
        )
        if m.returncode != 0 or "--max-memory" not in m.stdout:
            raise SystemExit(
                "scale bench: `python -m worker.cli merge --help` failed or has no --max-memory: "
                + (m.stderr or m.stdout)[-300:]
            )

    def check_disk(self, sample: Workload) -> None:
        """The sample's inputs (unless cached) plus one merged output of the sample."""
        inputs = tensor_bytes(sample, ITEMSIZE[sample.dtype], sample.rank) * sample.adapters
        output = tensor_bytes(sample, OUTPUT_ITEMSIZE, sample.rank * sample.adapters)
        need = output + (0 if (self.out / "inputs" / sample.key).exists() else inputs)
        self.require_disk(need, f" for {sample.key}")

    def plan_estimates(self, full: Workload, configs: list[Path], methods: list[str]) -> dict:
        """Per method, the CLI's estimated peak working memory for the whole model, from its
        plan on header-only inputs of the full size (refused at ``--max-memory 1``)."""
        root = self.work / f"plan-{full.key}"
        out: dict[str, Any] = {}
        try:
            dirs = write_header_only(full, configs, root)
        except OSError as exc:
            log(f"  plan estimates skipped: {exc}")
            shutil.rmtree(root, ignore_errors=True)
            return {"skipped": str(exc)}
        for method in methods:
            argv = self.merge_argv(dirs, method, self.work / "plan-out", "--max-memory", "1")
            m = run_measured(argv, cwd=self.runner.root, env=self.runner.env, timeout=600)
            estimate = parse_estimate(m.stderr)
            out[method] = {
                "estimated_peak_bytes": estimate,
                "returncode": m.returncode,
                "wall_s": round(m.wall_s, 2),
                "message": m.stderr.strip()[-600:],
            }
            shown = "?" if estimate is None else f"{estimate / GiB:.1f} GiB"
            log(f"  plan {method} ({full.layers} layers): estimated peak {shown}")
        shutil.rmtree(root, ignore_errors=True)
        fresh(self.work / "plan-out")
        return out

    def one_workload(self, sw: ScaleWorkload, methods: list[str]) -> dict[str, Any]:
        """Every row of one workload on its sample, scaled to the model; the CLI's plan."""
        a = self.args
        full = sw.workload(a.input_dtype, a.seed)
        sample_layers = min(a.sample_layers, sw.layers)
        sample = full.with_layers(sample_layers)
        factor = sw.layers / sample_layers
        log(f"{sw.key}: {sw.title}, {sample_layers} of {sw.layers} layers ({sample.key})")
        self.check_disk(sample)
        inputs = self.inputs(sample)
        floors = _Floors()
        rows = self.floor_rows(sw, inputs, factor, floors)
        rows += [self.core_row(sw, inputs, m, factor, floors) for m in methods]
        plans = self.plan_estimates(full, [d / "adapter_config.json" for d in inputs.dirs], methods)
        for r in rows:
            plan = plans.get(r.get("method") or "", {})
            if plan.get("estimated_peak_bytes") is not None:
                r["estimated_peak_all_layers_mib"] = mib(plan["estimated_peak_bytes"])
        return {
            "key": sw.key,
            "title": sw.title,
            "full": asdict(full),
            "sample_layers": sample_layers,
            "scale_factor": factor,
            "sample_inputs": inputs.describe(),
            "full_inputs_bytes": tensor_bytes(full, ITEMSIZE[full.dtype], full.rank)
            * full.adapters,
            "full_output_bytes": tensor_bytes(full, OUTPUT_ITEMSIZE, full.rank * full.adapters),
            "rows": rows,
            "plan_all_layers": plans,
        }

    def floor_rows(
        self, sw: ScaleWorkload, inputs: InputSet, factor: float, floors: _Floors
    ) -> list[dict[str, Any]]:
        """The I/O floor and the GEMM floor on the sample (their figures into ``floors``)."""
        a, startup = self.args, self.startup_m["floor"]
        rows: list[dict[str, Any]] = []
        floor_out = self.work / f"floor-{sw.key}.safetensors"
        att = self.runner.until_clean(
            lambda: self.attempt(f"{sw.key} floor", self.floor(inputs.dirs, floor_out)), a.repeat
        )
        fresh(floor_out)
        if att.runs:
            m, info = att.best
            in_process = info.get("seconds")
            floors.wall, floors.scaled = m.wall_s, scaled(m.wall_s, in_process, factor)
            rows.append(
                _timed_row("floor", "floor", att, in_process, floors, factor, startup,
                           inputs.bytes, read_bytes=info.get("read_bytes"),
                           written_bytes=info.get("written_bytes"))
            )  # fmt: skip
        gemm = self.runner.until_clean(
            lambda: self.attempt(f"{sw.key} GEMM floor", self.gemm_floor(inputs.dirs)), a.repeat
        )
        if gemm.runs:
            info = gemm.best[1]
            floors.gemm_s = info["seconds"]
            rows.append(
                _timed_row("GEMM floor", "gemm", gemm, round(floors.gemm_s, 3), floors, factor,
                           startup, inputs.bytes, flops=info["flops"],
                           gflops_per_s=round(info["gflops_per_s"], 1))
            )  # fmt: skip
        return rows

    def core_row(
        self, sw: ScaleWorkload, inputs: InputSet, method: str, factor: float, floors: _Floors
    ) -> dict[str, Any]:
        """``python -m worker.cli merge --space core`` on the sample, best of ``--repeat``."""
        out = self.work / f"{sw.key}-core-{method}"
        step = f"{sw.key} core {method}"

        def once():
            got = self.attempt(step, self.merge_argv(inputs.dirs, method, out))
            path = out / "merge_report.json"
            return got and (got[0], json.loads(path.read_text()) if path.exists() else {})

        att = self.runner.until_clean(once, self.args.repeat)
        if not att.runs:
            return self.failed_row(step, method)
        rep = att.best[1]
        timings = rep.get("timings") or {}
        in_process = timings.get("total_s")
        memory = rep.get("memory") or {}
        result = out / "adapter_model.safetensors"
        gemm_s = floors.gemm_s
        r = _timed_row(
            f"core {method}",
            "core",
            att,
            in_process,
            floors,
            factor,
            self.startup_m["cli"],
            inputs.bytes,
            method=method,
            timings=timings,
            estimated_peak_mib=mib(memory.get("estimated_peak_bytes")),
            memory_limit_mib=mib(memory.get("limit_bytes")),
            output_bytes=result.stat().st_size if result.exists() else None,
            output_rank=(rep.get("output") or {}).get("rank"),
            self_check=(rep.get("self_check") or {}).get("max_projection_residual"),
            in_process_to_gemm=round(in_process / gemm_s, 2) if in_process and gemm_s else None,
        )
        if timings:
            log("  timings: " + report.timings_line(timings))
        if not self.args.keep_outputs:
            fresh(out)
        return r

    def failed_row(self, step: str, method: str) -> dict[str, Any]:
        """A merge that failed, and whether the CLI refused it for its estimated memory."""
        error = next((f["error"] for f in self.failures if f["step"] == step), "")
        estimate = parse_estimate(error)
        return {
            "name": f"core {method}",
            "kind": "core",
            "method": method,
            "failed": True,
            "refused": estimate is not None,
            "estimated_peak_mib": None if estimate is None else round(estimate / MiB),
            "error": error.strip().splitlines()[-1][-600:] if error else None,
        }

    def run(self) -> int:
        a = self.args
        methods, keys = names(a.methods), names(a.workloads)
        unknown = [k for k in keys if k not in WORKLOADS]
        if unknown:
            raise SystemExit(
                f"scale bench: unknown workload(s) {unknown}; known: {list(WORKLOADS)}"
            )
        if a.sample_layers < 1:
            raise SystemExit("scale bench: --sample-layers must be at least 1")
        self.prepare()
        self.record["workloads"] = []
        for key in keys:
            self.record["workloads"].append(self.one_workload(WORKLOADS[key], methods))
            self.checkpoint()
        self.record["targets"] = evaluate_targets(self.record["workloads"], methods)
        self.finish()
        self.checkpoint()
        md = report.scale_markdown(self.record)
        bases = self.publish(md)
        print(md)
        for base in bases:
            print(f"wrote {base}.{{json,md}}")
        if not a.keep_outputs:
            shutil.rmtree(self.work, ignore_errors=True)
        return 0 if all(t["passed"] is not False for t in self.record["targets"]) else 1

    def prepare(self) -> None:
        """The machine, the CLI, the start-up probes and the record's opening."""
        machine = self.machine()
        self.check_cli()
        log("start-up probes")
        self.startup_m = {
            "cli": self.probe("cli", CLI_IMPORTS),
            "floor": self.probe("floor", "import torch, safetensors.torch"),
        }
        self.record = self.header(machine, startup=self.startup)
        self.record["config"] |= {
            "page_cache": "warm (inputs read once before timing)",
            "scaling": "wall(N) = (wall − in-process) + in-process × N / sample; memory as "
            "measured on the sample",
            "targets": {
                "peak_minus_startup_mib_below": RSS_LIMIT_MIB,
                "floor_factor": FLOOR_FACTOR,
            },
        }


def _timed_row(
    name: str,
    kind: str,
    att: Any,
    in_process: float | None,
    floors: _Floors,
    factor: float,
    startup: Any,
    inputs: int,
    **extra: Any,
) -> dict[str, Any]:
    """A row from the best of ``att``'s runs, its wall time scaled to all layers."""
    m = att.best[0]
    wall_n = scaled(m.wall_s, in_process, factor)
    return measured_row(
        name,
        m,
        wall=m.wall_s,
        floor_wall=floors.wall,
        startup=startup,
        inputs=inputs,
        kind=kind,
        in_process_s=in_process,
        scaled_wall_s=round(wall_n, 2),
        scaled_ratio_to_floor=round(wall_n / floors.scaled, 2) if floors.scaled else None,
        attempts=att.summary(),
        contended=att.contended,
        **extra,
    )


def evaluate_targets(workloads: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """Per workload and method: peak RSS − start-up < 2 GiB, wall ≤ 1.5 × floor (sample)."""
    targets = []
    for wl in workloads:
        rows = {r["name"]: r for r in wl["rows"]}
        where = f"{wl['key']} ({wl['sample_layers']} of {wl['full']['layers']} layers)"
        for method in methods:
            r = rows.get(f"core {method}")
            if r is None or r.get("failed"):
                note = "the merge failed"
                if r and r.get("refused"):
                    note = f"the CLI refused it: estimated peak {r['estimated_peak_mib']} MiB"
                for what in ("peak RSS − start-up", "× floor"):
                    targets.append(
                        {"target": f"{where} core {method} {what}", "passed": False, "note": note}
                    )
                continue
            rss = r.get("peak_minus_startup_mib")
            targets.append(
                {
                    "target": f"{where} core {method} peak RSS − start-up < {RSS_LIMIT_MIB} MiB",
                    "value": rss,
                    "limit": RSS_LIMIT_MIB,
                    "unit": "MiB",
                    "passed": rss is not None and rss < RSS_LIMIT_MIB,
                }
            )
            ratio = r.get("ratio_to_floor")
            targets.append(
                {
                    "target": f"{where} core {method} ≤ {FLOOR_FACTOR:g}× the floor (sample)",
                    "value": ratio,
                    "limit": FLOOR_FACTOR,
                    "passed": ratio is not None and ratio <= FLOOR_FACTOR,
                    "note": None
                    if r.get("scaled_ratio_to_floor") is None
                    else f"scaled to {wl['full']['layers']} layers: "
                    f"{r['scaled_ratio_to_floor']}× ({r['scaled_wall_s']:.0f} s)",
                }
            )
    return targets
