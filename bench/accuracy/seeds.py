"""The accuracy benchmark over seeds: mean ± std tables, the verdicts of issue 15, the plot.

Each seed is a run of its own (splits, training, DARE masks; ``run.py`` writes
``accuracy-seed<N>.json``). A row is identified by (variant, source, method, space, rank
limit); its score is the average normalised **test** accuracy over the six tasks. Differences
between two rows are taken **paired by seed** (same adapters, same test examples) and count
only beyond the noise: when |mean| > 2 × its standard error over seeds (std / √n). With three
seeds that is a loose bar, so every verdict also prints the mean ± std it rests on.

Writes ``accuracy-latest.{json,md,png}`` in the results folder.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

__all__ = ["aggregate", "markdown", "write"]

SPACES = ("full", "core", "core-aligned", "core-layer", "knots")
TITLES = {
    "equal": "equal ranks (r = 8 for all six tasks)",
    "mixed": "mixed ranks (4, 4, 8, 8, 16, 16)",
}
#: Mean normalised points (0–100) within which ``alpha: "auto"`` must land of the searched alpha.
AUTO_TARGET = 1.0


def _key(variant: str, row: dict) -> tuple:
    return (variant, row["source"], row["method"], row["space"], row.get("rank_limit"))


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _pm(by_seed: dict[int, float] | None, seeds: int | None = None) -> str:
    """Mean ± std in points; ``(n=…)`` when fewer than ``seeds`` seeds have the value."""
    if not by_seed:
        return "–"
    m, s = _mean_std([100 * x for x in by_seed.values()])
    short = f" (n={len(by_seed)})" if seeds is not None and len(by_seed) < seeds else ""
    return f"{m:.1f} ± {s:.1f}{short}"


def _avg(by_seed: dict[int, float]) -> float:
    return statistics.fmean(by_seed.values())


def _diff(a: dict[int, float], b: dict[int, float]) -> dict:
    """Paired difference a − b in points over the seeds both have: mean, std, and whether it
    is beyond the noise."""
    d = [100 * (a[seed] - b[seed]) for seed in a if seed in b]
    m, s = _mean_std(d)
    se = s / math.sqrt(len(d)) if len(d) > 1 else float("inf")
    return {"mean": round(m, 2), "std": round(s, 2), "n": len(d), "beyond_noise": abs(m) > 2 * se}


def _fmt_diff(d: dict) -> str:
    mark = "" if d["beyond_noise"] else " (noise)"
    return f"{d['mean']:+.1f} ± {d['std']:.1f}{mark}"


def aggregate(per_seed: list[dict]) -> dict:
    """Per row, its values by seed (a row a seed lacks, e.g. from a run stopped early, has
    fewer seeds; rows present in fewer than two seeds are left out when there are several),
    and everything the tables need."""
    seeds = [r["settings"]["seed"] for r in per_seed]
    scores: dict[tuple, dict[int, float]] = {}
    auto: dict[tuple, dict[int, float]] = {}
    alphas: dict[tuple, dict[int, float]] = {}
    auto_alphas: dict[tuple, dict[int, float]] = {}
    candidates: dict[tuple, dict[str, dict[int, float]]] = {}
    best_val: dict[tuple, dict[int, float]] = {}
    finetuned: dict[str, list[list[float]]] = {}
    base: dict[str, list[list[float]]] = {}
    for res in per_seed:
        seed = res["settings"]["seed"]
        for variant, v in res["variants"].items():
            finetuned.setdefault(variant, []).append(v["finetuned"]["test"])
            base.setdefault(variant, []).append(v["base_heads_test_acc"])
            for row in v["rows"]:
                k = _key(variant, row)
                scores.setdefault(k, {})[seed] = row["avg_norm"]
                alphas.setdefault(k, {})[seed] = row["alpha"]
                if "val_curve" in row:
                    best_val.setdefault(k, {})[seed] = max(s for _, s in row["val_curve"])
                if "auto" in row:
                    auto.setdefault(k, {})[seed] = row["auto"]["avg_norm"]
                    auto_alphas.setdefault(k, {})[seed] = row["auto"]["alpha"]["median"]
                    found = row["auto"].get("candidates")
                    if found:
                        c = candidates.setdefault(k, {})
                        for name, cand in found.items():
                            c.setdefault(name, {})[seed] = cand["val_norm"]
                        c.setdefault("auto (per module)", {})[seed] = row["auto"]["val_norm"]
    keep = [k for k, xs in scores.items() if len(xs) >= min(2, len(per_seed))]  # run order
    return {
        "seeds": seeds,
        "scores": {k: scores[k] for k in keep},
        "alphas": {k: alphas[k] for k in keep},
        "auto": {k: auto[k] for k in keep if k in auto},
        "auto_alphas": {k: auto_alphas[k] for k in keep if k in auto_alphas},
        "candidates": {k: c for k, c in candidates.items() if k in keep},
        "best_val": {k: best_val[k] for k in keep if k in best_val},
        "finetuned": finetuned,
        "base_heads": base,
    }


def _variants(agg: dict) -> list[str]:
    return list(dict.fromkeys(k[0] for k in agg["scores"]))


def _rows(agg: dict, variant: str, source: str | None = None, ranked: bool = False) -> list:
    return [
        k for k in agg["scores"]
        if k[0] == variant and (source is None or k[1] == source) and (k[4] is not None) == ranked
    ]  # fmt: skip


def verdicts(agg: dict) -> dict:
    """Issue 15's questions, per variant: auto vs searched per method and space, the best
    core variant vs full per method, the best core merge vs every full, knots and PEFT row."""
    out: dict = {}
    for variant in _variants(agg):
        s = agg["scores"]
        v: dict = {"auto_vs_searched": {}, "best_core_vs_full": {}, "best_core_vs_others": {}}
        for k in _rows(agg, variant, "coremerge"):
            if k in agg["auto"]:
                d = _diff(agg["auto"][k], s[k])
                d["within_target"] = d["mean"] >= -AUTO_TARGET
                v["auto_vs_searched"][f"{k[2]} {k[3]}"] = d
        methods = dict.fromkeys(k[2] for k in _rows(agg, variant, "coremerge"))
        for m in methods:
            cores = [
                k for k in _rows(agg, variant, "coremerge") if k[2] == m and k[3].startswith("core")
            ]
            full = (variant, "coremerge", m, "full", None)
            if cores and full in s:
                best = max(cores, key=lambda k: _avg(s[k]))
                d = _diff(s[best], s[full])
                d["best_core"] = best[3]
                d["at_least_as_good"] = d["mean"] >= 0 or not d["beyond_noise"]
                v["best_core_vs_full"][m] = d
        cores = [k for k in _rows(agg, variant, "coremerge") if k[3].startswith("core")]
        if cores:
            best = max(cores, key=lambda k: _avg(s[k]))
            v["best_core"] = f"{best[2]} {best[3]}"
            for k in _rows(agg, variant):
                if k[1] == "peft" or k[3] in ("full", "knots"):
                    d = _diff(s[best], s[k])
                    d["ahead"] = d["mean"] > 0
                    # the same update (TA, or TSV at equal ranks, is lossless across spaces)
                    d["identical"] = all(s[best][x] == s[k][x] for x in s[best] if x in s[k])
                    v["best_core_vs_others"][f"{k[1]} {k[2]} {k[3]}"] = d
        out[variant] = v
    return out


def markdown(per_seed: list[dict]) -> str:
    agg = aggregate(per_seed)
    ver = verdicts(agg)
    first = per_seed[0]
    st = first["settings"]
    tasks = [t["name"] for t in first["tasks"]]
    lines = [
        f"# Accuracy benchmark over seeds {', '.join(map(str, agg['seeds']))}",
        "",
        f"Machine: {first['machine']['cpu']}, {first['machine']['nproc']} CPUs. Versions: "
        + ", ".join(f"{k} {v}" for k, v in first["versions"].items())
        + f". Per task {st['sizes']['train']} / {st['sizes']['val']} / {st['sizes']['test']} "
        f"train / val / test examples, {st['train']['epochs']} epochs. Scores: average normalised "
        "test accuracy over the six tasks (%, merged ÷ individually fine-tuned), mean ± std over "
        "seeds. A difference is paired by seed and marked (noise) unless |mean| > 2 × std/√n.",
        "",
    ]
    for variant in _variants(agg):
        lines += _variant_md(agg, ver[variant], variant, tasks)
    return "\n".join(lines) + "\n"


def _variant_md(agg: dict, ver: dict, variant: str, tasks: list[str]) -> list[str]:
    s, n = agg["scores"], len(agg["seeds"])
    ft = [statistics.fmean(x) for x in zip(*agg["finetuned"][variant], strict=True)]
    bh = [statistics.fmean(x) for x in zip(*agg["base_heads"][variant], strict=True)]
    lines = [
        f"## {TITLES.get(variant, variant)}",
        "",
        "Test accuracy (%) of each task's own adapter vs the base encoder with that task's "
        "head and no adapter, mean over seeds:",
        "",
        "| | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
        "| fine-tuned | " + " | ".join(f"{100 * a:.1f}" for a in ft) + " |",
        "| base + head | " + " | ".join(f"{100 * a:.1f}" for a in bh) + " |",
        "",
        "| method | " + " | ".join(SPACES) + " | best core − full |",
        "|---|" + "---|" * (len(SPACES) + 1),
    ]
    core_rows = _rows(agg, variant, "coremerge")
    for m in dict.fromkeys(k[2] for k in core_rows):
        cells = [_pm(s.get((variant, "coremerge", m, sp, None)), n) for sp in SPACES]
        d = ver["best_core_vs_full"].get(m)
        lines.append(f"| `{m}` | " + " | ".join(cells) + f" | {_fmt_diff(d) if d else '–'} |")
    peft = _rows(agg, variant, "peft")
    if peft:
        lines += ["", "| PEFT `add_weighted_adapter` | score |", "|---|---|"]
        lines += [f"| `{k[2]}` | {_pm(s[k], n)} |" for k in peft]
    if "best_core" in ver:
        behind = [
            name
            for name, d in ver["best_core_vs_others"].items()
            if not d["ahead"] and not d["identical"]
        ]
        lines += [
            "",
            f"Best core-space merge: **{ver['best_core']}**. "
            + (
                "It is ahead of every full-space, knots and PEFT row (or is the same update)."
                if not behind
                else "Rows it is not ahead of: "
                + ", ".join(f"{n} ({_fmt_diff(ver['best_core_vs_others'][n])})" for n in behind)
                + "."
            ),
        ]
    lines += _auto_md(agg, ver, variant)
    lines += _rank_md(agg, variant)
    return [*lines, ""]


def _auto_md(agg: dict, ver: dict, variant: str) -> list[str]:
    if not ver["auto_vs_searched"]:
        return []
    lines = [
        "",
        '`alpha: "auto"` (data-free, per module) against the alpha searched on validation:',
        "",
        "| merge | searched α | score, searched α | auto α (median) | score, auto | auto − searched |",
        "|---|---|---|---|---|---|",
    ]
    for name, d in ver["auto_vs_searched"].items():
        method, space = name.split(" ", 1)
        k = (variant, "coremerge", method, space, None)
        lines.append(
            f"| {name} | {_avg(agg['alphas'][k]):.2f} | {_pm(agg['scores'][k])} | "
            f"{_avg(agg['auto_alphas'][k]):.2f} | {_pm(agg['auto'][k])} | {_fmt_diff(d)} |"
        )
    cands = {k: c for k, c in agg["candidates"].items() if k[0] == variant}
    if cands:
        names = list(dict.fromkeys(n for c in cands.values() for n in c))
        lines += [
            "",
            "Data-free rules on **validation** (mean normalised %, minus the searched alpha's "
            "validation score), the measurement that chose the rule:",
            "",
            "| merge | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for k, c in cands.items():
            best = agg["best_val"].get(k)
            cells = []
            for n in names:
                xs = c.get(n, {})
                both = [seed for seed in xs if best and seed in best]
                gaps = [100 * (xs[seed] - best[seed]) for seed in both]
                cells.append(f"{statistics.fmean(gaps):+.1f}" if gaps else "–")
            lines.append(f"| {k[2]} {k[3]} | " + " | ".join(cells) + " |")
    return lines


def _rank_md(agg: dict, variant: str) -> list[str]:
    ranked = _rows(agg, variant, ranked=True)
    if not ranked:
        return []
    limits = sorted({k[4] for k in ranked})
    lines = [
        "",
        "Rank limits (`output.rank`), core space, at the full-rank merge's searched alpha; "
        "PEFT `svd` at `svd_rank` (its own default is the largest input rank):",
        "",
        "| merge | " + " | ".join(f"rank {r}" for r in limits) + " | full rank |",
        "|---|" + "---|" * (len(limits) + 1),
    ]
    names = dict.fromkeys((k[1], k[2], k[3]) for k in ranked)
    for source, method, space in names:
        cells = []
        for r in limits:
            k = (variant, source, method, space, r)
            if k not in agg["scores"] and source == "peft":  # PEFT's default rank: its own row
                k = (variant, source, method, space, None)
            cells.append(_pm(agg["scores"].get(k), len(agg["seeds"])))
        full = (
            (variant, source, "cat", "-", None)
            if source == "peft"
            else (variant, source, method, space, None)
        )
        label = f"PEFT {method}" if source == "peft" else f"{method} {space}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_pm(agg['scores'].get(full))} |")
    best = {
        r: max(
            (k for k in ranked if k[4] == r and k[1] == "coremerge"),
            key=lambda k: _avg(agg["scores"][k]),
            default=None,
        )
        for r in limits
    }
    lines += [
        "",
        "Recommended per rank limit: "
        + "; ".join(f"rank {r}: `{k[2]}` ({k[3]})" for r, k in best.items() if k is not None)
        + ".",
    ]
    return lines


def _jsonable(agg: dict) -> dict:
    def keys(d: dict) -> dict:
        return {" | ".join(str(x) for x in k): v for k, v in d.items()}

    return {k: keys(v) if isinstance(v, dict) and v and isinstance(next(iter(v)), tuple) else v
            for k, v in agg.items()}  # fmt: skip


def write(per_seed: list[dict], results: Path) -> None:
    """``accuracy-latest.{json,md,png}`` in ``results``."""
    results.mkdir(parents=True, exist_ok=True)
    agg = aggregate(per_seed)
    blob = {"aggregate": _jsonable(agg), "verdicts": verdicts(agg)}
    (results / "accuracy-latest.json").write_text(json.dumps(blob, indent=2) + "\n")
    (results / "accuracy-latest.md").write_text(markdown(per_seed))
    plot(agg, results / "accuracy-latest.png")


def plot(agg: dict, path: Path) -> None:
    """Bars (mean ± std over seeds) of every searched row, one panel per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = _variants(agg)
    fig, axes = plt.subplots(len(variants), 1, figsize=(15, 4.6 * len(variants)), squeeze=False)
    colours = {"full": "#8c8c8c", "core": "#1f77b4", "core-aligned": "#17becf", "core-layer": "#9467bd",
               "knots": "#ff7f0e", "-": "#2ca02c"}  # fmt: skip
    for ax, variant in zip(axes[:, 0], variants, strict=True):
        keys = _rows(agg, variant)
        labels, seen = [], set()
        for i, k in enumerate(keys):
            xs = [100 * x for x in agg["scores"][k].values()]
            m, sd = _mean_std(xs)
            name = "PEFT" if k[1] == "peft" else k[3]
            ax.bar(i, m, 0.8, yerr=sd, color=colours[k[3]], capsize=2,
                   label=name if name not in seen else None)  # fmt: skip
            seen.add(name)
            labels.append(f"{k[2]}" if k[1] == "coremerge" else f"peft\n{k[2]}")
        ax.set_xticks(range(len(keys)), labels, fontsize=7, rotation=60)
        values = [100 * _avg(agg["scores"][k]) for k in keys]
        ax.set_ylim(max(0, min(values) - 8), max(values) + 5)
        ax.axhline(100, color="k", lw=0.8)
        ax.set_ylabel("avg normalised test acc. (%)")
        ax.set_title(f"{TITLES.get(variant, variant)}: mean ± std over seeds {agg['seeds']}")
        ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
