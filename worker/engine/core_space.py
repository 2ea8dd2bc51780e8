"""Core space (the paper's Algorithm 1) for G modules of one shape at once (docs/methods.md).

    stacks B (G × m × R), A (G × R × n)
    ├── reference bases      left singular vectors of each B, right ones of each A (linalg)
    ├── self-check           the stacks' sampled residual off the bases
    ├── core matrices        M_t = (Uᵀ B_t)(A_t V), as thin factors (methods.Tasks)
    ├── merge                [aligned axes] → method → [isotropize] → alpha (methods)
    └── map back             B = U M, A = Vᵀ, through the stacks when it can; or truncated

It never forms an m × n matrix: every decomposition is of a thin stacked factor or of an
R × R core matrix, R = Σ r_t. One module is the group of one; a GPU merges a layer's modules
of one kind together (``worker.engine.batched``), each step then one batched call whose
kernel launches and host round trips do not grow with the number of modules. Each step's
memory cost is declared beside it (``worker.engine.ledger``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .factors import (
    FactorStack,
    LoraFactors,
    MergedModule,
    check_group,
    generators_for,
    rank_slices,
    stack_group,
)
from .ledger import F32, F64, Ledger
from .linalg import (
    Basis,
    eigh_cost,
    left_singular_basis,
    left_singular_basis_cost,
    svd,
    svd_cost,
    times_in_place,
    times_in_place_cost,
    truncate,
)
from .methods import AUTO, Tasks, TaskShape, merge_tasks, merge_tasks_cost, rank_mode
from .shared_bases import lift, shared_bases

__all__ = [
    "ReferenceBases",
    "aligned_axes",
    "core_factors",
    "core_matrices",
    "core_space_cost",
    "merge_group_in_core_space",
    "merge_in_core_space",
    "projection_residual",
    "reference_bases",
    "stacked_sum",
    "takes_stacked_sum",
]

#: Rows of B (columns of A) that the self-check samples per module.
RESIDUAL_SAMPLE = 256


# ----------------------------------------------------------------------------- one module's view


@dataclass(frozen=True)
class ReferenceBases:
    """One module's orthonormal bases of the stacked factors and the stacks in them.

    U (m × a) are the left singular vectors of B_stack = [B_1 … B_T], V (n × b) the right
    singular vectors of A_stack = [A_1; …; A_T]. ``UtB`` = Uᵀ B_stack (a × R) and
    ``AV`` = A_stack V (R × b). ``left`` and ``right`` are the group-of-one bases.
    """

    left: Basis  # U
    right: Basis  # V

    @property
    def U(self) -> Tensor:
        return self.left.matrix[0]

    @property
    def V(self) -> Tensor:
        return self.right.matrix[0]

    @property
    def UtB(self) -> Tensor:
        return self.left.coords[0]

    @property
    def AV(self) -> Tensor:
        return self.right.coords[0].mT


def reference_bases(factors: Sequence[LoraFactors]) -> ReferenceBases:
    """Step 2 of Algorithm 1 for one module: SVDs of the stacked factors, all R kept."""
    stack = FactorStack.of(factors)
    return ReferenceBases(left_singular_basis(stack.B[None]), left_singular_basis(stack.A.mT[None]))


def core_factors(
    factors: Sequence[LoraFactors], bases: ReferenceBases
) -> list[tuple[Tensor, Tensor]]:
    """Each core matrix as its thin factors: M_t = (Uᵀ B_t)(A_t V), a × r_t times r_t × b."""
    return [(bases.UtB[:, sl], bases.AV[sl]) for sl in rank_slices(f.A.shape[0] for f in factors)]


def core_matrices(factors: Sequence[LoraFactors], bases: ReferenceBases) -> list[Tensor]:
    """Step 3: M_t = (Uᵀ B_t)(A_t V), each a × b (R × R when R ≤ m, n)."""
    return [left @ right for left, right in core_factors(factors, bases)]


def projection_residual(factors: Sequence[LoraFactors], bases: ReferenceBases) -> float:
    """One module's self-check (:func:`_residuals`), with ``bases`` of ``factors``."""
    stack = FactorStack.of(factors)
    ranks = tuple(f.A.shape[0] for f in factors)
    return _residuals(_Samples.of(stack.B[None], stack.A[None]), bases.left, bases.right, ranks)[0]


