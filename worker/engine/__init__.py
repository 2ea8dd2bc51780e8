"""The core-space merge engine: pure tensor maths, no I/O (docs/methods.md).

>>> import torch
>>> from worker.engine import LoraFactors, merge_module
>>> g = torch.Generator().manual_seed(0)
>>> fs = [LoraFactors(A=torch.randn(4, 32, generator=g), B=torch.randn(16, 4, generator=g))
...       for _ in range(3)]
>>> merged = merge_module(fs, "ta", {"alpha": 1.0}, space="core")
>>> merged.rank, torch.allclose(merged.B @ merged.A, sum(f.B @ f.A for f in fs), atol=1e-4)
(12, True)
"""

from .batched import merge_group_in_core_space, merge_stacks_in_core_space, shape_groups
from .linalg import NonFiniteError
from .methods import METHOD_FUNCTIONS, apply_method
from .spaces import (
    FactorStack,
    LoraFactors,
    MergedModule,
    core_factors,
    core_matrices,
    merge_in_core_space,
    merge_in_full_space,
    merge_in_knots_space,
    merge_module,
    reference_bases,
)

__all__ = [
    "METHOD_FUNCTIONS",
    "FactorStack",
    "LoraFactors",
    "MergedModule",
    "NonFiniteError",
    "apply_method",
    "core_factors",
    "core_matrices",
    "merge_group_in_core_space",
    "merge_in_core_space",
    "merge_in_full_space",
    "merge_in_knots_space",
    "merge_module",
    "merge_stacks_in_core_space",
    "reference_bases",
    "shape_groups",
]
