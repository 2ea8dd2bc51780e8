"""Merging one module's LoRA updates in core, full or knots space (docs/methods.md).

Input: for each adapter t that has the module, its factors with the scaling s_t and the job
weight w_t already folded into B: ΔW_t = B_t A_t, B_t (m × r_t), A_t (r_t × n). Output: the
merged update as a LoRA pair ``B @ A`` (scaling 1), so it is written as an adapter as is.

Core space (the paper's Algorithm 1) never forms an m × n matrix: every decomposition is of a
thin stacked factor or of an R × R core matrix, R = Σ r_t.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from torch import Tensor

from .linalg import (
    Basis,
    factored_svd,
    isotropize,
    left_singular_basis,
    numerical_rank,
    svd,
    truncate,
)
from .methods import AUTO, LAYER_K, method_result, resolve_alpha

__all__ = [
    "FactorStack",
    "LoraFactors",
    "MergedModule",
    "ReferenceBases",
    "aligned_axes",
    "core_factors",
    "core_matrices",
    "merge_in_core_space",
    "merge_in_full_space",
    "merge_in_knots_space",
    "merge_module",
    "reference_bases",
    "stacked_sum",
    "takes_stacked_sum",
]


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's update for one module, ΔW = B @ A, scaling and weight folded into B."""

    A: Tensor  # (r, n)
    B: Tensor  # (m, r)


def _rank_slices(ranks: Iterable[int]) -> list[slice]:
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
        self._slices = _rank_slices(self.ranks)

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

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class ReferenceBases:
    """Orthonormal bases of the stacked factors and the stacks expressed in them.

    U (m × a) are the left singular vectors of B_stack = [B_1 … B_T], V (n × b) the right
    singular vectors of A_stack = [A_1; …; A_T]. ``UtB`` = Uᵀ B_stack (a × R) and
    ``AV`` = A_stack V (R × b) come from the same QR factors at the cost of an R × R product.
    """

    left: Basis  # U
    right: Basis  # V
    UtB: Tensor
    AV: Tensor

    @property
    def U(self) -> Tensor:
        return self.left.matrix

    @property
    def V(self) -> Tensor:
        return self.right.matrix


def reference_bases(factors: Sequence[LoraFactors]) -> ReferenceBases:
    """Step 2 of Algorithm 1: SVDs of the stacked factors, by QR + small SVD (all R kept)."""
    stack = FactorStack.of(factors)
    left, UtB = left_singular_basis(stack.B)
    right, VtAt = left_singular_basis(stack.A.mT)
    return ReferenceBases(left=left, right=right, UtB=UtB, AV=VtAt.mT)


def core_factors(
    factors: Sequence[LoraFactors], bases: ReferenceBases
) -> list[tuple[Tensor, Tensor]]:
    """Each core matrix as its thin factors: M_t = (Uᵀ B_t)(A_t V), a × r_t times r_t × b."""
    return [(bases.UtB[:, sl], bases.AV[sl]) for sl in _rank_slices(f.A.shape[0] for f in factors)]


def core_matrices(factors: Sequence[LoraFactors], bases: ReferenceBases) -> list[Tensor]:
    """Step 3: M_t = (Uᵀ B_t)(A_t V), each a × b (R × R when R ≤ m, n)."""
    return [left @ right for left, right in core_factors(factors, bases)]