# ----------------------------------------------------------------------------- the steps


def _per_task(values: Tensor, ranks: tuple[int, ...]) -> Tensor:
    """Sums of (G, R) over each task's columns: (G, T)."""
    if len(set(ranks)) == 1:
        return values.reshape(values.shape[0], len(ranks), ranks[0]).sum(-1)
    return torch.stack([values[:, sl].sum(-1) for sl in rank_slices(ranks)], dim=1)


def _spread(size: int, count: int, device: torch.device) -> Tensor:
    """At most ``count`` evenly spaced indices in range(size), always including 0."""
    step = max(1, -(-size // count))
    return torch.arange(0, size, step, device=device)


@dataclass(frozen=True)
class _Samples:
    """Rows of the B stacks and columns of the A stacks, copied before the bases are taken
    (the QR route may overwrite the stacks), for the self-check."""

    rows: Tensor
    B: Tensor  # (G, rows, R)
    cols: Tensor
    A: Tensor  # (G, R, cols)

    @classmethod
    def of(cls, B_stacks: Tensor, A_stacks: Tensor) -> _Samples:
        rows = _spread(B_stacks.shape[1], RESIDUAL_SAMPLE, B_stacks.device)
        cols = _spread(A_stacks.shape[2], RESIDUAL_SAMPLE, A_stacks.device)
        return cls(rows, B_stacks[:, rows], cols, A_stacks[:, :, cols])


def _residuals(samples: _Samples, left: Basis, right: Basis, ranks: tuple[int, ...]) -> list[float]:
    """The self-check of docs/guarantees.md: per module, the worst relative residual of any
    B_t or A_t off the bases, ‖B_t − U Uᵀ B_t‖ / ‖B_t‖ and ‖A_t − A_t V Vᵀ‖ / ‖A_t‖.

    ~1e-7 in float32 when core space is lossless. Evaluated on at most
    :data:`RESIDUAL_SAMPLE` evenly spaced rows of B and columns of A (exact when m, n are at
    most that): a failed decomposition is wrong everywhere, and the full check would cost as
    much as the merge itself (at 256 the check is ~4% of a core merge). One host transfer.
    """
    B_s, A_s = samples.B, samples.A
    rb = (B_s - left.rows(samples.rows) @ left.coords).norm(dim=-2) ** 2  # per column of B
    ra = (A_s - right.coords.mT @ right.rows(samples.cols).mT).norm(dim=-1) ** 2  # per row of A
    nb, na = B_s.norm(dim=-2) ** 2, A_s.norm(dim=-1) ** 2
    sums = torch.stack([_per_task(v, ranks) for v in (rb, nb, ra, na)], dim=-1)
    worst = []
    for module in sums.double().tolist():  # (T, 4) per module
        w = 0.0
        for res_b, norm_b, res_a, norm_a in module:
            for res, norm in ((res_b, norm_b), (res_a, norm_a)):
                if norm > 0:
                    w = max(w, (res / norm) ** 0.5)
        worst.append(w)
    return worst


def _residuals_cost(L: Ledger, G: int, m: int, n: int, R: int) -> None:
    """The sampled rows of the stacks and of the bases, their products and differences."""
    rows, cols = min(m, RESIDUAL_SAMPLE), min(n, RESIDUAL_SAMPLE)
    L.spike(F32 * G * 4 * (rows + cols) * R)


def aligned_axes(tasks: Tasks) -> tuple[Tensor, Tensor]:
    """Orthogonal P (G × a × a) and Q (G × b × b) onto the tasks' joint singular axes.

    P: the left singular vectors of [M_1 … M_T], Q: the right ones of [M_1; …; M_T]. Then
    U P are the left singular vectors of [ΔW_1 … ΔW_T] and V Q the right ones of
    [ΔW_1; …; ΔW_T], whatever bases U, V the factors gave: coordinates that depend on the
    updates alone, not on how each adapter split its scale between A and B. Both are square
    and orthogonal, so rotating is lossless (M_t = P (Pᵀ M_t Q) Qᵀ).

    Taken as the eigenvectors of Σ_t M_t M_tᵀ (a × a) and Σ_t M_tᵀ M_t (b × b), in float64
    and from the thin factors, M_t M_tᵀ = L_t (R_t R_tᵀ) L_tᵀ: products of R × r_t matrices,
    never the a × T·b concatenation (whose full SVD asks for a T·b × T·b matrix: 16 GiB for
    64 adapters of rank 16).
    """
    left_gram = torch.zeros(tasks.G, tasks.a, tasks.a, dtype=torch.float64, device=tasks.device)
    right_gram = torch.zeros(tasks.G, tasks.b, tasks.b, dtype=torch.float64, device=tasks.device)
    for t in range(tasks.T):
        left, right = (f.double() for f in tasks.factor(t))
        left_gram += left @ (right @ right.mT) @ left.mT
        right_gram += right.mT @ (left.mT @ left) @ right
    P = torch.linalg.eigh(left_gram)[1].flip(-1).to(tasks.dtype)
    Q = torch.linalg.eigh(right_gram)[1].flip(-1).to(tasks.dtype)
    return P, Q


def _aligned_axes_cost(L: Ledger, s: TaskShape) -> int:
    """The two float64 Gram matrices (one task's products at a time), their
    eigendecompositions, and P, Q in float32 (returned, kept)."""
    G, a, b, r = s.G, s.a, s.b, max(s.ranks)
    grams = L.alloc(F64 * G * (a * a + b * b))
    L.spike(F64 * G * (2 * (a + b) * r + 2 * r * r + max(a, b) * max(a, b, r)))
    kept = 0
    for side in (a, b):
        pairs = eigh_cost(L, G, side)
        flipped = L.alloc(F64 * G * side * side)
        kept += L.alloc(F32 * G * side * side)
        L.free(pairs, flipped)
    L.free(grams)
    return kept


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


def through_the_stacks(left: Basis, right: Basis, X: Tensor) -> tuple[Tensor, Tensor] | None:
    """U X Vᵀ as a LoRA pair with one product instead of two, when both bases lie on their
    stacks.

    U = B_stack K_B and V = A_stackᵀ K_A (the Gram route), so U X Vᵀ = B_stack C A_stack with
    the small C = K_B X K_Aᵀ. C goes to the narrower side and the wider side's stack is
    written as it is: (B_stack, C A_stack) when m ≥ n, else (B_stack C, A_stack). That
    skips 2 max(m, n) R² of the 2 (m + n) R² flops of U X and Vᵀ, the largest product of a
    core merge on a wide layer (an MLP's 28672 rows at Llama-3-70B). The narrower side's
    product is written over its stack when the caller gave the stacks up. None when a basis
    is a QR's.
    """
    if not (left.on_the_stack and right.on_the_stack):
        return None
    C = left.K @ X @ right.K.mT
    B_stack, A_stack = left.base, right.base.mT
    if B_stack.shape[-2] >= A_stack.shape[-1]:
        if right.owned:  # A = C A_stack, i.e. Aᵀ = A_stackᵀ Cᵀ row block by row block
            return B_stack, times_in_place(right.base, C.mT).mT
        return B_stack, C @ A_stack
    if left.owned:
        return times_in_place(left.base, C), A_stack
    return B_stack @ C, A_stack


def _lora_pairs(
    left: Basis, right: Basis, M: Tensor, rank: int | None, *, flatten: bool = False
) -> tuple[Tensor, Tensor, list[float] | None, Tensor | None]:
    """Step 5 (and 6): U M Vᵀ as (B, A), exactly when M is square, else (or with ``rank``)
    through the SVD of the small M, truncated to ``rank`` with each module's kept energy
    and M's singular values, the update's (``flatten``: the kept singular values made their
    mean, an isotropic cut). The bases
    are spent: a base that may be overwritten holds the factor it gives."""
    a, b = M.shape[-2:]
    if rank is None and a == b:
        pair = through_the_stacks(left, right, M)
        if pair is not None:
            return pair[0], pair[1], None, None
        return left.consume(M), right.transposed(), None, None
    P, S, Qh = svd(M)
    if rank is None:
        return left.apply(P * S[:, None, :]), right.apply_t(Qh), None, None
    B_small, A_small, kept = truncate(P, S, Qh, rank, flatten=flatten)
    return left.apply(B_small), right.apply_t(A_small), kept, S


def _lora_pairs_cost(
    L: Ledger, G: int, m: int, n: int, a: int, b: int, rank: int | None, *, consume: bool
) -> int:
    """The merged (B, A) beyond the stacks (returned, kept). Square and untruncated, each
    factor is written over its stack (or its Q) when the caller gave them up, a block of rows
    at a time; else the narrower side's factor is new (through the stacks) or both are (the
    QR route, the costlier). Otherwise through the SVD of M: both factors new."""
    if rank is None and a == b:
        L.spike(F32 * G * 3 * a * b)  # C = K_B M K_Aᵀ (or K M) and its products
        if consume:
            times_in_place_cost(L, G, a)
            return 0
        return L.alloc(F32 * G * (m + n) * a)
    k = min(a, b) if rank is None else min(rank, a, b)
    small = svd_cost(L, G, a, b)
    thin = L.alloc(F32 * G * (a * k + k * b))
    L.spike(F32 * G * 2 * a * k)  # K B_small, and its transpose's product on the A side
    out = L.alloc(F32 * G * (m * k + k * n))
    L.free(small, thin)
    return out


# ----------------------------------------------------------------------------- the merge


def merge_group_in_core_space(
    modules: Sequence[FactorStack | Sequence[LoraFactors]],
    method: str,
    params: Mapping[str, Any],
    rank: int | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    *,
    eigh_device: torch.device | str | None = None,
    consume: bool = False,
    output_rank_mode: str = "auto",
) -> list[MergedModule]:
    """Algorithm 1 for every module of a group that shares m, n, ranks, dtype and device.

    Bases → self-check → core matrices → merge the R × R matrices → map back. With ``rank``,
    each merged M ≈ P_k S_k Q_kᵀ is cut (an SVD of R × R only): B = U P_k S_k, A = Q_kᵀ Vᵀ, as
    ``output_rank_mode`` says (``methods.rank_mode``: truncated, cut then flattened, or
    merged on shared bases). ``axes: "aligned"`` rotates the core matrices onto
    :func:`aligned_axes` first and the result back. Plain task arithmetic skips all of it
    (:func:`stacked_sum`): the same update, exactly.

    ``generators``: one per module, for DARE's masks (None, or a None entry: a fresh seed-0
    generator). ``eigh_device``: where the float64 R × R eigendecompositions of the Gram
    matrices run (default: beside the factors). ``consume``: the caller gives its
    ``FactorStack`` buffers up, and the merge writes over them instead of allocating new tall
    matrices (factor lists are stacked into new buffers, always consumed). Returns one
    ``MergedModule`` per module, in order, with B and A views of the group's results.
    """
    stacks = [FactorStack.of(s) for s in modules]
    if not stacks:
        return []
    check_group(stacks)
    gens = generators_for(generators, len(stacks))
    if takes_stacked_sum(method, params, rank, stacks[0]):  # nothing to decompose
        return [stacked_sum(s, params) for s in stacks]
    device = None if eigh_device is None else torch.device(eigh_device)
    ranks = stacks[0].ranks
    B_stacks, A_stacks, copied = stack_group(stacks)
    overwrite = consume or copied or not any(isinstance(m, FactorStack) for m in modules)
    del stacks
    samples = _Samples.of(B_stacks, A_stacks)
    layer_k = min(B_stacks.shape[-2], A_stacks.shape[-1])
    left = left_singular_basis(B_stacks, device, overwrite=overwrite)
    right = left_singular_basis(A_stacks.mT, device, overwrite=overwrite)
    del B_stacks, A_stacks
    residuals = _residuals(samples, left, right, ranks)
    tasks = Tasks(factors=(left.coords, right.coords.mT, ranks), layer_k=layer_k, generators=gens)
    mode = None if rank is None else rank_mode(method, params, output_rank_mode)
    merged = _merge_and_map_back(method, params, tasks, left, right, rank, mode)
    B, A, alphas, kept, spectra = merged
    return [
        MergedModule(
            B=B[g],
            A=A[g],
            kept_energy=None if kept is None else kept[g],
            residual=residuals[g],
            alpha=alphas[g],
            spectrum=None if spectra is None else spectra[g],
        )
        for g in range(len(residuals))
    ]


def _merge_and_map_back(
    method: str,
    params: Mapping[str, Any],
    tasks: Tasks,
    left: Basis,
    right: Basis,
    rank: int | None,
    mode: str | None,
) -> tuple[Tensor, Tensor, list[float], list[float] | None, list[list[float]] | None]:
    """Steps 4-6 in the way the rank mode asks: (B, A, alphas, kept energy, each module's
    singular values before any cut, for ``output.rank: "auto"``; None on shared bases).
    ``mode`` None is the untruncated merge; "shared" merges on bases shared by the tasks,
    which fixes the axes itself, so it cannot be combined with ``axes: "aligned"``."""
    if mode == "shared" and params.get("axes") == "aligned":
        raise ValueError('output.rank_mode "shared" and axes "aligned" both choose the axes')
    if mode == "shared":
        return (*_merge_on_shared_bases(method, params, tasks, left, right, rank), None)
    M, alphas = _merge_cores(method, params, tasks, isotropize_later=mode == "isotropic")
    B, A, kept, spectra = _lora_pairs(left, right, M, rank, flatten=mode == "isotropic")
    return B, A, alphas, kept, spectra


def _merge_cores(
    method: str, params: Mapping[str, Any], tasks: Tasks, *, isotropize_later: bool = False
) -> tuple[Tensor, list[float]]:
    """Step 4: [rotate onto the aligned axes] → method → [isotropize] → alpha → [rotate
    back]; the merged core matrices (G × a × b) and each module's alpha."""
    if params.get("axes") != "aligned":
        return merge_tasks(method, tasks, params, isotropize_later=isotropize_later)
    P, Q = aligned_axes(tasks)
    rotated = Tasks(
        factors=(P.mT @ tasks.left, tasks.right @ Q, tasks.ranks),
        layer_k=tasks.layer_k,
        generators=tasks.generators,
    )
    del tasks
    M, alphas = merge_tasks(method, rotated, params, isotropize_later=isotropize_later)
    del rotated
    return P @ M @ Q.mT, alphas


def _merge_on_shared_bases(
    method: str,
    params: Mapping[str, Any],
    tasks: Tasks,
    left: Basis,
    right: Basis,
    k: int,
) -> tuple[Tensor, Tensor, list[float], list[float]]:
    """``output.rank_mode: "shared"`` (Compress-then-Merge): shared rank-k bases P, Q fitted
    to all the core matrices (Tucker-2, ``worker.engine.shared_bases``), the method on the
    tasks' k × k coordinates Pᵀ M_t Q, and the result lifted back, B = U (P C), A = Qᵀ Vᵀ:
    rank ≤ k by construction. Returns B, A, each module's alpha and the share of the
    tasks' energy the bases hold (reported as the kept energy)."""
    fit = shared_bases(tasks.matrices, k)
    coordinates = Tasks(
        matrices=fit.coordinates, layer_k=tasks.layer_k, generators=tasks.generators
    )
    del tasks
    C, alphas = merge_tasks(method, coordinates, params)
    del coordinates
    thin_left, thin_right = lift(C, fit.P, fit.Q)
    return left.apply(thin_left), right.apply_t(thin_right), alphas, fit.captured.tolist()


def core_space_cost(
    L: Ledger,
    G: int,
    m: int,
    n: int,
    ranks: Sequence[int],
    method: str,
    params: Mapping[str, Any],
    rank: int | None,
    *,
    consume: bool = True,
    output_rank_mode: str = "auto",
) -> int:
    """:func:`merge_group_in_core_space`'s allocations above the stacks (which the caller
    holds, and gives up with ``consume``); returns the bytes of the merged factors beyond
    the stacks, left allocated."""
    T, R = len(ranks), sum(ranks)
    alpha = params.get("alpha", 1.0)
    plain = alpha != AUTO and not params.get("isotropize", False)
    if method == "ta" and rank is None and min(m, n) >= R and plain:  # the stacked sum
        return 0 if alpha == 1.0 else L.alloc(F32 * G * m * R)
    a, b = min(m, R), min(n, R)
    samples = L.alloc(F32 * G * (min(m, RESIDUAL_SAMPLE) + min(n, RESIDUAL_SAMPLE)) * R)
    bases = left_singular_basis_cost(L, G, m, R, overwrite=consume)
    bases += left_singular_basis_cost(L, G, n, R, overwrite=consume)
    _residuals_cost(L, G, m, n, R)
    L.free(samples)
    shape = TaskShape(G, T, a, b, tuple(ranks), min(m, n))
    mode = None if rank is None else rank_mode(method, params, output_rank_mode)
    if mode == "shared":
        out = _shared_bases_cost(L, shape, method, params, m, n, rank)
        L.free(bases)
        return out
    rotation = rotated = 0
    if params.get("axes") == "aligned":
        rotation = _aligned_axes_cost(L, shape)  # P and Q, kept to rotate back
        rotated = L.alloc(F32 * G * (a + b) * R)  # the rotated thin factors
    M, formed = merge_tasks_cost(L, shape, method, params, isotropize_later=mode == "isotropic")
    L.free(formed, rotated)
    if rotation:
        L.spike(F32 * G * a * b * 2)  # P M, then (P M) Qᵀ replaces M
    out = _lora_pairs_cost(L, G, m, n, a, b, rank, consume=consume)
    L.free(M, bases, rotation)
    return out


def _shared_bases_cost(
    L: Ledger, s: TaskShape, method: str, params: Mapping[str, Any], m: int, n: int, k: int
) -> int:
    """:func:`_merge_on_shared_bases`: the formed cores, the Tucker-2 fit (a float64 copy of
    the cores, M Q and its transposed copy, the two Gram matrices: the module docstring of
    ``shared_bases``), the coordinates, the method on them, the lift and the two factors."""
    G, T, a, b = s.G, s.T, s.a, s.b
    k = min(k, a, b)
    cores = s.matrices(L)
    L.spike(F64 * G * (T * a * b + 2 * T * max(a, b) * k + a * a + b * b))
    fit = L.alloc(F32 * G * (T * k * k + (a + b) * k))  # the coordinates, P and Q
    L.free(cores)
    C, formed = merge_tasks_cost(L, TaskShape(G, T, k, k, None, s.layer_k), method, params)
    thin = L.alloc(F32 * G * (a * k + k * b))  # P C and Qᵀ
    L.free(fit, C, formed)
    L.spike(F32 * G * max(a, b) * k)  # K (P C) before the product with the tall base
    out = L.alloc(F32 * G * (m * k + k * n))
    L.free(thin)
    return out


def merge_in_core_space(
    factors: Sequence[LoraFactors],
    method: str,
    params: Mapping[str, Any],
    rank: int | None = None,
    generator: torch.Generator | None = None,
    *,
    consume: bool = False,
    output_rank_mode: str = "auto",
) -> MergedModule:
    """Algorithm 1 for one module: :func:`merge_group_in_core_space` of the group of one
    (``consume``, ``output_rank_mode``: see there)."""
    merged = merge_group_in_core_space(
        [factors], method, params, rank, [generator],
        consume=consume, output_rank_mode=output_rank_mode,
    )  # fmt: skip
    return merged[0]
