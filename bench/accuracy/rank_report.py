"""Tables and plot of the rank study (``ranked.py``): truncation against shared bases, per rank.

Reads ``accuracy-rank-seed<N>.json`` (the study) and, when present, the main benchmark's
``accuracy-seed<N>.json`` of the same seeds for the searched-alpha and PEFT ``svd`` rows, and
writes ``accuracy-rank-latest.{md,png}``:

    .venv/bin/python -m bench.accuracy.rank_report bench/results

Scores are the average normalised test accuracy over the six tasks (%), mean ± std over the
seeds each row has (``n=`` says how many when fewer than the study's).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

__all__ = ["aggregate", "markdown", "write"]

#: ranked.py's methods isotropized after the cut to rank k.
ISOTROPIZED_AFTER_CUT = ("iso_c_k", "tsv_iso_k")
MODE_TITLES = {
    "truncate": "truncate",
    "truncate-rescaled": "truncate, α after",
    "shared-b0": "shared β=0",
    "shared": "shared β=1",
}


def _seed_files(results: Path, stem: str) -> list[tuple[int, dict]]:
    """(seed, data) of every ``<stem>-seed<N>[-tag].json``: runs side by side (``--tag``)
    add their rows to the same seed."""
    out = []
    for path in sorted(results.glob(f"{stem}-seed*.json")):
        data = json.loads(path.read_text())
        seed = data.get("seed", data.get("settings", {}).get("seed"))
        out.append((int(seed), data))
    return out


def aggregate(results: Path) -> dict:
    """{(variant, method, mode, rank): {seed: score}}, the alpha-1 scores, and the main
    benchmark's searched (core) and PEFT svd scores of the same seeds."""
    study = _seed_files(results, "accuracy-rank")
    seeds = {seed for seed, _ in study}
    main = [(s, d) for s, d in _seed_files(results, "accuracy") if s in seeds]
    scores: dict[tuple, dict[int, float]] = {}
    alpha_one: dict[tuple, dict[int, float]] = {}
    for seed, data in study:
        for variant, v in data["variants"].items():
            for row in v["rows"]:
                mode = row["mode"]
                if row["method"] in ISOTROPIZED_AFTER_CUT and mode == "truncate-rescaled":
                    mode = "truncate"  # their alpha is always taken after the cut
                key = (variant, row["method"], mode, row["rank"])
                scores.setdefault(key, {})[seed] = row["avg_norm"]
                if "alpha_one_avg_norm" in row:
                    alpha_one.setdefault(key, {})[seed] = row["alpha_one_avg_norm"]
    searched: dict[tuple, dict[int, float]] = {}
    measured = {(variant, seed) for seed, data in study for variant in data["variants"]}
    for seed, data in main:
        for variant, v in data["variants"].items():
            if (variant, seed) not in measured:  # compare on the study's own seeds only
                continue
            for row in v["rows"]:
                if row["source"] == "coremerge" and row["space"] == "core":
                    key = (variant, row["method"], "searched", row.get("rank_limit"))
                elif row["source"] == "peft" and row["method"] == "svd":  # default: max rank
                    key = (variant, "peft_svd", "searched", row.get("rank_limit") or row["rank"])
                else:
                    continue
                searched.setdefault(key, {})[seed] = row["avg_norm"]
    return {"seeds": sorted(seeds), "scores": scores, "alpha_one": alpha_one,
            "searched": searched}  # fmt: skip


def _pm(by_seed: dict[int, float] | None, n: int) -> str:
    if not by_seed:
        return "–"
    xs = [100 * x for x in by_seed.values()]
    if len(xs) == 1:
        return f"{xs[0]:.1f}" + (" (n=1)" if n > 1 else "")
    short = f" (n={len(xs)})" if len(xs) < n else ""
    return f"{statistics.fmean(xs):.1f} ± {statistics.stdev(xs):.1f}{short}"


def _mean(by_seed: dict[int, float]) -> float:
    return statistics.fmean(by_seed.values())


def _best(scores: dict, keys: list[tuple]) -> tuple:
    """The best mean among the rows measured on the most seeds (a one-seed row does not win
    over a two-seed mean by luck of its seed)."""
    most = max(len(scores[k]) for k in keys)
    return max((k for k in keys if len(scores[k]) == most), key=lambda k: _mean(scores[k]))


