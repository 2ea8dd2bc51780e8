"""The ``speed`` profile (issue 5): every method in core, full and knots space, PEFT's
``add_weighted_adapter`` and the I/O floor in one run, with ratios; scaling curves in T, rank
and width; where the time goes.

Writes ``bench/out/speed-<UTC>.{json,md,png}`` and (not with ``--quick`` or ``--no-results``)
``bench/results/speed-latest.{json,md,png}``.
"""

from __future__ import annotations

import shutil
from typing import Any

from bench.speed import report
from bench.speed.harness import CLI_IMPORTS, Harness, mib, names, scaled
from bench.speed.measure import Attempts, MiB, contention, fresh, log
from bench.speed.workloads import CurvePoint, InputSet, curve_points, llama_workload

METHODS = ("ta", "ties", "dare", "dare_ties", "tsv", "cart", "iso_c")
#: PEFT combinations: the cheap ones act on the factors, the ``*svd`` ones on dense ΔW
PEFT_CHEAP = ("cat", "linear", "ties")
PEFT_DENSE = ("svd", "ties_svd")
#: the coremerge method each PEFT combination is compared with
PEFT_COUNTERPART = {"cat": "ta", "linear": "ta", "svd": "ta", "ties": "ties", "ties_svd": "ties"}
#: what the steps harness imports (its start-up probe)
STEPS_IMPORTS = (
    "import torch, safetensors.torch, worker.engine; from jobs.spec import METHOD_PARAMS; "
    "from worker.adapters import open_adapter"
)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


