"""The reports, from a run's JSON record: the speed profile's Markdown tables and PNG plot,
the engine profile's text table and PASS/FAIL targets, the scale profile's Markdown tables.

python -m bench.speed.report RECORD.json     # speed: re-render RECORD.md and RECORD.png beside it;
                                             # engine: print the table and targets again;
                                             # scale: re-render RECORD.md and print it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

STEPS = ("read", "bases", "project", "merge", "reconstruct", "self_check", "write")
COMPUTE = ("bases", "project", "merge", "reconstruct")
SWEEP_LABEL = {"adapters": "T (adapters)", "rank": "rank r", "width": "width"}


def _f(v: Any, spec: str = ".2f", dash: str = "—") -> str:
    return dash if v is None else format(v, spec)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.0f}%"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _commit(rec: dict[str, Any]) -> str:
    """The commit measured, and whether the product's code had uncommitted changes."""
    project = rec["project"]
    dirty = " (uncommitted changes in worker/service/jobs)" if project["uncommitted"] else ""
    return f"commit {str(project['commit'])[:10]}{dirty}"


def _verdict(t: dict[str, Any]) -> tuple[str, str]:
    """A target's PASS/FAIL/SKIP and its value against the limit (empty without a value)."""
    verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[t["passed"]]
    if t.get("value") is None:
        return verdict, ""
    unit = " " + t["unit"] if t.get("unit") else ""
    return verdict, f": {t['value']} (limit {t['limit']}{unit})"


def machine_lines(rec: dict[str, Any]) -> list[str]:
    m, c = rec["machine"], rec.get("contention", {})
    threads = next((b.get("threads") for b in rec.get("breakdown", []) if b.get("threads")), None)
    mi = rec["main_inputs"]
    lines = [
        f"- **Machine**: {m['cpu_model']}, {m['nproc']} CPUs, {m['ram_total_gib']} GiB RAM, "
        f"{m['platform']}; Python {m['python']}, torch {m['torch']}, peft {m['peft']}, "
        f"safetensors {m['safetensors']}; GPUs: {', '.join(m['gpus']) or 'none'}; "
        f"child processes' OMP/MKL threads: {m.get('child_threads', 'torch default')}"
        f"{f' (torch reports {threads})' if threads else ''}.",
        f"- **Run**: {rec['created_at']}, {_commit(rec)}"
        + f", device `{rec['config']['device']}`, {_f(rec.get('run_wall_s'), '.0f')} s in all; "
        f"load average {m.get('load_average_start')} at start, {m.get('load_average_end')} at end; "
        f"CPU busy elsewhere during the main rows: mean {_pct(c.get('main_rows_other_cpu_share_mean'))}, "
        f"max {_pct(c.get('main_rows_other_cpu_share_max'))}.",
        f"- **Inputs** (main comparison): {mi['adapters']} PEFT LoRA adapters, rank {mi['rank']}, "
        f"lora_alpha {mi['lora_alpha']}, {mi['layers']} Llama-3-shaped layers of width {mi['hidden']} "
        f"(q,o {mi['hidden']}→{mi['hidden']}; k,v →{mi['kv']}; gate,up →{mi['mlp']}; down "
        f"{mi['mlp']}→{mi['hidden']}), {mi['modules']} modules, {mi['inputs_bytes'] / 2**20:.0f} MiB "
        f"{mi['dtype']}. "
        + (
            f"Full space and PEFT `svd`/`ties_svd` ran on {rec['sample_inputs']['layers']} "
            f"layer(s) and are scaled to {mi['layers']} (start-up once, the work × layers)."
            if rec.get("sample_inputs")
            else "Full space and PEFT `svd`/`ties_svd` were skipped (`--sample-layers 0`)."
        ),
    ]
    return lines


def main_tables(rec: dict[str, Any]) -> list[str]:
    """The main comparison (method × space), the PEFT peers, every row, the start-up."""
    out = _space_table(rec)
    peers = [r for r in rec["main"] if r["kind"] == "peft"]
    if peers:
        out += _peft_table(peers)
    out += ["", "### Every row", "", *_every_row_table(rec["main"])]
    st = rec.get("startup", {})
    out += [
        "",
        "Start-up (a process that only imports): "
        + ", ".join(f"{k} {v['wall_s']:.2f} s / {v['rss_mib']:.0f} MiB" for k, v in st.items())
        + ".",
    ]
    return out