def _rank_table(agg: dict, variant: str) -> list[str]:
    """Methods × (rank, mode) at auto alpha, full rank last; the best cell per rank in bold."""
    s, n = agg["scores"], len(agg["seeds"])
    keys = [k for k in s if k[0] == variant]
    ranks = sorted({k[3] for k in keys if k[3] is not None})
    modes = [m for m in MODE_TITLES if any(k[2] == m for k in keys)]
    cols = [(r, m) for r in ranks for m in modes if any(k[3] == r and k[2] == m for k in keys)]
    methods = list(dict.fromkeys(k[1] for k in keys))
    best = {r: _best(s, [k for k in keys if k[3] == r]) for r in ranks}
    head = [f"rank {r}: {MODE_TITLES[m]}" for r, m in cols]
    lines = [
        "| method | " + " | ".join(head) + " | full rank |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for method in methods:
        cells = []
        for r, m in cols:
            cell = _pm(s.get((variant, method, m, r)), n)
            cells.append(f"**{cell}**" if best[r] == (variant, method, m, r) else cell)
        cells.append(_pm(s.get((variant, method, "full", None)), n))
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    firsts = {r: m for r, m in reversed(cols)}  # the first column of each rank
    svd = [
        _pm(agg["searched"].get((variant, "peft_svd", "searched", r)), n) if firsts[r] == m else ""
        for r, m in cols
    ]
    if any(c not in ("–", "") for c in svd):
        lines.append("| PEFT `svd` (searched α) | " + " | ".join(svd) + " | – |")
    rec = "; ".join(f"rank {r}: `{best[r][1]}` {MODE_TITLES[best[r][2]]}" for r in ranks)
    return [*lines, "", f"Recommended per rank (best mean at auto alpha, most seeds): {rec}."]


def _alpha_table(agg: dict, variant: str) -> list[str]:
    """Full-rank core merges at alpha 1 (the paper's default), auto, and searched."""
    n = len(agg["seeds"])
    rows = [k for k in agg["alpha_one"] if k[0] == variant]
    if not rows:
        return []
    lines = ["| method | alpha 1 | alpha auto | searched alpha | auto − alpha 1 |",
             "|---|---|---|---|---|"]  # fmt: skip
    for k in rows:
        one, auto = agg["alpha_one"][k], agg["scores"].get(k, {})
        searched = agg["searched"].get((variant, k[1], "searched", None))
        gain = [100 * (auto[x] - one[x]) for x in one if x in auto]
        diff = f"{statistics.fmean(gain):+.1f}" if gain else "–"
        lines.append(f"| `{k[1]}` | {_pm(one, n)} | {_pm(auto, n)} | {_pm(searched, n)} | {diff} |")
    return lines


def markdown(agg: dict) -> str:
    lines = [
        f"# Merging at a serving rank: truncation vs shared bases (seeds {agg['seeds']})",
        "",
        "Average normalised test accuracy over the six tasks (%), mean ± std over seeds, every "
        'merge at `alpha: "auto"` (the energy rule on the method\'s own inputs). `truncate`: '
        "the core merge cut to rank k (today's `output.rank`); `shared β`: Tucker-2 bases "
        "shared by all tasks, the method on the k × k coordinates (β = 0: tasks rescaled to "
        "the mean norm before the fit). Produced by `bench/accuracy/ranked.py`.",
    ]
    for variant in dict.fromkeys(k[0] for k in agg["scores"]):
        lines += ["", f"## {variant} ranks", "", *_rank_table(agg, variant)]
        alpha = _alpha_table(agg, variant)
        if alpha:
            lines += ["", "Default alpha against `auto` and searched (full rank, core):", ""]
            lines += alpha
    return "\n".join(lines) + "\n"


#: The methods the plot draws (the table has every one).
PLOTTED = ("tsv", "iso_c", "ta", "ties", "iso_c_k", "tsv_iso_k")


def plot(agg: dict, path: Path) -> None:
    """Per variant: score against rank for the headline methods, truncation dotted, shared
    bases (β = 0) solid, the best full-rank merge of the study as a grey line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(k[0] for k in agg["scores"]))
    fig, axes = plt.subplots(1, len(variants), figsize=(7 * len(variants), 4.5), squeeze=False)
    for ax, variant in zip(axes[0], variants, strict=True):
        keys = [k for k in agg["scores"] if k[0] == variant]
        for i, method in enumerate(m for m in PLOTTED if any(k[1] == m for k in keys)):
            for mode, style in (("truncate", ":"), ("shared-b0", "-")):
                pts = sorted((k[3], 100 * _mean(agg["scores"][k])) for k in keys
                             if k[1] == method and k[2] == mode and k[3] is not None)  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, marker="o", color=f"C{i}",
                            label=f"{method} {MODE_TITLES[mode]}")  # fmt: skip
        full = [100 * _mean(agg["scores"][k]) for k in keys if k[2] == "full"]
        if full:
            ax.axhline(max(full), color="grey", lw=1, label="best full rank (study)")
        ax.set_xticks(sorted({k[3] for k in keys if k[3] is not None}))
        ax.set_xlabel("output rank k")
        ax.set_ylabel("avg normalised test acc. (%), auto alpha")
        ax.set_title(f"{variant} ranks, seeds {agg['seeds']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(results: Path) -> None:
    agg = aggregate(results)
    (results / "accuracy-rank-latest.md").write_text(markdown(agg))
    plot(agg, results / "accuracy-rank-latest.png")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results"))