class SpeedProfile(Harness):
    benchmark = "speed"

    def input_set(self, *, width: int, layers: int, adapters: int, rank: int) -> InputSet:
        a = self.args
        w = llama_workload(
            width=width,
            layers=layers,
            adapters=adapters,
            rank=rank,
            seed=a.seed,
            dtype=a.input_dtype,
        )
        return self.inputs(w)

    # ------------------------------------------------------------------ main comparison

    def main_comparison(self, main: InputSet, sample: InputSet | None) -> list[dict[str, Any]]:
        a, work = self.args, self.work
        methods, peers = names(a.methods), names(a.peft)
        cheap: dict[str, tuple[str, Any]] = {"floor": ("floor", None)}
        cheap |= {f"core {m}": ("core", m) for m in methods}
        cheap |= {f"knots {m}": ("knots", m) for m in methods}
        cheap |= {f"peft {c}": ("peft", c) for c in peers if c not in PEFT_DENSE}
        attempts = {name: self.runner.attempts() for name in cheap}
        repeat = max(1, a.repeat)
        # Round-robin over the rows, so that a burst of load elsewhere hits all rows alike;
        # then up to --extra-attempts more rounds of the rows short of clean (quiet) runs.
        for rnd in range(repeat + max(0, a.extra_attempts)):
            todo = [n for n in cheap if rnd < repeat or len(attempts[n].clean) < repeat]
            if not todo:
                break
            log(f"main comparison, round {rnd + 1} ({len(todo)} rows)")
            for name in todo:
                kind, what = cheap[name]
                out, js = work / name.replace(" ", "-"), work / f"{name.replace(' ', '-')}.json"
                if kind == "floor":
                    argv = self.floor(main.dirs, work / "floor.safetensors")
                elif kind == "peft":
                    argv = self.peft(main, what, js, out)
                else:
                    argv = self.cli(main.dirs, what, kind, out)
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
        if sample is None:  # --sample-layers 0
            return self.ratios(list(rows.values()))
        # Full space and PEFT's dense combinations: once each, on the sample, scaled.
        scale = main.workload.layers / sample.workload.layers
        for name, kind, what in [("full " + m, "full", m) for m in methods] + [
            ("peft " + c, "peft", c) for c in peers if c in PEFT_DENSE
        ]:
            log(f"{name} ({sample.workload.layers} layer(s), scaled ×{scale:g})")
            out, js = work / name.replace(" ", "-"), work / f"{name.replace(' ', '-')}.json"
            if kind == "peft":
                got = self.attempt(name, self.peft(sample, what, js, out), js)
            else:
                got = self.attempt(name, self.cli(sample.dirs, what, "full", out))
                got = got and (got[0], self.cli_report(out))
            fresh(out)
            if got is None:
                continue
            m, info = got
            att = self.runner.attempts()
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
        wall = m.wall_s if work_s is None else scaled(m.wall_s, work_s, scale)
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
            "peak_rss_mib": mib(m.peak_rss),
            "peak_minus_startup_mib": (
                round(m.peak_rss / MiB - startup["rss_mib"], 1) if startup else None
            ),
            "child_cpu_s": round(m.child_cpu_s, 2),
            "other_cpu_share": round(contention(m), 3),
            "contended": att.contended,
            "attempts": att.summary(),
            "output_rank": rank,
        }
        if kind == "peft":
            r["phases_s"] = {
                k: round(info[k], 4)
                for k in ("import_s", "build_base_s", "load_adapters_s", "merge_s", "save_s")
            }
            r["gpu_max_memory_mib"] = mib(info.get("cuda_max_memory_allocated"))
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

        def once():
            got = self.attempt(
                f"steps {space} {method}", self.steps(inputs, method, space, js, out), js
            )
            fresh(out)
            return got

        att = self.runner.until_clean(once, repeat)
        if not att.runs:
            return None
        m, info = att.best
        startup = self.startup["steps"]["rss_mib"]
        return {
            "space": space,
            "method": method,
            "wall_s": round(m.wall_s, 3),
            "peak_rss_mib": mib(m.peak_rss),
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
            "gpu_max_memory_mib": mib(info.get("cuda_max_memory_allocated")),
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
            s = self.input_set(width=p.width, layers=1, adapters=p.adapters, rank=p.rank)
            entry: dict[str, Any] = {"adapters": p.adapters, "rank": p.rank, "width": p.width}
            entry["inputs_bytes"] = s.bytes
            entry["core_steps"] = self.breakdown(s, "core", a.curve_method, a.curve_repeat)
            out = self.work / f"curve-cli-{key}"

            def once(s=s, key=key, out=out):
                got = self.attempt(f"cli core {key}", self.cli(s.dirs, a.curve_method, "core", out))
                got = got and (got[0], self.cli_report(out))
                fresh(out)
                return got

            att = self.runner.until_clean(once, a.curve_repeat)
            if entry["core_steps"] is None or not att.runs:
                continue
            m, rep = att.best
            entry["core_cli"] = {
                "wall_s": round(m.wall_s, 3),
                "peak_rss_mib": mib(m.peak_rss),
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

    def run(self) -> int:
        a = self.args
        machine = self.machine()
        self.wait_for_cli(a.wait_cli)
        main = self.input_set(width=a.width, layers=a.layers, adapters=a.adapters, rank=a.rank)
        sample = None
        if a.sample_layers > 0:
            sample = self.input_set(
                width=a.width, layers=a.sample_layers, adapters=a.adapters, rank=a.rank
            )
        log("start-up probes")
        self.probe("cli", CLI_IMPORTS)
        self.probe("floor", "import torch, safetensors.torch")
        self.probe("steps", STEPS_IMPORTS)
        if names(a.peft):
            self.probe("peft", "import torch, peft, transformers; from peft import PeftModel")
        self.record = self.header(
            machine,
            main_inputs=main.describe(),
            sample_inputs=None if sample is None else sample.describe(),
            startup=self.startup,
        )
        self.record["main"] = self.main_comparison(main, sample)
        self.checkpoint()
        log("breakdown: core on the main inputs" + (", full on the sample" if sample else ""))
        done = [self.breakdown(main, "core", m, 1) for m in names(a.methods)]
        if sample is not None:
            done += [self.breakdown(sample, "full", m, 1) for m in names(a.methods)]
        self.record["breakdown"] = [b for b in done if b is not None]
        self.checkpoint()
        if not a.no_curves:
            self.curves()
        shares = [r["other_cpu_share"] for r in self.record["main"]] or [0.0]
        self.record["contention"] = {
            "main_rows_other_cpu_share_max": max(shares),
            "main_rows_other_cpu_share_mean": round(sum(shares) / len(shares), 3),
        }
        self.finish()
        self.checkpoint()

        md = report.markdown(self.record)
        for base in self.publish(md):
            kinds = "json,md"
            try:
                report.plot(self.record, base.with_suffix(".png"))
                kinds += ",png"
            except ModuleNotFoundError as exc:  # matplotlib: pip install -e ".[bench]"
                log(f"no plot ({exc}; install the [bench] extra)")
            log(f"wrote {base}.{{{kinds}}}")
        print(md)
        shutil.rmtree(self.work, ignore_errors=True)
        return 0