def _space_table(rec: dict[str, Any]) -> list[str]:
    """Each method's wall time in core, knots and full space, and the spaces' ratios."""
    rows = {r["name"]: r for r in rec["main"]}
    methods = [r["method"] for r in rec["main"] if r["kind"] == "core"]
    floor = rows.get("floor", {})
    out = [
        "## Main comparison: method × space, whole process",
        "",
        f"Floor (read every input + write a rank-Σr output, `bench/speed/floor.py`): "
        f"**{_f(floor.get('wall_s'))} s**. Each cell: wall s (× floor). `full` and `knots` ÷ `core` "
        "is how many times slower than core space the same method is.",
        "",
    ]

    def cell(r: dict[str, Any] | None) -> str:
        return "—" if r is None else f"{r['wall_s']:.2f} ({r['x_floor']:.1f}×)"

    body = []
    for meth in methods:
        c, k, f = (rows.get(f"{s} {meth}") for s in ("core", "knots", "full"))
        body.append(
            [
                f"`{meth}`",
                cell(c),
                cell(k),
                cell(f),
                _f(k and k.get("x_core")),
                _f(f and f.get("x_core")),
                _f(f and f.get("x_core_work"), ".0f"),
            ]
        )
    head = ["method", "core", "knots", "full (scaled)", "knots ÷ core", "full ÷ core"]
    return out + _table([*head, "full ÷ core, in-process work"], body)


def _peft_table(peers: list[dict[str, Any]]) -> list[str]:
    """PEFT's combinations against the core method computing the same kind of result."""
    out = [
        "",
        "## Against PEFT `add_weighted_adapter` (Llama skeleton of the same shapes)",
        "",
        "Whole process = import transformers+peft, build the skeleton, load the T adapters, "
        "merge, save. *work* = that without the imports. ÷ core compares with the coremerge "
        "core-space method that computes the same kind of result (`cat`, `svd`, `linear` ↔ "
        "`ta`; `ties`, `ties_svd` ↔ `ties`).",
        "",
    ]
    body = []
    for r in peers:
        ph = r.get("phases_s", {})
        body.append(
            [
                f"peft `{r['method']}`" + (f" (×{r['scale']:g})" if r["scaled"] else ""),
                _f(r["wall_s"]),
                _f(r["x_floor"], ".1f"),
                f"{r['compared_with']}",
                _f(r.get("x_core")),
                _f(r.get("work_s")),
                _f(r.get("x_core_work")),
                _f(ph.get("merge_s"), ".3f"),
                str(r.get("output_rank")),
                _f(r.get("peak_minus_startup_mib"), ".0f"),
            ]
        )
    head = ["peer", "wall s", "× floor", "vs", "÷ core (wall)", "work s", "÷ core (work)"]
    head += ["add_weighted_adapter s (measured)", "out rank", "peak − start-up MiB"]
    return out + _table(head, body)


def _every_row_table(rows: list[dict[str, Any]]) -> list[str]:
    """Every row of the main comparison with its memory, contention and attempts."""
    body = []
    for r in rows:
        body.append(
            [
                r["name"] + (f" (×{r['scale']:g})" if r["scaled"] else ""),
                _f(r["wall_s"]),
                _f(r["measured_wall_s"]),
                _f(r["x_floor"]),
                _f(r.get("work_s"), ".3f"),
                _f(r["peak_rss_mib"], ".0f"),
                _f(r.get("peak_minus_startup_mib"), ".0f"),
                str(r.get("output_rank") or "—"),
                _pct(r["other_cpu_share"]),
                " / ".join(f"{a['wall_s']:.2f}" for a in r["attempts"]),
            ]
        )
    head = ["row", "wall s", "measured s", "× floor", "in-process work s", "peak RSS MiB"]
    head += ["peak − start-up MiB", "out rank", "CPU busy elsewhere", "attempts s"]
    return _table(head, body)


