"""One adapter set (equal or mixed ranks) merged every way and evaluated: the rows of a run.

A row is one merge: coremerge (a method in a space, with its params), a PEFT combination, or
a rank-limited merge for the rank table. Every full-rank row gets the paper's alpha search on
validation, then one test evaluation at the chosen alpha. A coremerge row also gets the
merge with ``alpha: "auto"`` (evaluated at scale 1 on validation and test), and, with
``--alpha-candidates``, the validation score of the other data-free rules that were measured
against it (:mod:`bench.accuracy.alpha_rules`). A rank row is evaluated on test at the alpha
its full-rank row's search chose, so the table shows what truncation alone costs.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.accuracy import alpha_rules
from bench.accuracy.merges import (
    PEFT_EQUAL_RANK,
    PEFT_MIXED_RANK,
    Merged,
    coremerge_merge,
    load_peft_model,
    peft_merge,
)
from bench.accuracy.model import accuracy, add_deltas
from bench.accuracy.search import Evaluator, linear_search
from bench.accuracy.tasks import TASK_NAMES
from bench.accuracy.train import lora_deltas

__all__ = ["METHODS", "PEFT_DARE_DENSITY", "PEFT_DENSITY", "CoreRow", "run_variant"]

#: In the order they run: the paper's headline methods first, so a run cut short has them.
METHODS = ("ta", "tsv", "iso_c", "ties", "cart", "dare_ties", "dare")
#: The entry-wise methods, which also run in core space on aligned axes (docs/methods.md).
ALIGNED_METHODS = ("ties", "dare_ties", "dare")
#: The methods whose kept ranks count from K, which also run with the layer's K in core space.
LAYER_METHODS = ("tsv", "cart")
#: PEFT's TIES/magnitude trim keeps this share of entries, coremerge's ties default (0.1);
#: its DARE keeps 1 − coremerge's default drop (0.3).
PEFT_DENSITY = {"ties": 0.1, "ties_svd": 0.1, "magnitude_prune": 0.1}
PEFT_DARE_DENSITY = 0.7
#: ΔWs closer than this (relative, per module) to one already evaluated share its evaluation
#: (TA is the same update in every space, and PEFT's ``cat`` is TA too).
SAME_DELTA_REL = 1e-5


@dataclass(frozen=True)
class CoreRow:
    """A coremerge merge: ``method`` in ``space`` with ``params``; ``label`` names the space
    in the tables (``core-aligned`` for core space with ``axes: "aligned"``)."""

    method: str
    space: str
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.params.get("axes") == "aligned":
            return "core-aligned"
        return "core-layer" if self.params.get("rank_of") == "layer" else self.space


def core_rows(methods: list[str], spaces: list[str], knots: list[str]) -> list[CoreRow]:
    """Full and core for every method (core-aligned too for the entry-wise ones, core-layer for
    TSV and CART), knots for
    ``knots`` methods last; the headline methods first."""
    first = [sp for sp in spaces if sp in ("full", "core")]
    rows = []
    for m in methods:
        rows += [CoreRow(m, sp) for sp in first]
        if m in ALIGNED_METHODS and "core" in first:
            rows.append(CoreRow(m, "core", {"axes": "aligned"}))
        if m in LAYER_METHODS and "core" in first:
            rows.append(CoreRow(m, "core", {"rank_of": "layer"}))
    if "knots" in spaces:
        rows += [CoreRow(m, "knots") for m in knots if m in methods]
    return rows


def rank_rows(spec: str) -> list[CoreRow]:
    """``ta,tsv,ties:aligned`` → the core rows of the rank table."""
    out = []
    for item in filter(None, spec.split(",")):
        method, _, axes = item.partition(":")
        out.append(CoreRow(method, "core", {"axes": axes} if axes else {}))
    return out


def finetuned_accuracies(ev: Evaluator, adapter_dirs: list[Path]) -> dict[str, list[float]]:
    """Each task's accuracy with its own adapter and head (the normaliser)."""
    out: dict[str, list[float]] = {"val": [], "test": []}
    for t, d in enumerate(adapter_dirs):
        with add_deltas(ev.encoder, lora_deltas(d)):
            for split in out:
                out[split].append(accuracy(ev.encoder, ev.heads[t], ev.splits[split][t]))
    return out


def _same_delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(float((a[k] - b[k]).norm()) <= SAME_DELTA_REL * float(b[k].norm()) for k in b)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


