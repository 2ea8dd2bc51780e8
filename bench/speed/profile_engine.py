"""The ``engine`` profile (issue 3): coremerge's CLI against the I/O floor and the paper's code.

Workload: 8 random LoRA adapters of rank 16 on Llama-3-8B shapes (32 layers × q,k,v,o,gate,
up,down; ``lora_alpha`` 32), real PEFT adapters cached under ``bench/out/inputs/``. Each step
is a fresh subprocess (start-up counts the same for all), timed wall clock with its peak RSS:

- ``floor``: read every input tensor and stream an output of the core merge's size (rank
  Σ r_t = 128), the I/O any merge must pay (``floor.py``);
- ``core <method>``: ``coremerge merge … --space core`` for ta, ties, tsv;
- ``full ta``: ``--space full`` on a sample of layers, scaled linearly to the workload;
- ``reference``: the paper's core-space path (``MatrixPerLayerMerger.get_core_matrices`` +
  ``_merge_tensors``, float64, in-process, no file I/O) on one layer, extrapolated
  (``reference_peer.py``; its code is extracted to a temp dir at run time, never vendored).

Prints a table and issue 3's targets (PASS/FAIL; exit status 1 when one fails), writes
``bench/out/engine-<UTC>.json`` and (not with ``--no-results``/``--quick``)
``bench/results/engine-latest.json``.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.speed import report
from bench.speed.harness import CLI_IMPORTS, Harness, measured_row, names, scaled
from bench.speed.measure import MiB, contention, fresh, log
from bench.speed.workloads import DTYPES, InputSet, Workload, llama_shapes, tensor_bytes

#: coremerge method → the reference's name for it
REFERENCE_NAMES = {"ta": "tv", "tsv": "tsv"}
#: issue 3's targets
FLOOR_FACTOR = 3.0
RSS_FRACTION = 0.25
REFERENCE_SPEEDUP = 5.0
#: what issue 3 quotes for the reference on a 2-core machine, per layer (for the notes)
ISSUE_REFERENCE_S_PER_LAYER = 2.3


def _mean(xs: list[float] | None) -> float | None:
    return sum(xs) / len(xs) if xs else None


def cross_check(out: Path, reference: dict | None, method: str) -> float | None:
    """Relative Frobenius distance between coremerge's ΔW and the reference's, one module.

    numpy, not torch, keeps this process small; float32 outputs only.
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


