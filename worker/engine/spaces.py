"""Merging one module's LoRA updates in core, full or knots space (docs/methods.md).

Core space is ``worker.engine.core_space`` (the paper's Algorithm 1, for groups of modules);
full space (the baseline: the method on the dense ΔW_t) and knots space (KnOTS: the method on
the per-task blocks of one SVD of the updates side by side) are here, with :data:`SPACES`, the
table of the three: each space's merge and the cost beside it (``worker.engine.ledger``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .core_space import core_space_cost, merge_in_core_space
from .factors import FactorStack, LoraFactors, MergedModule
from .ledger import F32, Ledger
from .linalg import (
    factored_svd,
    factored_svd_cost,
    isotropize,
    isotropize_cost,
    numerical_ranks,
    qr_cost,
    svd,
    svd_cost,
    truncate,
)
from .methods import (
    Tasks,
    TaskShape,
    merge_tasks,
    merge_tasks_cost,
    rank_mode,
    resolve_alphas,
    task_energies,
)

__all__ = [
    "SPACES",
    "Space",
    "knots_components",
    "merge_in_full_space",
    "merge_in_knots_space",
    "merge_module",
]


def _dense_to_lora(dW: Tensor, rank: int | None, *, flatten: bool = False) -> MergedModule:
    """Factor a dense update (m × n) exactly (numerical rank) or truncated to ``rank`` by its
    SVD (``flatten``: an isotropic cut); the kept energy and the spectrum when truncated."""
    U, S, Vh = svd(dW)
    k = int(numerical_ranks(S, tuple(dW.shape))) if rank is None else rank
    B, A, kept = truncate(U, S, Vh, k, flatten=flatten and rank is not None)
    if rank is None:
        return MergedModule(B=B, A=A)
    return MergedModule(B=B, A=A, kept_energy=kept[0], spectrum=S)


def _dense_to_lora_cost(L: Ledger, m: int, n: int, rank: int | None) -> int:
    """B = U_k S_k is new, A = Vh[:k] is a view that keeps the whole Vh alive (returned)."""
    K = min(m, n)
    k = K if rank is None else min(rank, K)
    factors = svd_cost(L, 1, m, n)
    B = L.alloc(F32 * m * k)
    L.free(factors)
    return B + L.alloc(F32 * K * n)


def merge_in_full_space(
    factors: Sequence[LoraFactors],
    method: str,
    params: Mapping[str, Any],
    rank: int | None = None,
    generator: torch.Generator | None = None,
    *,
    output_rank_mode: str = "auto",
) -> MergedModule:
    """The baseline: the method on the dense ΔW_t = B_t A_t (m × n each); with ``rank``,
    the dense result truncated (or cut and flattened: ``methods.rank_mode``)."""
    m, n = factors[0].B.shape[0], factors[0].A.shape[1]
    dWs = torch.empty(1, len(factors), m, n, dtype=factors[0].B.dtype, device=factors[0].B.device)
    for t, f in enumerate(factors):
        torch.matmul(f.B, f.A, out=dWs[0, t])
    tasks = Tasks(matrices=dWs, layer_k=min(m, n), generators=[_generator(generator)])
    del dWs
    flat = rank is not None and rank_mode(method, params, output_rank_mode) == "isotropic"
    dW, alphas = merge_tasks(method, tasks, params, isotropize_later=flat)
    del tasks
    return replace(_dense_to_lora(dW[0], rank, flatten=flat), alpha=alphas[0])


def full_space_cost(
    L: Ledger, m: int, n: int, ranks: Sequence[int], method: str, params: Mapping[str, Any],
    rank: int | None, *, output_rank_mode: str = "auto",
) -> int:  # fmt: skip
    """:func:`merge_in_full_space`: T dense updates, the method, the SVD of the result."""
    shape = TaskShape(1, len(ranks), m, n, None, min(m, n))
    dense = L.alloc(shape.X * shape.T)
    flat = rank is not None and rank_mode(method, params, output_rank_mode) == "isotropic"
    dW, _ = merge_tasks_cost(L, shape, method, params, isotropize_later=flat)
    L.free(dense)
    out = _dense_to_lora_cost(L, m, n, rank)
    L.free(dW)
    return out


def knots_components(factors: Sequence[LoraFactors]) -> tuple[Tensor, Tensor, Tensor]:
    """U, S and the per-task blocks V_t of the SVD of [ΔW_1 … ΔW_T] (m × T·n), from the factors:
    U (m × k), S (k) and the blocks as one (T × k × n) tensor.

    [B_1A_1 … B_TA_T] = B_stack · blockdiag(A_1 … A_T). With B_stack = Qb Rb and A_tᵀ = Q_t R_t,
    the stack is Qb · Rb · blockdiag(R_tᵀ) · blockdiag(Q_tᵀ): the SVD of the R × R middle gives
    U, S, and V_tᵀ = (the middle's Vh, columns of task t) · Q_tᵀ. Keeps S > 1e-5 as the
    reference does.
    """
    Qb, Rb = torch.linalg.qr(FactorStack.of(factors).B, mode="reduced")
    qrs = [torch.linalg.qr(f.A.mT, mode="reduced") for f in factors]
    middle = Rb @ torch.block_diag(*[R.mT for _, R in qrs])
    Us, S, Vhs = svd(middle)
    keep = S > 1e-5
    Us, S, Vhs = Us[:, keep], S[keep], Vhs[keep]
    n = factors[0].A.shape[1]
    blocks = torch.empty(len(factors), S.shape[0], n, dtype=S.dtype, device=S.device)
    start = 0
    for t, (Q, R) in enumerate(qrs):
        k = R.shape[0]
        torch.matmul(Vhs[:, start : start + k], Q.mT, out=blocks[t])
        start += k
    return Qb @ Us, S, blocks


def _knots_components_cost(L: Ledger, m: int, n: int, ranks: Sequence[int]) -> tuple[int, int, int]:
    """:func:`knots_components`: (the bytes of the blocks, of U, both kept; k, the kept rank)."""
    T, R = len(ranks), sum(ranks)
    c = min(m, R)
    k = min(c, sum(min(n, r) for r in ranks))  # singular values kept, at most
    qb = qr_cost(L, 1, m, R)
    qa = sum(qr_cost(L, 1, n, r) for r in ranks)
    middle = L.alloc(F32 * (R * R + c * R))  # block_diag of the R_tᵀ, and Rb times it
    small = svd_cost(L, 1, c, R)
    kept = L.alloc(F32 * (c * k + k * R))
    blocks = L.alloc(F32 * T * k * n)
    U = L.alloc(F32 * m * k)
    L.free(qb, qa, middle, small, kept)
    return blocks, U, k


def merge_in_knots_space(
    factors: Sequence[LoraFactors],
    method: str,
    params: Mapping[str, Any],
    rank: int | None = None,
    generator: torch.Generator | None = None,
    *,
    output_rank_mode: str = "auto",
) -> MergedModule:
    """KnOTS: merge the per-task right blocks V_t, then ΔW = U diag(S) X.

    ``isotropize`` acts on the dense ΔW (over all min(m, n) singular values, as the reference
    does), so that one case forms the m × n matrix.
    """
    U, S, blocks = knots_components(factors)
    m, n = U.shape[0], blocks.shape[-1]
    tasks = Tasks(matrices=blocks[None], layer_k=min(m, n), generators=[_generator(generator)])
    del blocks
    flat = rank is not None and rank_mode(method, params, output_rank_mode) == "isotropic"
    if params.get("isotropize", False):  # the m × n ΔW's singular values; alpha from the same
        energies = task_energies(tasks, S[None]) if params.get("alpha") == "auto" else None
        X, _ = merge_tasks(method, tasks, {**params, "isotropize": False, "alpha": 1.0})
        del tasks
        dW = (U * S) @ X[0]
        del X
        if not flat:  # else flattened after the cut, over the k directions kept
            dW = isotropize(dW)
        alpha = resolve_alphas(params, energies, dW[None])[0]
        merged = _dense_to_lora(dW.mul_(alpha) if alpha != 1.0 else dW, rank, flatten=flat)
        return replace(merged, alpha=alpha)
    X, alphas = merge_tasks(method, tasks, params, row_scale=S[None])  # ‖U S V‖ = ‖S V‖
    del tasks
    Uf, Sf, Vhf = factored_svd(U * S, X[0])
    k = int(numerical_ranks(Sf, (m, n))) if rank is None else rank
    B, A, kept = truncate(Uf, Sf, Vhf, k, flatten=flat)
    if rank is None:
        return MergedModule(B=B, A=A, alpha=alphas[0])
    return MergedModule(B=B, A=A, kept_energy=kept[0], alpha=alphas[0], spectrum=Sf)


def knots_space_cost(
    L: Ledger, m: int, n: int, ranks: Sequence[int], method: str, params: Mapping[str, Any],
    rank: int | None, *, output_rank_mode: str = "auto",
) -> int:  # fmt: skip
    """:func:`merge_in_knots_space`: the factored SVD of [ΔW_1 … ΔW_T], the method on the T
    blocks V_t (k × n), then ΔW = U S X, dense only with ``isotropize``."""
    blocks, U, k = _knots_components_cost(L, m, n, ranks)
    shape = TaskShape(1, len(ranks), k, n, None, min(m, n))
    X, _ = merge_tasks_cost(L, shape, method, {**params, "isotropize": False})
    L.free(blocks)
    if params.get("isotropize", False):
        US = L.alloc(F32 * m * k)
        dense = L.alloc(F32 * m * n)
        L.free(US, X)
        iso = isotropize_cost(L, 1, m, n)
        L.free(dense)
        out = _dense_to_lora_cost(L, m, n, rank)
        L.free(iso)
    else:  # factored_svd(U S, X) and the truncation
        US = L.alloc(F32 * m * k)
        factors = factored_svd_cost(L, 1, m, k, n)
        out = L.alloc(F32 * m * (k if rank is None else min(rank, k)))  # B = U_k S_k
        out += factors  # A is a view of Vh
        L.free(factors, US, X)
    L.free(U)
    return out


def _generator(generator: torch.Generator | None) -> torch.Generator:
    return torch.Generator().manual_seed(0) if generator is None else generator


@dataclass(frozen=True)
class Space:
    """One space: ``merge(factors, method, params, rank, generator, *, output_rank_mode)`` →
    ``MergedModule``, and ``cost(ledger, m, n, ranks, method, params, rank, *,
    output_rank_mode)`` → the bytes of the merged factors, which it leaves allocated, above
    the stacked inputs that the caller holds."""

    merge: Callable[..., MergedModule]
    cost: Callable[..., int]


def _core_cost(
    L: Ledger, m: int, n: int, ranks, method, params, rank, *, output_rank_mode: str = "auto"
) -> int:
    """One module's core merge, its stacks given up (as the runner gives them)."""
    return core_space_cost(
        L, 1, m, n, ranks, method, params, rank, consume=True, output_rank_mode=output_rank_mode
    )


#: Every space by its API name.
SPACES: dict[str, Space] = {
    "core": Space(merge_in_core_space, _core_cost),
    "full": Space(merge_in_full_space, full_space_cost),
    "knots": Space(merge_in_knots_space, knots_space_cost),
}


def merge_module(
    factors: Sequence[LoraFactors],
    method: str,
    params: Mapping[str, Any],
    space: str = "core",
    rank: int | None = None,
    generator: torch.Generator | None = None,
    *,
    consume: bool = False,
    output_rank_mode: str = "auto",
) -> MergedModule:
    """Merge one module's updates with ``method`` in ``space``; see the per-space functions.
    ``consume``: the caller gives a ``FactorStack``'s buffers up, and core space writes the
    merged factors over them (``merge_group_in_core_space``). ``output_rank_mode``: how the
    merge is brought to ``rank`` (``methods.rank_mode``; ``"shared"`` is core space's)."""
    if not factors:
        raise ValueError("merge_module needs at least one adapter's factors")
    if space == "core":
        return merge_in_core_space(
            factors, method, params, rank, generator,
            consume=consume, output_rank_mode=output_rank_mode,
        )  # fmt: skip
    if output_rank_mode == "shared":
        raise ValueError(f'output.rank_mode "shared" needs space "core", not {space!r}')
    return SPACES[space].merge(
        factors, method, params, rank, generator, output_rank_mode=output_rank_mode
    )
