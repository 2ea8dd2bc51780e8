"""The core-space merge engine: pure tensor maths, no I/O (docs/methods.md).

>>> import torch
>>> from worker.engine import LoraFactors, merge_module
>>> g = torch.Generator().manual_seed(0)
>>> fs = [LoraFactors(A=torch.randn(4, 32, generator=g), B=torch.randn(16, 4, generator=g))
...       for _ in range(3)]
>>> merged = merge_module(fs, "ta", {"alpha": 1.0}, space="core")
>>> merged.rank, torch.allclose(merged.B @ merged.A, sum(f.B @ f.A for f in fs), atol=1e-4)
(12, True)

The house: ``linalg`` (thin SVDs and bases) ← ``methods`` (the method table) ←
``core_space`` (Algorithm 1 for groups of modules) ← ``spaces`` (full and knots space, the
space table) and ``batched`` (grouping modules by shape); ``factors`` holds the data types,
``ledger`` the memory cost declarations every step carries.
"""

from .batched import merge_stacks_in_core_space, shape_groups
from .core_space import (
    core_factors,
    core_matrices,
    merge_group_in_core_space,
    merge_in_core_space,
    reference_bases,
)
from .factors import FactorStack, LoraFactors, MergedModule
from .linalg import NonFiniteError
from .methods import METHODS, Tasks, apply_method, merge_tasks
from .spaces import SPACES, merge_in_full_space, merge_in_knots_space, merge_module

__all__ = [
    "METHODS",
    "SPACES",
    "FactorStack",
    "LoraFactors",
    "MergedModule",
    "NonFiniteError",
    "Tasks",
    "apply_method",
    "core_factors",
    "core_matrices",
    "merge_group_in_core_space",
    "merge_in_core_space",
    "merge_in_full_space",
    "merge_in_knots_space",
    "merge_module",
    "merge_stacks_in_core_space",
    "merge_tasks",
    "reference_bases",
    "shape_groups",
]