def evaluate_targets(
    methods: list[str], layers: int, rows: dict[str, dict], inputs: int, reference: dict | None
) -> list[dict[str, Any]]:
    """Issue 3's targets per core method: × floor, peak RSS − start-up, and the speed-up over
    the reference (where it has the method)."""
    targets = []
    for method in methods:
        r = rows.get(f"core {method}")
        if r is None:
            targets.append(
                {"target": f"core {method}", "passed": False, "note": "the merge failed"}
            )
            continue
        ratio = r["ratio_to_floor"]
        targets.append(
            {
                "target": f"core {method} within {FLOOR_FACTOR:g}× of the floor",
                "value": ratio,
                "limit": FLOOR_FACTOR,
                "passed": ratio is not None and ratio <= FLOOR_FACTOR,
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
        if method in REFERENCE_NAMES:
            targets.append(_reference_target(method, layers, r, reference))
    return targets


def _reference_target(
    method: str, layers: int, r: dict[str, Any], reference: dict | None
) -> dict[str, Any]:
    """Core ``method`` at least REFERENCE_SPEEDUP× faster than the reference's whole path."""
    name = REFERENCE_NAMES[method]
    target = f"core {method} ≥ {REFERENCE_SPEEDUP:g}× faster than the reference"
    if reference is None or name not in reference["methods"]:
        return {"target": target, "passed": None, "note": "reference not run"}
    measured = reference["methods"][name]
    core_s = measured["mean_layer_s"]
    dense_s = _mean(measured.get("dense_delta_w_per_layer_s")) or 0.0
    # The reference's core-space merge() goes per module from the factors to its output,
    # the dense ΔW = U M Vh: that whole path is the peer (the issue's 2.3 s/layer matches
    # it, not the core matrices alone); the compute-only ratio is printed beside it.
    ref_total = (core_s + dense_s) * layers
    speedup = ref_total / r["wall_s"]
    return {
        "target": target,
        "value": round(speedup, 2),
        "limit": REFERENCE_SPEEDUP,
        "passed": speedup >= REFERENCE_SPEEDUP,
        "note": (
            f"reference {name}: {core_s:.2f} s/layer to the merged core matrix + "
            f"{dense_s:.2f} s/layer to its output ΔW, × {layers} layers = "
            f"{ref_total:.1f} s (in-process, no I/O) vs coremerge {r['wall_s']:.1f} s wall "
            f"(whole process, with I/O); to the core matrix only: "
            f"{core_s * layers / r['wall_s']:.1f}×; at the issue's "
            f"{ISSUE_REFERENCE_S_PER_LAYER} s/layer: "
            f"{ISSUE_REFERENCE_S_PER_LAYER * layers / r['wall_s']:.1f}×"
        ),
    }


class EngineProfile(Harness):
    benchmark = "engine"

    def workload(self) -> Workload:
        """Llama-3-8B at the default width 4096 (``lora_alpha`` 32, its base model's name)."""
        a = self.args
        return Workload(
            layers=a.layers,
            adapters=a.adapters,
            rank=a.rank,
            **llama_shapes(a.width),
            dtype=a.input_dtype,
            seed=a.seed,
        )

    def check_disk(self, workload: Workload) -> None:
        """The inputs (unless cached) plus one merged adapter (as large as all inputs)."""
        itemsize = DTYPES[workload.dtype][1]
        size = tensor_bytes(workload, itemsize, workload.rank) * workload.adapters
        self.require_disk(size * (1 if (self.out / "inputs" / workload.key).exists() else 2))

    def run_reference(self, dirs: list[Path], methods: list[str]) -> dict | None:
        """The reference peer, best of ``--repeat`` clean runs per method (None: not run)."""
        a = self.args
        names = [REFERENCE_NAMES[m] for m in methods if m in REFERENCE_NAMES]
        if a.ref_layers <= 0 or not names:
            return None
        if not (a.reference_repo / "HEAD").exists():
            log(
                f"reference skipped: no git directory at {a.reference_repo} "
                "(fetch apanariello4/core-space-merging)"
            )
            return None
        log(f"reference ({a.ref_layers} layer(s))")
        js, deltas = self.work / "reference.json", self.work / "reference-deltas.safetensors"
        argv = self.reference(dirs, a.ref_layers, names, js, deltas)
        att = self.runner.until_clean(lambda: self.attempt("reference", argv, js), a.repeat)
        if not att.runs:
            return None
        clean = att.clean or att.runs
        # per method, the fastest clean run (each run dumps the same deltas)
        reference = att.runs[-1][1]
        for name in reference["methods"]:
            reference["methods"][name] = min(
                (info["methods"][name] for _, info in clean), key=lambda x: x["mean_layer_s"]
            )
        reference["other_cpu_share"] = round(min(contention(m) for m, _ in clean), 3)
        reference["contended"] = att.contended
        reference["deltas_path"] = str(deltas)
        self.record["reference"] = reference | {
            "attempts": att.summary(),
            "processes": [m.as_json() for m, _ in att.runs],
        }
        return reference

    def run(self) -> int:
        a = self.args
        methods = names(a.methods)
        main, sample = self.prepare()
        rows: dict[str, dict[str, Any]] = {}
        floor_out = self.work / "floor.safetensors"
        floor_wall = self.floor_row(main, floor_out, rows)
        reference = self.run_reference(main.dirs, methods)
        cross = {m: self.core_row(main, m, floor_wall, reference, rows) for m in methods}
        if sample is not None:
            self.full_row(sample, floor_wall, rows)
        if reference is not None:
            rows |= self.reference_rows(reference, floor_wall)
        if not a.keep_outputs:
            fresh(floor_out)
        targets = evaluate_targets(methods, a.layers, rows, main.bytes, reference)
        self.finish()
        self.record |= {
            "rows": list(rows.values()),
            "targets": targets,
            "cross_check_rel_error": {k: v for k, v in cross.items() if v is not None},
        }
        out, *results = self.publish()
        print()
        print(report.engine_text(self.record))
        print(f"\nwrote {out}.json")
        for base in results:
            print(f"wrote {base}.json")
        if not a.keep_outputs:
            shutil.rmtree(self.work, ignore_errors=True)
        return 0 if all(t["passed"] is not False for t in targets) else 1

    def prepare(self) -> tuple[InputSet, InputSet | None]:
        """The machine, the disk, the CLI, the inputs (main and sample), the start-up probes
        and the record's opening."""
        a = self.args
        workload = self.workload()
        machine = self.machine()
        self.check_disk(workload)
        self.wait_for_cli(a.wait_cli)
        log(f"inputs: {workload.key}")
        main = self.inputs(workload)
        sample = self.inputs(workload.with_layers(a.sample_layers)) if a.sample_layers else None
        log("start-up probes")
        self.startup_m = {
            "cli": self.probe("cli", CLI_IMPORTS),
            "floor": self.probe("floor", "import torch, safetensors.torch"),
        }
        self.record = self.header(machine, inputs_bytes=main.bytes, startup=self.startup)
        self.record["config"] |= {
            "workload": asdict(workload),
            "inputs_dir": str(main.root),
            "page_cache": "warm (inputs read once before timing)",
        }
        return main, sample

    def floor_row(self, main: InputSet, out: Path, rows: dict[str, dict]) -> float | None:
        """The I/O floor, best of ``--repeat`` clean runs, into ``rows``; its wall time."""
        log("floor")
        att = self.runner.until_clean(
            lambda: self.attempt("floor", self.floor(main.dirs, out)), self.args.repeat
        )
        if not att.runs:
            return None
        m, info = att.best
        rows["floor"] = measured_row(
            "floor (read all + write rank-Σr output)",
            m,
            wall=m.wall_s,
            floor_wall=m.wall_s,
            startup=self.startup_m["floor"],
            inputs=main.bytes,
            attempts=att.summary(),
            contended=att.contended,
            written_bytes=info.get("written_bytes"),
            read_bytes=info.get("read_bytes"),
        )
        return m.wall_s

    def core_row(
        self,
        main: InputSet,
        method: str,
        floor_wall: float | None,
        reference: dict | None,
        rows: dict[str, dict],
    ) -> float | None:
        """``coremerge merge --space core`` on all layers, into ``rows``; the relative error
        of its ΔW against the reference's (None: not compared)."""
        a = self.args
        log(f"core {method}")
        out = self.work / f"core-{method}"

        def once():
            got = self.attempt(f"core {method}", self.cli(main.dirs, method, "core", out))
            return got and (got[0], self.cli_report(out))

        att = self.runner.until_clean(once, a.repeat)
        if not att.runs:
            return None
        m, rep = att.best
        cross = cross_check(out, reference, method)
        result = out / "adapter_model.safetensors"
        rows[f"core {method}"] = measured_row(
            f"core {method}",
            m,
            wall=m.wall_s,
            floor_wall=floor_wall,
            startup=self.startup_m["cli"],
            inputs=main.bytes,
            attempts=att.summary(),
            contended=att.contended,
            timings=rep.get("timings"),
            output_bytes=result.stat().st_size if result.exists() else None,
            output_rank=rep.get("output", {}).get("rank"),
            device=rep.get("device"),
            self_check=rep.get("self_check", {}).get("max_projection_residual"),
        )
        if rep.get("timings"):
            log("  timings: " + report.timings_line(rep["timings"]))
        if not a.keep_outputs:
            fresh(out)
        return cross

    def full_row(self, sample: InputSet, floor_wall: float | None, rows: dict[str, dict]) -> None:
        """``--space full`` ta once on the sample, scaled to all layers, into ``rows``."""
        a = self.args
        log(f"full ta ({a.sample_layers} layer(s))")
        out = self.work / "full-ta"
        got = self.attempt("full ta", self.cli(sample.dirs, "ta", "full", out))
        if got is not None:
            m, rep = got[0], self.cli_report(out)
            in_process = rep.get("timings", {}).get("total_s", m.wall_s)
            scale = a.layers / a.sample_layers
            rows["full ta"] = measured_row(
                f"full ta ({a.sample_layers} layer → {a.layers}, scaled ×{scale:g})",
                m,
                wall=scaled(m.wall_s, in_process, scale),
                floor_wall=floor_wall,
                startup=self.startup_m["cli"],
                inputs=sample.bytes,
                measured_wall_s=round(m.wall_s, 3),
                contended=contention(m) > a.max_contention,
                in_process_s=in_process,
                sample_layers=a.sample_layers,
                timings=rep.get("timings"),
                note="wall = start-up + in-process time × layers/sample; RSS and inputs "
                "as measured on the sample",
            )
        if not a.keep_outputs:
            fresh(out)

    def reference_rows(
        self, reference: dict[str, Any], floor_wall: float | None
    ) -> dict[str, dict[str, Any]]:
        """Per method: to the merged core matrix, and on to its output ΔW (× layers)."""
        a = self.args
        rows: dict[str, dict[str, Any]] = {}
        scale = a.layers / a.ref_layers
        for method, name in REFERENCE_NAMES.items():
            if name not in reference["methods"]:
                continue
            measured = reference["methods"][name]
            per_layer = measured["mean_layer_s"]
            dense = _mean(measured.get("dense_delta_w_per_layer_s"))
            common = {
                "floor_wall": floor_wall,
                "startup": None,
                "inputs": None,
                "other_cpu_share": reference.get("other_cpu_share"),
                "contended": reference.get("contended"),
                "compares_with": f"core {method}",
            }
            rows[f"reference {name}"] = measured_row(
                f"reference {name} ({a.ref_layers} layer → {a.layers}, ×{scale:g})",
                None,
                wall=per_layer * a.layers,
                per_layer_s=per_layer,
                dense_delta_w_per_layer_s=dense,
                note="to the merged core matrix only (in-process, float64, no I/O, no start-up)",
                **common,
            )
            if dense is not None:
                rows[f"reference {name} to ΔW"] = measured_row(
                    f"reference {name} to its output ΔW (×{scale:g})",
                    None,
                    wall=(per_layer + dense) * a.layers,
                    per_layer_s=per_layer + dense,
                    note="its merge() per module: core matrices, merge, ΔW = U M Vh "
                    "(in-process, float64, no I/O)",
                    **common,
                )
        return rows