def breakdown_table(rec: dict[str, Any]) -> list[str]:
    b = rec.get("breakdown") or []
    if not b:
        return []
    out = [
        "## Where the time goes (in-process, `bench/speed/steps.py`)",
        "",
        "Seconds summed over modules; core on the main inputs, full on the sample (not scaled). "
        "`engine` = `merge_module` timed on the same factors (what the runner calls).",
        "",
    ]
    body = []
    for r in b:
        s = r["steps_s"]
        comp = r["compute_s"] or 1e-12
        body.append(
            [
                f"{r['space']} `{r['method']}` ({r['layers']} L)",
                *(_f(s[k], ".3f") for k in STEPS),
                _f(r["compute_s"], ".3f"),
                " / ".join(f"{100 * s[k] / comp:.0f}" for k in COMPUTE),
                _f(r.get("engine_merge_module_s"), ".3f"),
                _f(r["import_s"]),
                _f(r["wall_s"]),
            ]
        )
    out += _table(
        [
            "space method",
            "read",
            "bases",
            "project",
            "merge",
            "reconstruct",
            "self-check",
            "write",
            "compute Σ",
            "% bases/proj/merge/recon",
            "engine",
            "import",
            "process wall",
        ],
        body,
    )
    return out


def curve_tables(rec: dict[str, Any]) -> list[str]:
    cur = rec.get("curves")
    if not cur:
        return []
    pts = cur["points"]
    method = rec["config"]["curve_method"]
    out = [
        f"## Scaling curves (`{method}`, one Llama-3-shaped layer, 7 modules)",
        "",
        "compute = bases + projection + merge + reconstruction (in-process, steps harness); "
        "wall = the steps harness's whole process (start-up, read, compute, write; for core "
        "less the time of its `merge_module` cross-check); CLI = "
        "`coremerge merge` whole process. Memory = peak RSS − start-up RSS.",
        "",
    ]
    for sweep, keys in cur["sweeps"].items():
        out += [f"### {SWEEP_LABEL[sweep]}", ""]
        body = []
        for key in keys:
            p = pts.get(key)
            if p is None:
                continue
            c, f, cli = p["core_steps"], p.get("full_steps"), p["core_cli"]
            s = c["steps_s"]
            body.append(
                [
                    str(p[sweep]),
                    f"{p['inputs_bytes'] / 2**20:.0f}",
                    _f(c["compute_s"], ".3f"),
                    " / ".join(_f(s[k], ".3f") for k in ("read", *COMPUTE, "write")),
                    _f(_core_wall(c)),
                    _f(cli["wall_s"]),
                    _f(f and f["compute_s"], ".2f", p.get("full_skipped", "—")),
                    _f(f and f["wall_s"]),
                    _f(f and f["compute_s"] / max(c["compute_s"], 1e-9), ".0f"),
                    _f(c["peak_minus_startup_mib"], ".0f"),
                    _f(cli["peak_minus_startup_mib"], ".0f"),
                    _f(f and f["peak_minus_startup_mib"], ".0f"),
                ]
            )
        out += _table(
            [
                SWEEP_LABEL[sweep],
                "inputs MiB",
                "core compute s",
                "core read / bases / proj / merge / recon / write s",
                "core wall s",
                "core CLI wall s",
                "full compute s",
                "full wall s",
                "full ÷ core compute",
                "core MiB",
                "core CLI MiB",
                "full MiB",
            ],
            body,
        )
        out.append("")
    return out


def markdown(rec: dict[str, Any]) -> str:
    lines = ["# Speed benchmark (`bench/speed`)", "", *machine_lines(rec), ""]
    lines += [*main_tables(rec), "", *breakdown_table(rec), "", *curve_tables(rec)]
    if rec.get("failures"):
        lines += ["", "## Failed steps", ""]
        lines += [
            f"- `{f['step']}`: {f['error'].strip().splitlines()[-1]}" for f in rec["failures"]
        ]
    lines += [
        "",
        "Ratios are taken within this one run (same machine, same load). Wall times are the "
        "fastest of the attempts listed; CPU busy elsewhere is the share of all CPUs other "
        "processes used during the kept attempt: above a few % the figure is inflated. "
        "Rows marked (×N) ran on the sample and are scaled; their memory is the sample's.",
    ]
    return "\n".join(lines).rstrip() + "\n"


