"""Core-space merges of many modules of any shapes: those of one shape merged in one batch.

Why: on a GPU a module's core merge (docs/methods.md, Algorithm 1) is a chain of small
kernels (two Gram products, two R × R eigendecompositions, the method's R × R work, two
products back) whose launches and host synchronisations cost far more than their arithmetic,
and a Llama-3-8B merge runs 224 such chains one after another. The modules of one kind (every
layer's q_proj, say) share m, n and their adapters' ranks, so the engine merges them as one
group (``worker.engine.core_space.merge_group_in_core_space``: every step is written over a
leading batch dimension), and the number of kernel launches and host round trips per step
stops growing with the number of modules. Each module still takes its own route where values
decide one (the Gram or the QR route to a basis, the ranks TSV keeps), and DARE draws each
module's masks from its own generator, so the results are the unbatched engine's.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from .core_space import merge_group_in_core_space
from .factors import FactorStack, LoraFactors, MergedModule, generators_for, group_key

__all__ = ["merge_stacks_in_core_space", "shape_groups"]


def shape_groups(stacks: Sequence[FactorStack], max_group: int | None = None) -> list[list[int]]:
    """Indices of ``stacks`` grouped by ``group_key``, each group at most ``max_group`` long.

    Groups come in the order of their first member and keep their members' order, so a caller
    that merges the groups one after another can put the results back in input order.
    """
    open_group: dict[Hashable, list[int]] = {}
    groups: list[list[int]] = []
    for i, stack in enumerate(stacks):
        key = group_key(stack)
        current = open_group.get(key)
        if current is None or (max_group is not None and len(current) >= max_group):
            current = open_group[key] = []
            groups.append(current)
        current.append(i)
    return groups


def merge_stacks_in_core_space(
    modules: Sequence[FactorStack | Sequence[LoraFactors]],
    method: str,
    params: Mapping[str, Any],
    rank: int | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    *,
    max_group: int | None = None,
    eigh_device: torch.device | str | None = None,
    consume: bool = False,
    output_rank_mode: str = "auto",
) -> list[MergedModule]:
    """Merge modules of any shapes: grouped by :func:`shape_groups`, each group batched.

    The results come back in the order of ``modules``, each exactly what
    ``merge_in_core_space`` gives for it (``generators``: one per module, as there).
    ``max_group`` caps a group's size: device memory holds a group's stacks, bases and results
    at once. ``consume``, ``output_rank_mode``: as ``merge_group_in_core_space``.
    """
    stacks = [FactorStack.of(m) for m in modules]
    gens = generators_for(generators, len(stacks))
    out: list[MergedModule | None] = [None] * len(stacks)
    for members in shape_groups(stacks, max_group):
        merged = merge_group_in_core_space(
            [stacks[i] for i in members],
            method,
            params,
            rank,
            [gens[i] for i in members],
            eigh_device=eigh_device,
            consume=consume,
            output_rank_mode=output_rank_mode,
        )
        for i, result in zip(members, merged, strict=True):
            out[i] = result
    return out  # type: ignore[return-value]