def _spread(size: int, count: int, device: torch.device) -> Tensor:
    """At most ``count`` evenly spaced indices in range(size), always including 0."""
    step = max(1, -(-size // count))
    return torch.arange(0, size, step, device=device)


def projection_residual(
    factors: Sequence[LoraFactors], bases: ReferenceBases, sample: int = 256
) -> float:
    """The self-check of docs/guarantees.md: worst relative residual of any B_t or A_t off the bases.

    ‖B_t − U Uᵀ B_t‖ / ‖B_t‖ and ‖A_t − A_t V Vᵀ‖ / ‖A_t‖; ~1e-7 in float32 when core space
    is lossless. Evaluated on at most ``sample`` evenly spaced rows of B and columns of A
    (exact when m, n ≤ sample): a failed decomposition is wrong everywhere, and the full check
    would cost as much as the merge itself (at 256 the check is ~4% of a core merge).
    """
    B_stack, A_stack = bases.left.x, bases.right.x.mT
    rows = _spread(B_stack.shape[0], sample, B_stack.device)
    cols = _spread(A_stack.shape[1], sample, A_stack.device)
    B_s, A_s = B_stack[rows], A_stack[:, cols]
    rb = (B_s - bases.left.rows(rows) @ bases.UtB).norm(dim=0) ** 2  # per column of B_stack
    ra = (A_s - bases.AV @ bases.right.rows(cols).mT).norm(dim=1) ** 2  # per row of A_stack
    nb, na = B_s.norm(dim=0) ** 2, A_s.norm(dim=1) ** 2
    worst = 0.0
    for sl in _rank_slices(f.A.shape[0] for f in factors):
        for res, norm in ((rb[sl], nb[sl]), (ra[sl], na[sl])):
            total = float(norm.sum())
            if total > 0:
                worst = max(worst, (float(res.sum()) / total) ** 0.5)
    return worst


def through_the_stacks(left: Basis, right: Basis, X: Tensor) -> tuple[Tensor, Tensor] | None:
    """U X Vᵀ as a LoRA pair with one product instead of two, when both bases are implicit.

    U = B_stack K_B and V = A_stackᵀ K_A (the Gram route), so U X Vᵀ = B_stack C A_stack with
    the small C = K_B X K_Aᵀ. C goes to the narrower side and the wider side's stack is
    written as it is: (B_stack, C A_stack) when m ≥ n, else (B_stack C, A_stack). That
    skips 2 max(m, n) R² of the 2 (m + n) R² flops of U X and Vᵀ, the largest product of a
    core merge on a wide layer (an MLP's 28672 rows at Llama-3-70B). Works batched as well
    (leading dimensions broadcast). None when a basis is explicit (the QR route).
    """
    if left.K is None or right.K is None:
        return None
    C = left.K @ X @ right.K.mT
    B_stack, A_stack = left.x, right.x.mT
    if B_stack.shape[-2] >= A_stack.shape[-1]:
        return B_stack, C @ A_stack
    return B_stack @ C, A_stack


def _as_lora_pair(
    bases: ReferenceBases, X: Tensor, rank: int | None
) -> tuple[Tensor, Tensor, float | None]:
    """Write U X Vᵀ as (B, A): exactly when X is square, else via the SVD of the small X."""
    if rank is None and X.shape[0] == X.shape[1]:
        pair = through_the_stacks(bases.left, bases.right, X)
        if pair is not None:
            return *pair, None
        return bases.left.apply(X), bases.right.transposed(), None
    P, S, Qh = svd(X)
    if rank is None:
        return bases.left.apply(P * S), bases.right.apply_t(Qh), None
    B_small, A_small, kept = truncate(P, S, Qh, rank)
    return bases.left.apply(B_small), bases.right.apply_t(A_small), kept


def aligned_axes(cores: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Orthogonal P (a × a) and Q (b × b) onto the tasks' joint singular axes.

    P: the left singular vectors of [M_1 … M_T], Q: the right ones of [M_1; …; M_T]. Then
    U P are the left singular vectors of [ΔW_1 … ΔW_T] and V Q the right ones of
    [ΔW_1; …; ΔW_T], whatever bases U, V the factors gave: coordinates that depend on the
    updates alone, not on how each adapter split its scale between A and B. Both are square
    and orthogonal, so rotating is lossless (M_t = P (Pᵀ M_t Q) Qᵀ).
    """
    P = svd(torch.cat(list(cores), dim=1), full_matrices=True)[0]
    Q = svd(torch.cat(list(cores), dim=0), full_matrices=True)[2].mT
    return P, Q


def takes_stacked_sum(
    method: str, params: Mapping[str, Any], rank: int | None, stack: FactorStack
) -> bool:
    """Whether core space computes this merge as :func:`stacked_sum`: task arithmetic with a
    number for alpha, no isotropize and no truncation, on an R × R core (R ≤ min(m, n))."""
    m, total_rank, n = stack.B.shape[-2], stack.B.shape[-1], stack.A.shape[-1]
    return (
        method == "ta"
        and rank is None
        and total_rank <= min(m, n)
        and params.get("alpha", 1.0) != AUTO
        and not params.get("isotropize", False)
    )


def stacked_sum(stack: FactorStack, params: Mapping[str, Any]) -> MergedModule:
    """Core-space task arithmetic without the bases: B = alpha · B_stack, A = A_stack, with
    ``params["alpha"]`` (a number: see :func:`takes_stacked_sum`).

    U (Σ_t M_t) Vᵀ = Σ_t B_t A_t = B_stack A_stack exactly (the lossless property), so the
    bases, the core matrices and the map back would compute, at about 4 (m + n) R² flops, a
    factorisation of the very update the stacks already are. The rank is R either way; only
    the pair differs (A is not orthonormal). Nothing is projected, so there is no residual.
    """
    alpha = float(params.get("alpha", 1.0))
    B = stack.B if alpha == 1.0 else alpha * stack.B
    return MergedModule(B=B, A=stack.A, alpha=alpha)


def merge_in_core_space(
    factors: Sequence[LoraFactors],
    method: str,
    params: Mapping[str, Any],
    rank: int | None = None,
    generator: torch.Generator | None = None,
) -> MergedModule:
    """Algorithm 1: bases → core matrices → merge the R × R matrices → map back.

    With ``rank``, the merged core matrix M ≈ P_k S_k Q_kᵀ is truncated (an SVD of R × R
    only): B = U P_k S_k, A = Q_kᵀ Vᵀ. With ``axes: "aligned"``, the core matrices are
    rotated onto :func:`aligned_axes` before the method and the result rotated back. Plain
    task arithmetic skips all of it (:func:`stacked_sum`): the same update, exactly.
    """
    stack = FactorStack.of(factors)
    if takes_stacked_sum(method, params, rank, stack):
        return stacked_sum(stack, params)
    params = {**params, LAYER_K: min(factors[0].B.shape[0], factors[0].A.shape[1])}
    bases = reference_bases(factors)
    thin = core_factors(factors, bases)
    aligned = params.get("axes", "reference") == "aligned"
    if aligned:
        P, Q = aligned_axes([left @ right for left, right in thin])
        thin = [(P.mT @ left, right @ Q) for left, right in thin]
    cores = [left @ right for left, right in thin]
    M = method_result(method, cores, params, generator, thin)
    alpha = resolve_alpha(params, cores, M)
    M = alpha * M
    if aligned:
        M = P @ M @ Q.mT
    B, A, kept = _as_lora_pair(bases, M, rank)
    residual = projection_residual(factors, bases)
    return MergedModule(B=B, A=A, kept_energy=kept, residual=residual, alpha=alpha)


def _dense_to_lora(dW: Tensor, rank: int | None) -> tuple[Tensor, Tensor, float | None]:
    """Factor a dense update exactly (numerical rank) or truncated to ``rank`` by its SVD."""
    U, S, Vh = svd(dW)
    k = numerical_rank(S, tuple(dW.shape)) if rank is None else rank
    B, A, kept = truncate(U, S, Vh, k)
    return B, A, (kept if rank is not None else None)


def merge_in_full_space(
    factors: Sequence[LoraFactors],
    method: str,
    params: Mapping[str, Any],
    rank: int | None = None,
    generator: torch.Generator | None = None,
) -> MergedModule:
    """The baseline: the method on the dense ΔW_t = B_t A_t (m × n each)."""
    dWs = [f.B @ f.A for f in factors]
    dW = method_result(method, dWs, params, generator)
    alpha = resolve_alpha(params, dWs, dW)
    B, A, kept = _dense_to_lora(alpha * dW, rank)
    return MergedModule(B=B, A=A, kept_energy=kept, alpha=alpha)


def knots_components(factors: Sequence[LoraFactors]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """U, S and the per-task blocks V_t of the SVD of [ΔW_1 … ΔW_T] (m × T·n), from the factors.

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
    blocks, start = [], 0
    for Q, R in qrs:
        k = R.shape[0]
        blocks.append(Vhs[:, start : start + k] @ Q.mT)
        start += k
    return Qb @ Us, S, blocks


def merge_in_knots_space(
    factors: Sequence[LoraFactors],
    method: str,
    params: Mapping[str, Any],
    rank: int | None = None,
    generator: torch.Generator | None = None,
) -> MergedModule:
    """KnOTS: merge the per-task right blocks V_t, then ΔW = U diag(S) X.

    ``isotropize`` acts on the dense ΔW (over all min(m, n) singular values, as the reference
    does), so that one case forms the m × n matrix.
    """
    U, S, blocks = knots_components(factors)
    layer_k = min(factors[0].B.shape[0], factors[0].A.shape[1])
    X = method_result(method, blocks, {**params, "isotropize": False, LAYER_K: layer_k}, generator)
    B, A = U * S, X
    if params.get("isotropize", False):  # the m × n ΔW's singular values; alpha from the same
        dW = isotropize(B @ A)
        alpha = resolve_alpha(params, [(U * S) @ V_t for V_t in blocks], dW)
        B, A, kept = _dense_to_lora(alpha * dW, rank)
        return MergedModule(B=B, A=A, kept_energy=kept, alpha=alpha)
    alpha = resolve_alpha(params, blocks, X, row_scale=S)  # ‖U diag(S) V‖ = ‖diag(S) V‖
    Uf, Sf, Vhf = factored_svd(B, alpha * A)
    k = numerical_rank(Sf, (B.shape[0], A.shape[1])) if rank is None else rank
    B, A, kept = truncate(Uf, Sf, Vhf, k)
    return MergedModule(B=B, A=A, kept_energy=kept if rank is not None else None, alpha=alpha)


_SPACES = {
    "core": merge_in_core_space,
    "full": merge_in_full_space,
    "knots": merge_in_knots_space,
}


def merge_module(
    factors: Sequence[LoraFactors],
    method: str,
    params: Mapping[str, Any],
    space: str = "core",
    rank: int | None = None,
    generator: torch.Generator | None = None,
) -> MergedModule:
    """Merge one module's updates with ``method`` in ``space``; see the per-space functions."""
    if not factors:
        raise ValueError("merge_module needs at least one adapter's factors")
    return _SPACES[space](factors, method, params, rank, generator)
