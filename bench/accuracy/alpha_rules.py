"""Data-free rules for the global scale alpha, measured against the searched alpha (issue 15).

coremerge's ``alpha: "auto"`` is the per-module energy match (``worker.engine.methods.auto_alpha``),
run through the product path. The rules here are the other candidates, each one number for the
whole merge, computed from the task updates ΔW_t and the merged update X at alpha 1 (all
``{module: tensor}``), so the benchmark can score them on validation beside it:

- ``energy_global``: √(Σ_modules mean_t ‖ΔW_t‖² / Σ_modules ‖X‖²), the energy match over the
  whole adapter instead of per module;
- ``spectral``: mean over modules of (mean_t ‖ΔW_t‖₂) / ‖X‖₂, matching the largest singular
  value instead of the energy;
- ``inv_sqrt_t``: 1/√T, what the energy match gives for task arithmetic of orthogonal tasks;
- ``inv_t``: 1/T, an average.
"""

from __future__ import annotations

import math

import torch

__all__ = ["TaskStats", "global_rules"]


class TaskStats:
    """Per module, the tasks' mean energy ‖ΔW_t‖²_F and mean spectral norm ‖ΔW_t‖₂: computed
    once per adapter set, since every merge of the set is scored against the same tasks."""

    def __init__(self, task_deltas: list[dict[str, torch.Tensor]]) -> None:
        self.tasks = len(task_deltas)
        self.energy: dict[str, float] = {}
        self.spectral: dict[str, float] = {}
        for module in dict.fromkeys(m for d in task_deltas for m in d):
            ups = [d[module].double() for d in task_deltas if module in d]
            self.energy[module] = sum(float(u.square().sum()) for u in ups) / len(ups)
            self.spectral[module] = sum(
                float(torch.linalg.matrix_norm(u, ord=2)) for u in ups
            ) / len(ups)


def global_rules(stats: TaskStats, merged: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each candidate rule's alpha for the merge ``merged`` (at alpha 1)."""
    task_energy = merged_energy = 0.0
    spectral = []
    for module, x in merged.items():
        task_energy += stats.energy[module]
        merged_energy += float(x.double().square().sum())
        top = float(torch.linalg.matrix_norm(x.double(), ord=2))
        if top > 0:
            spectral.append(stats.spectral[module] / top)
    return {
        "energy_global": math.sqrt(task_energy / merged_energy) if merged_energy > 0 else 1.0,
        "spectral": sum(spectral) / len(spectral) if spectral else 1.0,
        "inv_sqrt_t": 1 / math.sqrt(stats.tasks),
        "inv_t": 1 / stats.tasks,
    }
