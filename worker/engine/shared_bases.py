"""Rank-constrained merging: shared rank-k bases for all tasks, fitted to their core matrices.

Truncating a merged core matrix to the serving rank k (``output.rank``) cuts what the method
built: Iso-C's flat spectrum loses 1 − k/R of its energy, and TSV's decorrelated directions
are dropped by size, not by task. Compressing first and merging second keeps the cut where it
costs least (Compress-then-Merge, He et al., ICML 2026, arXiv 2606.03723, §3):

1. Fit ONE pair of orthonormal bases P (a × k), Q (b × k) to all T core matrices at once: the
   Tucker-2 decomposition of the a × b × T stack, maximising Σ_t ‖Pᵀ M_t Q‖²_F, by HOOI
   (higher-order orthogonal iteration) started from the HOSVD (:func:`tucker2_bases`).
   Optionally each M_t is first rescaled towards the tasks' mean norm (``beta``), so a task
   with a large update does not claim all k directions (:func:`rescale_towards_mean_norm`).
2. Project every task onto them: C_t = Pᵀ M_t Q (k × k), the coordinates (:func:`project`).
3. Merge the C_t with any method (TA, TIES, DARE, TSV, CART, Iso-C: ``methods.py``) into C.
4. Lift back: M = P C Qᵀ (:func:`lift`), so the module's update is U_ref P C Qᵀ V_refᵀ, of
   rank ≤ k by construction: B = U_ref (P C), A = Qᵀ V_refᵀ.

With k ≥ a and k ≥ b the bases are square and orthogonal, and the projection is lossless.
Iso-C on the k × k coordinates is rank-aware by construction (the mean runs over the k
singular values the output has, not over R); :func:`rank_aware_isotropize` also skips the
zero singular values of a C whose rank is below k, as the reference does.

Every function takes core matrices over leading dimensions, shape (..., T, a, b) (modules of
one shape batched together, or none), and broadcasts as torch's eigh and ``@`` do. The Gram
matrices and their eigendecompositions run in float64 (the top-k subspace of a Gram matrix
is accurate to ~eps·cond², which float32 cannot afford); results come back in the input's
dtype. Nothing here is random: the sign of each basis vector is fixed (its largest entry is
positive), so the same cores give the same bases on every device and in every batch.

Peak memory of :func:`shared_bases` (bytes, for one batch of G modules, K = max(a, b),
k ≤ min(a, b)), above the float32 input cores (4·G·T·a·b):
    8 · G · (T·a·b + 2·T·K·k + a² + b²)   (a float64 copy of the cores, M Q and its
                                            transposed copy, the two Gram matrices)
  + 4 · G · (T·k² + (a + b)·k)             (the coordinates and the bases returned)
eigh's workspace is O(a² + b²) per module and is counted in the Gram term's order. The
work is about 2·G·T·a·b·k·(2·iterations + 1) + G·(a³ + b³)·(iterations + 1) flops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "HOOI_ITERATIONS",
    "SharedBases",
    "captured_energy",
    "hosvd_bases",
    "isotropic_truncation",
    "lift",
    "project",
    "rank_aware_isotropize",
    "rescale_towards_mean_norm",
    "shared_bases",
    "tucker2_bases",
]

#: HOOI sweeps after the HOSVD start. A fixed count, not a tolerance, so a batch of modules
#: and each module alone take the same steps (and give the same bases), and the cost model
#: knows the work in advance. On the accuracy benchmark's cores the fit gains < 1e-3 of the
#: energy after the second sweep (bench/accuracy/README.md).
HOOI_ITERATIONS = 4


@dataclass(frozen=True)
class SharedBases:
    """Shared bases P (..., a, k), Q (..., b, k) and every task's coordinates (..., T, k, k).

    ``captured`` (...,) is the share of the tasks' energy the bases hold,
    Σ_t ‖C_t‖² / Σ_t ‖M_t‖² (1 when lossless): what the report can state per module.
    """

    P: Tensor
    Q: Tensor
    coordinates: Tensor
    captured: Tensor


def rescale_towards_mean_norm(cores: Tensor, beta: float) -> Tensor:
    """M̃_t = M_t · (β + (1 − β) · mean_s ‖M_s‖_F / ‖M_t‖_F), over the task axis (-3).

    β = 1 keeps each task as it is; β = 0 gives every task the mean norm, so the fit weighs
    the tasks equally instead of by the size of their updates (Compress-then-Merge's β: the
    reference scales ``stack / ‖M_t‖ · (β‖M_t‖ + (1 − β) mean‖M‖)``). Only the fit sees the
    rescaled tasks; the coordinates are those of the tasks as they are (:func:`project`).
    A task with no update stays zero.
    """
    if beta == 1.0:
        return cores
    norms = torch.linalg.matrix_norm(cores.double())  # (..., T)
    mean = norms.mean(-1, keepdim=True)
    factor = beta + (1.0 - beta) * mean / norms.clamp(min=torch.finfo(torch.float64).tiny)
    factor = torch.where(norms > 0, factor, torch.ones_like(factor))
    return cores * factor[..., None, None].to(cores.dtype)


def _top_eigenvectors(gram: Tensor, k: int) -> Tensor:
    """The k eigenvectors of the largest eigenvalues of a symmetric ``gram`` (..., n, n), in
    descending order, each signed so that its largest-magnitude entry is positive."""
    _, vectors = torch.linalg.eigh(gram)  # ascending
    top = vectors[..., -k:].flip(-1)
    pivot = top.abs().argmax(-2, keepdim=True)
    sign = torch.sign(torch.gather(top, -2, pivot))
    return top * torch.where(sign == 0, torch.ones_like(sign), sign)


def _left_gram(cores: Tensor, Q: Tensor | None) -> Tensor:
    """Σ_t (M_t Q)(M_t Q)ᵀ (..., a, a), or Σ_t M_t M_tᵀ without Q: the Gram matrix of the
    mode-1 unfolding [M_1 Q … M_T Q], contracted over tasks and columns at once."""
    Y = cores if Q is None else cores @ Q.unsqueeze(-3)
    return torch.einsum("...tik,...tjk->...ij", Y, Y)


def hosvd_bases(cores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """HOSVD start: P = top-k left singular vectors of [M_1 … M_T] (a × T·b), Q = top-k right
    singular vectors of [M_1; …; M_T] (T·a × b), from their Gram matrices, float64."""
    x = cores.double()
    a, b = x.shape[-2:]
    P = _top_eigenvectors(_left_gram(x, None), min(k, a))
    Q = _top_eigenvectors(_left_gram(x.mT, None), min(k, b))
    return P, Q


def tucker2_bases(
    cores: Tensor, k: int, beta: float = 1.0, iterations: int = HOOI_ITERATIONS
) -> tuple[Tensor, Tensor]:
    """Shared bases P (..., a, k_a), Q (..., b, k_b) of a Tucker-2 fit to the cores (..., T, a, b).

    Maximises Σ_t ‖Pᵀ M̃_t Q‖²_F over orthonormal P, Q (M̃_t: :func:`rescale_towards_mean_norm`
    with ``beta``) by HOOI: from the HOSVD, alternately P ← top-k eigenvectors of
    Σ_t M̃_t Q Qᵀ M̃_tᵀ and Q ← top-k eigenvectors of Σ_t M̃_tᵀ P Pᵀ M̃_t (De Lathauwer, De Moor
    and Vandewalle, SIAM J. Matrix Anal. Appl. 21(4), 2000, Alg. 4.2; each sweep cannot lower
    the fit). k_a = min(k, a), k_b = min(k, b). Float64 inside; the bases come back in the
    cores' dtype.
    """
    if k < 1:
        raise ValueError(f"the shared rank k must be at least 1, not {k}")
    x = rescale_towards_mean_norm(cores, beta).double()
    P, Q = hosvd_bases(x, k)
    for _ in range(iterations):
        P = _top_eigenvectors(_left_gram(x, Q), P.shape[-1])
        Q = _top_eigenvectors(_left_gram(x.mT, P), Q.shape[-1])
    return P.to(cores.dtype), Q.to(cores.dtype)


def project(cores: Tensor, P: Tensor, Q: Tensor) -> Tensor:
    """C_t = Pᵀ M_t Q for every task: (..., T, a, b) → (..., T, k_a, k_b), float64 inside."""
    P64, Q64 = P.double().unsqueeze(-3), Q.double().unsqueeze(-3)
    return (P64.mT @ cores.double() @ Q64).to(cores.dtype)


def lift(merged: Tensor, P: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """The merged coordinates C (..., k_a, k_b) back in core space as thin factors
    (P C, Qᵀ), so that M = (P C) Qᵀ: the module's LoRA pair is B = U_ref (P C),
    A = Qᵀ V_refᵀ, of rank k_b ≤ k. Never forms the a × b matrix."""
    return P @ merged, Q.mT


def captured_energy(cores: Tensor, coordinates: Tensor) -> Tensor:
    """Σ_t ‖C_t‖² / Σ_t ‖M_t‖² per module (...,): the share of the tasks' energy the bases
    keep (1.0 for modules with no energy at all)."""
    total = cores.double().square().sum((-3, -2, -1))
    kept = coordinates.double().square().sum((-3, -2, -1))
    return torch.where(total > 0, kept / total.clamp(min=torch.finfo(torch.float64).tiny), 1.0)


def shared_bases(
    cores: Tensor, k: int, beta: float = 1.0, iterations: int = HOOI_ITERATIONS
) -> SharedBases:
    """Steps 1–2 of the module docstring: the Tucker-2 bases and the tasks' coordinates.

    >>> import torch
    >>> cores = torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(0))
    >>> sb = shared_bases(cores, k=4)
    >>> sb.P.shape, sb.Q.shape, sb.coordinates.shape
    (torch.Size([12, 4]), torch.Size([12, 4]), torch.Size([3, 4, 4]))
    >>> left, right = lift(sb.coordinates.sum(-3), sb.P, sb.Q)
    >>> int(torch.linalg.matrix_rank(left @ right))
    4
    """
    P, Q = tucker2_bases(cores, k, beta, iterations)
    coordinates = project(cores, P, Q)
    return SharedBases(P, Q, coordinates, captured_energy(cores, coordinates))


def rank_aware_isotropize(x: Tensor) -> Tensor:
    """Iso-C's isotropize over the numerical rank of x (..., p, q) only: every nonzero
    singular value becomes their mean, zero ones stay zero (the Compress-then-Merge
    reference's ``isotropize_matrix``). On a merged k × k C of full rank it equals the plain
    isotropize; it differs when C has rank below k. Float64 inside."""
    x64 = x.double()
    U, S, Vh = torch.linalg.svd(x64, full_matrices=False)
    tol = S.amax(-1, keepdim=True) * max(x.shape[-2:]) * torch.finfo(torch.float32).eps
    nonzero = tol < S
    count = nonzero.sum(-1, keepdim=True).clamp(min=1)
    mean = (S * nonzero).sum(-1, keepdim=True) / count
    return ((U * (mean * nonzero)[..., None, :]) @ Vh).to(x.dtype)


def isotropic_truncation(merged: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Iso-C at rank k without losing its point: cut the merged task arithmetic M (..., a, b)
    to its top k singular directions, THEN give them one singular value, the mean of the
    nonzero ones among the k (:func:`rank_aware_isotropize` of the truncation).

    Truncating Iso-C's result instead keeps k/R of a flat spectrum; isotropizing after the cut
    spends the whole budget on the k directions the output can carry (the Compress-then-Merge
    reference isotropizes after its low-rank step, over the rank the matrix has). Returned as
    thin factors (P_k s̄, Q_kᵀ), (..., a, k) and (..., k, b): the module's pair is
    B = U_ref (P_k s̄), A = Q_kᵀ V_refᵀ. Float64 inside; one SVD of M.
    """
    if k < 1:
        raise ValueError(f"the rank k must be at least 1, not {k}")
    U, S, Vh = torch.linalg.svd(merged.double(), full_matrices=False)
    U, S, Vh = U[..., :k], S[..., :k], Vh[..., :k, :]
    tol = S.amax(-1, keepdim=True) * max(merged.shape[-2:]) * torch.finfo(torch.float32).eps
    nonzero = tol < S
    mean = (S * nonzero).sum(-1, keepdim=True) / nonzero.sum(-1, keepdim=True).clamp(min=1)
    left = U * (mean * nonzero)[..., None, :]
    return left.to(merged.dtype), Vh.to(merged.dtype)
