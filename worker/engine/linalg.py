"""Small linear-algebra building blocks of the engine, all on thin factors.

Every SVD the engine needs is of a matrix that is either tall and skinny (a stacked factor,
m × R with R ≪ m) or a product of two thin factors (B A with inner size k). Both reduce to
a QR of the thin factors and the SVD of a small square matrix: the same singular values and
vectors as a generic SVD (up to the sign of each pair), at a fraction of the cost.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "factored_svd",
    "isotropize",
    "left_singular_basis",
    "numerical_rank",
    "polar",
    "truncate",
]


def left_singular_basis(x: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors U of x (m × R) and the coordinates Uᵀ x, by QR + small SVD.

    x = Q Rx and Rx = Ur S Vh, so U = Q Ur. The coordinates are taken as Urᵀ Rx rather than
    S Vh: the two agree in exact arithmetic, but Urᵀ Rx is accurate column by column (a zero
    column of x gives an exactly zero column), while S Vh is accurate only for x as a whole.
    """
    Q, Rx = torch.linalg.qr(x, mode="reduced")
    Ur, _, _ = torch.linalg.svd(Rx, full_matrices=False)
    return Q @ Ur, Ur.mT @ Rx


def factored_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Economy SVD of the product ``B @ A`` (m × k times k × n) without forming it.

    B = Qb Rb, Aᵀ = Qa Ra, so B A = Qb (Rb Raᵀ) Qaᵀ and only the k × k middle is decomposed.
    Returns U (m × k'), S (k'), Vh (k' × n), k' = min(m, n, k).
    """
    Qb, Rb = torch.linalg.qr(B, mode="reduced")
    Qa, Ra = torch.linalg.qr(A.mT, mode="reduced")
    Us, S, Vhs = torch.linalg.svd(Rb @ Ra.mT, full_matrices=False)
    return Qb @ Us, S, Vhs @ Qa.mT


def numerical_rank(S: Tensor, shape: tuple[int, int]) -> int:
    """Number of singular values above ``max(S) · max(shape) · eps`` (LAPACK's usual tolerance)."""
    if S.numel() == 0:
        return 0
    tol = S.max() * max(shape) * torch.finfo(S.dtype).eps
    return int((tol < S).sum())


def truncate(U: Tensor, S: Tensor, Vh: Tensor, k: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-k approximation of ``U diag(S) Vh`` as a LoRA pair (B, A) and its kept energy.

    Kept energy is Σ_{i<k} S_i² / Σ S_i² (1.0 for an all-zero matrix).
    """
    k = min(k, S.numel())
    total = float((S.double() ** 2).sum())
    kept = float((S[:k].double() ** 2).sum())
    return U[:, :k] * S[:k], Vh[:k], (kept / total if total > 0 else 1.0)


def polar(x: Tensor) -> Tensor:
    """Orthogonal polar factor of x: with x = P Σ Qᵀ, returns P Qᵀ (the nearest semi-orthogonal)."""
    P, _, Qh = torch.linalg.svd(x, full_matrices=False)
    return P @ Qh


def isotropize(x: Tensor) -> Tensor:
    """Replace every singular value of x (all min(m, n) of them) by their mean (Iso-C)."""
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    return (U * S.mean()) @ Vh
