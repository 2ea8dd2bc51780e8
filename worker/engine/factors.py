"""What the engine takes and gives: each adapter's factors of one module, their stacks, and
the merged module.

Input: for each adapter t that has the module, its factors with the scaling s_t and the job
weight w_t already folded into B: ΔW_t = B_t A_t, B_t (m × r_t), A_t (r_t × n). Output: the
merged update as a LoRA pair ``B @ A`` (scaling 1), so it is written as an adapter as is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import overload

import torch
from torch import Tensor

__all__ = [
    "FactorStack",
    "LoraFactors",
    "MergedModule",
    "check_group",
    "generators_for",
    "group_key",
    "rank_slices",
    "stack_group",
]


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's update for one module, ΔW = B @ A, scaling and weight folded into B."""

    A: Tensor  # (r, n)
    B: Tensor  # (m, r)


def rank_slices(ranks: Iterable[int]) -> list[slice]:
    """Each adapter's columns of the stacked B (rows of the stacked A), from their ranks."""
    out, start = [], 0
    for r in ranks:
        out.append(slice(start, start + r))
        start += r
    return out


class FactorStack(Sequence[LoraFactors]):
    """One module's T updates side by side: B = [B_1 … B_T] (m × R), A = [A_1; …; A_T] (R × n).

    Core space decomposes exactly these two stacks. Indexing gives each adapter's
    ``LoraFactors`` as views, so a stack serves wherever a sequence of factors is expected.
    The runner fills one in place as it reads the adapters, which spares the engine a copy
    of every input; :meth:`of` stacks separate factors.
    """

    def __init__(self, B: Tensor, A: Tensor, ranks: Sequence[int]) -> None:
        if B.shape[1] != sum(ranks) or A.shape[0] != sum(ranks):
            raise ValueError(
                f"stacks of shapes {tuple(B.shape)} and {tuple(A.shape)} do not hold ranks {ranks}"
            )
        self.B, self.A, self.ranks = B, A, tuple(ranks)
        self._slices = rank_slices(self.ranks)

    @classmethod
    def of(cls, factors: Sequence[LoraFactors]) -> FactorStack:
        """``factors`` stacked (a ``FactorStack`` is returned as is)."""
        if isinstance(factors, FactorStack):
            return factors
        return cls(
            torch.cat([f.B for f in factors], dim=1),
            torch.cat([f.A for f in factors], dim=0),
            [f.A.shape[0] for f in factors],
        )

    @property
    def slices(self) -> list[slice]:
        """Each adapter's columns of B (rows of A)."""
        return list(self._slices)

    @property
    def layer_k(self) -> int:
        """min(m, n) of the layer."""
        return min(self.B.shape[0], self.A.shape[1])

    def __len__(self) -> int:
        return len(self.ranks)

    @overload
    def __getitem__(self, index: int) -> LoraFactors: ...
    @overload
    def __getitem__(self, index: slice) -> list[LoraFactors]: ...
    def __getitem__(self, index: int | slice) -> LoraFactors | list[LoraFactors]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        sl = self._slices[index]
        return LoraFactors(A=self.A[sl], B=self.B[:, sl])


@dataclass(frozen=True)
class MergedModule:
    """The merged update ΔW ≈ B @ A and what the merge report records about it."""

    B: Tensor  # (m, k)
    A: Tensor  # (k, n)
    kept_energy: float | None = None  # set when output.rank truncated the update
    residual: float | None = None  # core space self-check (docs/guarantees.md); None elsewhere
    alpha: float = 1.0  # the scale applied: params.alpha, or what "auto" resolved to
    # With output.rank: the update's singular values before the cut (descending; before an
    # isotropic cut flattens them), from which output.rank "auto" chooses its rank.
    spectrum: Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def group_key(stack: FactorStack) -> tuple:
    """What modules must share to be merged in one batch: shapes, ranks, dtype and device."""
    return (tuple(stack.B.shape), tuple(stack.A.shape), stack.ranks, stack.B.dtype, stack.B.device)


def check_group(stacks: Sequence[FactorStack]) -> None:
    """Raise ``ValueError`` unless every stack has the first one's :func:`group_key`."""
    first = group_key(stacks[0])
    for i, stack in enumerate(stacks[1:], start=1):
        if group_key(stack) != first:
            raise ValueError(
                f"module {i} of the group does not match module 0 (B {tuple(stack.B.shape)}, "
                f"A {tuple(stack.A.shape)}, ranks {stack.ranks}, {stack.B.dtype} on "
                f"{stack.B.device}; expected {first}): merge it in another group"
            )


def _batched(tensors: Sequence[Tensor]) -> tuple[Tensor, bool]:
    """``torch.stack(tensors)`` and True, or, without a copy, the one (G, …) tensor whose
    slices 0 … G−1 they already are (or a module's own tensor, viewed with a leading
    dimension of one) and False."""
    base = tensors[0]._base
    if (
        base is not None
        and base.shape == (len(tensors), *tensors[0].shape)
        and all(
            t._base is base
            and t.data_ptr() == base[g].data_ptr()
            and t.stride() == base[g].stride()
            for g, t in enumerate(tensors)
        )
    ):
        return base, False
    if len(tensors) == 1:
        return tensors[0][None], False
    return torch.stack(list(tensors)), True


def stack_group(stacks: Sequence[FactorStack]) -> tuple[Tensor, Tensor, bool]:
    """The group's B stacks (G × m × R), A stacks (G × R × n), and whether they are copies.
    A caller that reads a group's factors straight into one batched buffer
    (``FactorStack(B=buffer_B[g], A=buffer_A[g], ranks)``) saves the group's size in memory
    and a pass over it."""
    B, copied_B = _batched([s.B for s in stacks])
    A, copied_A = _batched([s.A for s in stacks])
    return B, A, copied_B and copied_A


def generators_for(
    generators: Sequence[torch.Generator | None] | None, count: int
) -> list[torch.Generator]:
    """One generator per module; a missing one is a fresh seed-0 generator."""
    if generators is None:
        generators = [None] * count
    if len(generators) != count:
        raise ValueError(f"{len(generators)} generators for {count} modules: one per module")
    return [torch.Generator().manual_seed(0) if g is None else g for g in generators]