class _Variant:
    """The state of one variant's run: evaluator, rows so far, and the save callback."""

    def __init__(self, name: str, ev: Evaluator, args: argparse.Namespace, out: dict, save,
                 log: Callable[[str], None], task_deltas: list[dict[str, torch.Tensor]],
                 step: float, max_alpha: float) -> None:  # fmt: skip
        self.name, self.ev, self.args, self.out, self.save, self.log = (
            name,
            ev,
            args,
            out,
            save,
            log,
        )
        self.task_deltas, self.step, self.max_alpha = task_deltas, step, max_alpha
        self.seen: list[tuple[dict[str, torch.Tensor], dict]] = []
        self.stats: alpha_rules.TaskStats | None = None
        self.seen_auto: list[tuple[dict[str, torch.Tensor], dict]] = []

    def evaluate(self, deltas: dict[str, torch.Tensor], scale: float, split: str) -> list[float]:
        return self.ev.normalised(self.ev.accuracies(deltas, scale, split), split)

    def searched(self, merged: Merged) -> dict:
        """The alpha search's result, or that of an identical ΔW evaluated before."""
        twin = next((row for d, row in self.seen if _same_delta(merged.deltas, d)), None)
        if twin is not None:
            keys = ("alpha", "val_curve", "test_acc", "test_norm", "avg_acc", "avg_norm")
            return {
                **{k: twin[k] for k in keys},
                "same_delta_as": f"{twin['source']} {twin['method']} {twin['space']}",
            }
        early = None if self.args.no_early_stop else 2
        res = linear_search(self.ev, merged.deltas, self.step, self.max_alpha, early)
        return {
            "alpha": res.alpha,
            "val_curve": res.val_curve,
            "test_acc": [round(a, 5) for a in res.test_acc],
            "test_norm": [round(a, 5) for a in res.test_norm],
            "avg_acc": round(res.avg_acc, 5),
            "avg_norm": round(res.avg_norm, 5),
        }

    def add(self, row: dict, merged: Merged | None = None) -> dict:
        self.out["rows"].append(row)
        if merged is not None and "same_delta_as" not in row:
            self.seen.append((merged.deltas, row))
        auto = row.get("auto")
        self.log(
            f"[{self.name}] {row['source']} {row['method']} {row['space']}"
            + (f" rank≤{row['rank_limit']}" if "rank_limit" in row else "")
            + f": alpha {row['alpha']:g}, norm {row['avg_norm']:.3f}"
            + (f", auto {auto['avg_norm']:.3f} (α≈{auto['alpha']['median']:.3g})" if auto else "")
            + f", merge {row['merge_seconds']:.2f}s, eval {row['eval_seconds']:.0f}s"
        )
        self.save()
        return row

    def rank_row(
        self,
        source: str,
        method: str,
        space: str,
        limit: int,
        alpha: float,
        merged: Merged,
        started: float,
    ) -> dict:
        """A rank-table row: ``merged`` (truncated to ``limit``) on test at ``alpha``."""
        test = self.evaluate(merged.deltas, alpha, "test")
        return {"source": source, "kind": "rank", "method": method, "space": space,
                "rank_limit": limit, "alpha": alpha, "test_norm": [round(a, 5) for a in test],
                "avg_norm": round(_mean(test), 5), "merge_seconds": round(merged.seconds, 3),
                "rank": merged.rank, "eval_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip

    def auto(self, core: CoreRow, merged_one: Merged, dirs: list[Path], scratch: Path) -> dict:
        """The same merge with ``alpha: "auto"``, evaluated at scale 1; with candidates, the
        other data-free rules' validation scores."""
        names = list(TASK_NAMES)
        auto = coremerge_merge(
            core.method, core.space, dirs, names, scratch / "auto",
            {**core.params, "alpha": "auto"}, seed=self.args.seed,
        )  # fmt: skip
        twin = next((a for d, a in self.seen_auto if _same_delta(auto.deltas, d)), None)
        if twin is not None:  # TA: the same update in every space, "auto" included
            out = {k: v for k, v in twin.items() if k != "candidates"}
        else:
            val = self.evaluate(auto.deltas, 1.0, "val")
            test = self.evaluate(auto.deltas, 1.0, "test")
            out = {
                "alpha": auto.detail["alpha"],
                "val_norm": round(_mean(val), 5),
                "test_norm": [round(a, 5) for a in test],
                "avg_norm": round(_mean(test), 5),
            }
            self.seen_auto.append((auto.deltas, out))
        if self.args.alpha_candidates and twin is None:
            if self.stats is None:
                self.stats = alpha_rules.TaskStats(self.task_deltas)
            rules = alpha_rules.global_rules(self.stats, merged_one.deltas)
            out["candidates"] = {
                name: {"alpha": round(a, 5), "val_norm": round(_mean(self.evaluate(
                    merged_one.deltas, a, "val")), 5)}
                for name, a in rules.items()
            }  # fmt: skip
        return out


def run_variant(
    variant: str,
    adapter_dirs: list[Path],
    ranks: list[int],
    spaces: list[str],
    ev: Evaluator,
    base,
    args: argparse.Namespace,
    step: float,
    max_alpha: float,
    out: dict,
    save,
    log: Callable[[str], None],
) -> None:
    """Merge every way, search alpha, evaluate; fills ``out`` and calls ``save()`` after each
    row, so a run cut short still leaves its results so far."""
    names = list(TASK_NAMES)
    _baselines(variant, ev, adapter_dirs, ranks, out, log)
    task_deltas = [lora_deltas(d) for d in adapter_dirs]
    state = _Variant(variant, ev, args, out, save, log, task_deltas, step, max_alpha)
    scratch = args.out / "merged" / f"{variant}-{args.seed}-{time.time_ns()}"
    combos = (
        [] if args.no_peft else list(PEFT_EQUAL_RANK if len(set(ranks)) == 1 else PEFT_MIXED_RANK)
    )
    model = load_peft_model(base, adapter_dirs, names) if combos else None
    rows = core_rows(args.methods.split(","), spaces, args.knots_methods.split(","))
    by_label = _coremerge_rows(state, rows, adapter_dirs, names, scratch)
    peft_rows = _peft_rows(state, model, combos, names)
    limits = [int(k) for k in filter(None, args.rank_limits.split(","))]
    _core_rank_rows(state, limits, by_label, adapter_dirs, names, scratch)
    _peft_rank_rows(state, limits, peft_rows, model, names)
    del model
    shutil.rmtree(scratch, ignore_errors=True)


def _baselines(
    variant: str, ev: Evaluator, adapter_dirs: list[Path], ranks: list[int], out: dict, log
) -> None:
    """The variant's yardsticks in ``out``: each task's fine-tuned accuracy (the normaliser)
    and the base encoder with the task heads and no adapter."""
    ev.finetuned = finetuned_accuracies(ev, adapter_dirs)
    log(
        f"[{variant}] fine-tuned test accuracy: "
        + ", ".join(f"{a:.3f}" for a in ev.finetuned["test"])
    )
    base_test = ev.accuracies(None, 0.0, "test")
    out.update(
        {
            "ranks": ranks,
            "finetuned": {k: [round(a, 5) for a in v] for k, v in ev.finetuned.items()},
            "base_heads_test_acc": [round(a, 5) for a in base_test],
            "base_heads_test_norm": [round(a, 5) for a in ev.normalised(base_test, "test")],
            "rows": [],
        }
    )


def _coremerge_rows(
    state: _Variant, rows: list[CoreRow], adapter_dirs: list[Path], names: list[str], scratch: Path
) -> dict[tuple[str, str], dict]:
    """Every coremerge row with its alpha search (and ``alpha: "auto"`` in full and core);
    returns them by (method, space label) for the rank table's alphas."""
    by_label: dict[tuple[str, str], dict] = {}
    for core in rows:
        t0 = time.perf_counter()
        merged = coremerge_merge(
            core.method, core.space, adapter_dirs, names, scratch / "one", core.params,
            seed=state.args.seed,
        )  # fmt: skip
        row = {"source": "coremerge", "method": core.method, "space": core.label,
               "params": core.params, **state.searched(merged)}  # fmt: skip
        if core.space in ("core", "full"):
            row["auto"] = state.auto(core, merged, adapter_dirs, scratch)
        row.update(merge_seconds=round(merged.seconds, 3), rank=merged.rank,
                   detail=merged.detail, eval_seconds=round(time.perf_counter() - t0, 1))  # fmt: skip
        by_label[core.method, core.label] = state.add(row, merged)
    return by_label


def _peft_rows(state: _Variant, model, combos: list[str], names: list[str]) -> dict[str, dict]:
    """Every PEFT combination with the same alpha search; returns them by combination."""
    peft_rows: dict[str, dict] = {}
    for combo in combos:
        t0 = time.perf_counter()
        density = PEFT_DARE_DENSITY if combo.startswith("dare") else PEFT_DENSITY.get(combo)
        merged = peft_merge(model, names, combo, density=density, seed=state.args.seed)
        row = {"source": "peft", "method": combo, "space": "-", **state.searched(merged),
               "merge_seconds": round(merged.seconds, 3), "rank": merged.rank,
               "detail": merged.detail, "eval_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        peft_rows[combo] = state.add(row, merged)
    return peft_rows


def _core_rank_rows(
    state: _Variant,
    limits: list[int],
    by_label: dict[tuple[str, str], dict],
    adapter_dirs: list[Path],
    names: list[str],
    scratch: Path,
) -> None:
    """The rank table's coremerge rows, each at its full-rank row's alpha (none without it)."""
    for core in rank_rows(state.args.rank_methods):
        full = by_label.get((core.method, core.label))
        for k in limits if full is not None else []:
            t0 = time.perf_counter()
            merged = coremerge_merge(
                core.method, core.space, adapter_dirs, names, scratch / "rank", core.params,
                seed=state.args.seed, rank=k,
            )  # fmt: skip
            state.add(
                state.rank_row("coremerge", core.method, core.label, k, full["alpha"], merged, t0)
            )


def _peft_rank_rows(
    state: _Variant, limits: list[int], peft_rows: dict[str, dict], model, names: list[str]
) -> None:
    """The rank table's PEFT rows: its ``svd`` combination at each rank limit."""
    if "svd" not in peft_rows:
        return
    for k in limits:
        if k == peft_rows["svd"]["rank"]:
            continue  # PEFT's default svd rank is the largest input rank: that row exists
        t0 = time.perf_counter()
        merged = peft_merge(model, names, "svd", seed=state.args.seed, svd_rank=k)
        state.add(state.rank_row("peft", "svd", "-", k, peft_rows["svd"]["alpha"], merged, t0))
