"""Evaluation of a merged update on every task, and the paper's linear search for its scale.

The search follows the reference code's ``*_linearsearch.py`` scripts: try alpha = step,
2·step, … in order, keep the alpha with the best average normalised validation accuracy (a tie
moves the choice to the later alpha, as there), and stop after two evaluations in a row that
do not improve it (``EARLY_STOPPING_STEPS = 2``). Unlike there, a best alpha on the edge of the
grid is followed past the edge (issue 15: several searches ended on the grid's first point). The
chosen alpha is then evaluated once on the test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from bench.accuracy.model import Batches, accuracy, add_deltas

__all__ = ["EARLY_STOPPING_STEPS", "Evaluator", "SearchResult", "linear_search"]

EARLY_STOPPING_STEPS = 2


@dataclass
class Evaluator:
    """The base encoder, each task's head and pre-tokenised splits, and the fine-tuned
    accuracies that normalise a merged model's ("merged ÷ individually fine-tuned")."""

    encoder: nn.Module
    tasks: list[str]
    heads: list[nn.Module]  # per task, of the adapter set being merged
    splits: dict[str, list[Batches]]  # split -> per task
    finetuned: dict[str, list[float]] = field(default_factory=dict)  # split -> per task
    evaluations: int = 0

    def accuracies(
        self, deltas: dict[str, torch.Tensor] | None, scale: float, split: str
    ) -> list[float]:
        self.evaluations += 1
        with add_deltas(self.encoder, deltas or {}, scale):
            return [
                accuracy(self.encoder, head, batches)
                for head, batches in zip(self.heads, self.splits[split], strict=True)
            ]

    def normalised(self, accs: list[float], split: str) -> list[float]:
        return [
            a / f if f > 0 else float("nan")
            for a, f in zip(accs, self.finetuned[split], strict=True)
        ]


@dataclass
class SearchResult:
    alpha: float
    val_curve: list[tuple[float, float]]  # (alpha, average normalised val accuracy)
    test_acc: list[float]
    test_norm: list[float]

    @property
    def avg_acc(self) -> float:
        return sum(self.test_acc) / len(self.test_acc)

    @property
    def avg_norm(self) -> float:
        return sum(self.test_norm) / len(self.test_norm)


def linear_search(
    ev: Evaluator,
    deltas: dict[str, torch.Tensor],
    step: float,
    max_alpha: float,
    early_stopping: int | None = EARLY_STOPPING_STEPS,
    extend: bool = True,
) -> SearchResult:
    """``early_stopping=None`` evaluates the whole grid (step … max_alpha).

    ``extend``: a best alpha on the grid's edge is not a choice but a limit of the grid, so
    the search goes on past it while the score improves: below the first point by halving
    (step/2, step/4, …, down to step/16), above the last by the same step (up to 4·max_alpha).
    """
    patience0 = early_stopping or 10**9
    best_alpha, best, patience, curve = step, -1.0, patience0, []

    def score(alpha: float) -> float:
        norm = ev.normalised(ev.accuracies(deltas, alpha, "val"), "val")
        curve.append((alpha, round(sum(norm) / len(norm), 5)))
        return sum(norm) / len(norm)

    n, stopped = 1, False
    while n * step <= max_alpha + 1e-9:
        alpha = round(n * step, 6)
        value = score(alpha)
        if value >= best:
            best_alpha, best, patience = alpha, value, patience0
        else:
            patience -= 1
            if patience == 0:
                stopped = True
                break
        n += 1
    if extend and best_alpha == round(step, 6):
        alpha = step / 2
        while alpha >= step / 16 - 1e-12 and (value := score(round(alpha, 6))) > best:
            best_alpha, best = round(alpha, 6), value
            alpha /= 2
    elif extend and not stopped and best_alpha >= max_alpha - step + 1e-9:
        alpha = best_alpha + step
        while alpha <= 4 * max_alpha + 1e-9 and (value := score(round(alpha, 6))) >= best:
            best_alpha, best = round(alpha, 6), value
            alpha += step
    curve.sort()
    test = ev.accuracies(deltas, best_alpha, "test")
    return SearchResult(best_alpha, curve, test, ev.normalised(test, "test"))