def plot(rec: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    _plot_main(axes[0][0], rec)
    cur = rec.get("curves")
    if cur:
        for ax, sweep in zip(
            (axes[0][1], axes[0][2], axes[1][0]), ("adapters", "rank", "width"), strict=True
        ):
            _plot_curve(ax, cur, sweep)
        _plot_memory(axes[1][1], cur)
        _plot_breakdown(axes[1][2], cur)
    else:
        for ax in (axes[0][1], axes[0][2], axes[1][0], axes[1][1], axes[1][2]):
            ax.axis("off")
    m = rec["machine"]
    fig.suptitle(
        f"coremerge speed — {m['cpu_model']}, {m['nproc']} CPUs, torch {m['torch']}, "
        f"device {rec['config']['device']}, {rec['created_at']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_main(ax, rec: dict[str, Any]) -> None:
    rows = {r["name"]: r for r in rec["main"]}
    methods = [r["method"] for r in rec["main"] if r["kind"] == "core"]
    width = 0.27
    colours = {"core": "tab:blue", "knots": "tab:orange", "full": "tab:red"}
    for i, space in enumerate(("core", "knots", "full")):
        xs, ys = [], []
        for j, meth in enumerate(methods):
            r = rows.get(f"{space} {meth}")
            if r:
                xs.append(j + (i - 1) * width)
                ys.append(r["x_floor"])
        ax.bar(
            xs,
            ys,
            width,
            label=space + (" (scaled)" if space == "full" else ""),
            color=colours[space],
        )
    peers = [r for r in rec["main"] if r["kind"] == "peft"]
    base = len(methods)
    for j, r in enumerate(peers):
        ax.bar(base + j, r["x_floor"], 0.6, color="tab:green", label="PEFT" if j == 0 else None)
    ax.set_xticks(range(base + len(peers)))
    ax.set_xticklabels(methods + [f"peft\n{r['method']}" for r in peers], fontsize=8)
    ax.axhline(1.0, color="black", lw=0.8, ls="--", label="floor (I/O)")
    ax.set_yscale("log")
    ax.set_ylabel("whole-process wall ÷ floor")
    mi = rec["main_inputs"]
    ax.set_title(
        f"T={mi['adapters']}, r={mi['rank']}, {mi['layers']} layers of width {mi['hidden']}",
        fontsize=10,
    )
    top = max(r["x_floor"] for r in rec["main"] if r.get("x_floor"))
    ax.set_ylim(top=top * 15)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper left", ncol=3)


def _core_wall(steps: dict[str, Any]) -> float:
    """The steps harness's wall time without its ``merge_module`` cross-check."""
    return steps["wall_s"] - (steps.get("engine_merge_module_s") or 0.0)


def _series(cur: dict[str, Any], sweep: str):
    keys = [k for k in cur["sweeps"][sweep] if k in cur["points"]]
    pts = [cur["points"][k] for k in keys]
    return [p[sweep] for p in pts], pts


def _plot_curve(ax, cur: dict[str, Any], sweep: str) -> None:
    xs, pts = _series(cur, sweep)
    if not pts:
        ax.set_title(f"time vs {SWEEP_LABEL[sweep]}: no points measured", fontsize=10)
        ax.axis("off")
        return
    ax.plot(
        xs,
        [p["core_steps"]["compute_s"] for p in pts],
        "o-",
        color="tab:blue",
        label="core compute",
    )
    ax.plot(
        xs,
        [_core_wall(p["core_steps"]) for p in pts],
        "o--",
        color="tab:blue",
        alpha=0.6,
        label="core wall",
    )
    ax.plot(
        xs,
        [p["core_cli"]["wall_s"] for p in pts],
        "o:",
        color="tab:cyan",
        label="core CLI wall",
    )
    fx = [x for x, p in zip(xs, pts, strict=True) if p.get("full_steps")]
    full = [p["full_steps"] for p in pts if p.get("full_steps")]
    if full:
        ax.plot(fx, [f["compute_s"] for f in full], "s-", color="tab:red", label="full compute")
        ax.plot(
            fx, [f["wall_s"] for f in full], "s--", color="tab:red", alpha=0.6, label="full wall"
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel(SWEEP_LABEL[sweep])
    ax.set_ylabel("seconds")
    ax.set_title(f"time vs {SWEEP_LABEL[sweep]} (1 layer)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def _plot_memory(ax, cur: dict[str, Any]) -> None:
    for sweep, marker in (("adapters", "o"), ("rank", "^"), ("width", "s")):
        xs, pts = _series(cur, sweep)
        if not pts:
            continue
        ax.plot(
            xs,
            [max(1.0, p["core_cli"]["peak_minus_startup_mib"]) for p in pts],
            marker + "-",
            label=f"core CLI, {SWEEP_LABEL[sweep]}",
        )
        fx = [x for x, p in zip(xs, pts, strict=True) if p.get("full_steps")]
        fy = [
            max(1.0, p["full_steps"]["peak_minus_startup_mib"]) for p in pts if p.get("full_steps")
        ]
        if fx:
            ax.plot(fx, fy, marker + ":", label=f"full, {SWEEP_LABEL[sweep]}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T, r or width (each sweep from the base point)")
    ax.set_ylabel("peak RSS − start-up, MiB")
    ax.set_title("memory (1 layer)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def _plot_breakdown(ax, cur: dict[str, Any]) -> None:
    keys = list(dict.fromkeys(k for v in cur["sweeps"].values() for k in v if k in cur["points"]))
    parts = ("read", *COMPUTE, "self_check", "write")
    totals = [sum(cur["points"][k]["core_steps"]["steps_s"][p] for p in parts) for k in keys]
    bottom = [0.0] * len(keys)
    for part in parts:
        vals = [
            cur["points"][k]["core_steps"]["steps_s"][part] / max(t, 1e-12)
            for k, t in zip(keys, totals, strict=True)
        ]
        ax.bar(range(len(keys)), vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for i, t in enumerate(totals):
        ax.text(i, 1.01, f"{t:.2g}s", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("share of the in-process steps (total above)")
    ax.set_title("core: where the time goes, per curve point", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", ncol=4)


# ----------------------------------------------------------------------------- engine profile


def timings_line(timings: dict[str, float]) -> str:
    """A merge report's timings on one line: seconds where the key says so (``_s``)."""
    return ", ".join(
        f"{k} {v:.2f} s" if k.endswith("_s") else f"{k} {v:g}" for k, v in timings.items()
    )


def engine_table(rows: list[dict[str, Any]]) -> list[str]:
    def fmt(v: Any, spec: str) -> str:
        width = int(spec.split(".")[0])
        return "—".rjust(width) if v is None else format(v, spec)

    names = [r["name"] + (" *" if r.get("contended") else "") for r in rows]
    width = max(map(len, names), default=4)
    head = (
        f"{'name':<{width}} {'wall s':>9} {'× floor':>8} {'peak RSS MiB':>13} "
        f"{'peak − start-up MiB':>20} {'inputs GiB':>11} {'CPU busy elsewhere':>19}"
    )
    out = [head, "-" * len(head)]
    for name, r in zip(names, rows, strict=True):
        share = r.get("other_cpu_share")
        out.append(
            f"{name:<{width}} {fmt(r['wall_s'], '9.2f')} {fmt(r['ratio_to_floor'], '8.2f')} "
            f"{fmt(r.get('peak_rss_mib'), '13.0f')} {fmt(r.get('peak_minus_startup_mib'), '20.0f')} "
            f"{fmt(r['inputs_gib'], '11.2f')} {fmt(None if share is None else 100 * share, '18.0f')}"
            + ("" if share is None else "%")
        )
    out.append(
        "CPU busy elsewhere: share of all CPUs' time used by other processes during the step "
        "(a shared machine); well above a few % means the wall time is inflated."
    )
    if any(r.get("contended") for r in rows):
        out.append("* no run of this step was free of contention: its figures are unreliable.")
    return out


def engine_text(rec: dict[str, Any]) -> str:
    """The engine profile's table, the merges' own timings, the cross-check and the targets."""
    w, m, st = rec["config"]["workload"], rec["machine"], rec["startup"]
    lines = [
        f"engine benchmark: {w['adapters']} adapters × rank {w['rank']}, {w['layers']} layers of "
        f"Llama-3 shapes (width {w['hidden']}), inputs {rec['inputs_bytes'] / 2**30:.2f} GiB "
        f"{w['dtype']}, device {rec['config']['device']}; {m['nproc']} CPUs ({m['cpu_model']}), "
        f"{m['ram_total_gib']} GiB RAM, torch {m['torch']}",
        "start-up: "
        + ", ".join(f"{k} {v['wall_s']:.2f} s / {v['rss_mib']:.0f} MiB RSS" for k, v in st.items()),
        "",
        *engine_table(rec["rows"]),
        "",
    ]
    lines += [f"{r['name']}: {timings_line(r['timings'])}" for r in rec["rows"] if r.get("timings")]
    module = (rec.get("reference") or {}).get("dump_module")
    for method, err in rec.get("cross_check_rel_error", {}).items():
        lines.append(f"cross-check core {method} vs reference ({module}): rel. error {err:.1e}")
    for f in rec.get("failures", []):
        lines.append(f"FAILED {f['step']}: {f['error'].strip().splitlines()[-1]}")
    lines.append("")
    for t in rec["targets"]:
        verdict, value = _verdict(t)
        lines.append(f"[{verdict}] {t['target']}{value}")
        if t.get("note"):
            lines.append(f"       {t['note']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- scale profile


def _gib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f} GiB"


def scale_markdown(rec: dict[str, Any]) -> str:
    """The scale profile's tables (one per workload), how they were scaled, and the targets."""
    lines = _scale_intro(rec)
    for wl in rec["workloads"]:
        lines += _scale_workload(wl)
    if any(r.get("contended") for wl in rec["workloads"] for r in wl["rows"]):
        lines += [
            "\\* no run of this row was free of contention (other processes used more than "
            f"{100 * rec['config']['max_contention']:.0f}% of the CPUs): its wall time is inflated.",
            "",
        ]
    for f in rec.get("failures", []):
        lines.append(f"- FAILED {f['step']}: {f['error'].strip().splitlines()[-1][-400:]}")
    lines += ["## Targets", ""]
    for t in rec["targets"]:
        verdict, value = _verdict(t)
        lines.append(
            f"- **{verdict}** {t['target']}{value}" + (f"; {t['note']}" if t.get("note") else "")
        )
    return "\n".join(lines) + "\n"


def _scale_intro(rec: dict[str, Any]) -> list[str]:
    """The machine, the run, what each row is, how it is scaled, the targets."""
    m, cfg = rec["machine"], rec["config"]
    st = rec["startup"]
    return [
        "# Scale benchmark (issue 16, item 4)",
        "",
        f"- **Machine**: {m['cpu_model']}, {m['nproc']} CPUs, {m['ram_total_gib']} GiB RAM; "
        f"Python {m['python']}, torch {m['torch']}; child threads: "
        f"{m.get('child_threads', 'torch default')}; load average {m.get('load_average_start')} "
        f"at start, {m.get('load_average_end')} at end.",
        f"- **Run**: {rec['created_at']}, {_commit(rec)}"
        + f", device `{cfg['device']}`, inputs {cfg['input_dtype']}, output float32 (the CLI's "
        f"default), {_f(rec.get('run_wall_s'), '.0f')} s in all. Start-up (imports only): "
        + ", ".join(f"{k} {v['wall_s']:.1f} s / {v['rss_mib']:.0f} MiB" for k, v in st.items())
        + ".",
        "- **Rows**: each a fresh process on the sampled layers, page cache warm. *floor* = "
        "`floor.py` (read every input tensor, stream a float32 output of the core merge's size); "
        "*GEMM floor* = `floor.py --gemm` (below each table); "
        "*core m* = `python -m worker.cli merge … --space core --method m`.",
        "- **Scaling**: wall(N layers) = (wall − in-process) + in-process × N / sample: start-up "
        "once, the work linear in the layers (in-process = the CLI's `timings.total_s`, the "
        "floor's own clock). Memory is as measured on the sample (module-by-module streaming); "
        "*est. all* is the CLI's own estimate of the peak for all N layers, from its plan on "
        "header-only inputs of the full size.",
        "- **Targets** (on the sample): peak RSS − start-up < "
        f"{cfg['targets']['peak_minus_startup_mib_below']} MiB; wall ≤ "
        f"{cfg['targets']['floor_factor']:g}× the floor's.",
        "",
    ]


def _scale_workload(wl: dict[str, Any]) -> list[str]:
    """One workload: its sizes, its table, the CLI's limit, the GEMM floor, the timings."""
    full, si = wl["full"], wl["sample_inputs"]
    n, s = full["layers"], wl["sample_layers"]
    lines = [
        f"## {wl['title']}: R = {full['adapters'] * full['rank']}, {n} layers, "
        f"sample {s} (×{wl['scale_factor']:.3g})",
        "",
        f"Sample inputs {_gib(si['inputs_bytes'])} {full['dtype']} ({si['modules']} modules); "
        f"all {n} layers would be {_gib(wl['full_inputs_bytes'])} of inputs and "
        f"{_gib(wl['full_output_bytes'])} of float32 output.",
        "",
    ]
    head = ["row", "sample wall s", "× floor", "in-process s", f"scaled to {n} layers s"]
    head += ["× floor (scaled)", "peak RSS MiB", "peak − start-up MiB", "est. sample / all MiB"]
    lines += _table([*head, "CPU busy elsewhere"], [_scale_cells(r) for r in wl["rows"]])
    limit = next((r["memory_limit_mib"] for r in wl["rows"] if r.get("memory_limit_mib")), None)
    if limit:
        lines += ["", f"The CLI's default working-memory limit here: {limit / 1024:.1f} GiB."]
    gemm = next((r for r in wl["rows"] if r.get("kind") == "gemm"), None)
    if gemm is not None:
        lines += ["", _gemm_note(gemm, wl["rows"])]
    timed = [r for r in wl["rows"] if r.get("timings")]
    if timed:
        lines += [""] + [f"- {r['name']}: {timings_line(r['timings'])}" for r in timed]
    lines.append("")
    return lines


def _scale_cells(r: dict[str, Any]) -> list[str]:
    """One row of a workload's table (a failed merge: its name and the CLI's estimate)."""
    if r.get("failed"):
        return (
            [f"{r['name']} (FAILED{', refused' if r.get('refused') else ''})"]
            + ["—"] * 7
            + [f"{_f(r.get('estimated_peak_mib'), '.0f')} / —", "—"]
        )
    est = "—"
    if r.get("estimated_peak_mib") is not None:
        est = f"{r['estimated_peak_mib']:.0f} / {_f(r.get('estimated_peak_all_layers_mib'), '.0f')}"
    return [
        r["name"] + (" *" if r.get("contended") else ""),
        _f(r["wall_s"]),
        _f(r.get("ratio_to_floor")),
        _f(r.get("in_process_s")),
        _f(r.get("scaled_wall_s"), ".0f"),
        _f(r.get("scaled_ratio_to_floor")),
        _f(r.get("peak_rss_mib"), ".0f"),
        _f(r.get("peak_minus_startup_mib"), ".0f"),
        est,
        _pct(r.get("other_cpu_share")),
    ]


def _gemm_note(gemm: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The GEMM floor's line under a workload's table, each merge's time against it."""
    versus = ", ".join(
        f"{r['name']} {r['in_process_to_gemm']}×"
        for r in rows
        if r.get("in_process_to_gemm") is not None
    )
    return (
        f"*GEMM floor*: no I/O, the three products per module that a core merge "
        f"through the reference bases cannot avoid (two Gram matrices and the map back "
        f"on the narrower side: "
        f"{gemm['flops'] / 1e12:.2f} Tflop on the sample) at {gemm['gflops_per_s']} "
        f"GFLOP/s: {gemm['in_process_s']:.2f} s in-process. A merge's in-process time "
        f"against it: {versus or '—'}. Plain `ta` does none of them (stacked factors)."
    )


def main(argv: list[str] | None = None) -> int:
    for name in argv if argv is not None else sys.argv[1:]:
        path = Path(name)
        rec = json.loads(path.read_text())
        if rec.get("benchmark") == "engine":
            print(engine_text(rec))
            continue
        if rec.get("benchmark") == "scale":
            path.with_suffix(".md").write_text(scale_markdown(rec))
            print(scale_markdown(rec))
            continue
        path.with_suffix(".md").write_text(markdown(rec))
        plot(rec, path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
