"""Small linear-algebra building blocks of the engine, all on thin factors.

Every SVD the engine needs is of a matrix that is either tall and skinny (a stacked factor,
m × R with R ≪ m) or a product of two thin factors (B A with inner size k). Both reduce to
a QR of the thin factors and the SVD of a small square matrix: the same singular values and
vectors as a generic SVD (up to the sign of each pair), at a fraction of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "MAX_GRAM_CONDITION",
    "Basis",
    "factored_svd",
    "isotropize",
    "left_singular_basis",
    "numerical_rank",
    "polar",
    "truncate",
]


#: The Gram route to a basis (below) is taken only for stacks at most this ill-conditioned:
#: it then loses at most about 32·eps (float32) of accuracy.
MAX_GRAM_CONDITION = 32.0


@dataclass(frozen=True)
class Basis:
    """Orthonormal columns U (m × k) spanning a tall stacked factor x (m × R).

    Kept either explicitly (``U``) or implicitly as ``U = x @ K`` with a small K (R × k): the
    implicit form lets U @ M be computed as x @ (K M), one product with the tall factor
    instead of two, and never materialises U.
    """

    x: Tensor
    K: Tensor | None = None
    U: Tensor | None = None

    def apply(self, M: Tensor) -> Tensor:
        """U @ M."""
        return self.U @ M if self.U is not None else self.x @ (self.K @ M)

    def apply_t(self, M: Tensor) -> Tensor:
        """M @ Uᵀ."""
        return M @ self.U.mT if self.U is not None else (M @ self.K.mT) @ self.x.mT

    def transposed(self) -> Tensor:
        """Uᵀ (k × m), contiguous: the merged adapter's A when U is V_ref."""
        return self.U.mT.contiguous() if self.U is not None else self.K.mT @ self.x.mT

    def rows(self, index: Tensor) -> Tensor:
        """U[index]."""
        return self.U[index] if self.U is not None else self.x[index] @ self.K

    @property
    def matrix(self) -> Tensor:
        return self.U if self.U is not None else self.x @ self.K


def _basis_by_qr(x: Tensor) -> tuple[Basis, Tensor]:
    Q, Rx = torch.linalg.qr(x, mode="reduced")
    Ur, _, _ = torch.linalg.svd(Rx, full_matrices=False)
    return Basis(x=x, U=Q @ Ur), Ur.mT @ Rx


def _basis_by_gram(x: Tensor) -> tuple[Basis, Tensor] | None:
    """U and Uᵀx from the eigendecomposition of the float64 Gram matrix xᵀx = V S² Vᵀ.

    Then U = x V S⁻¹ and Uᵀ x = S Vᵀ. In float64 the Gram matrix costs accuracy only in
    proportion to cond(x)², and the float32 product x V S⁻¹ about cond(x)·eps; so this route is
    taken only when cond(x) ≤ ``MAX_GRAM_CONDITION`` and returns None otherwise.
    """
    xd = x.double()
    eigenvalues, V = torch.linalg.eigh(xd.mT @ xd)
    eigenvalues, V = eigenvalues.flip(0), V.flip(1)  # descending, as an SVD orders them
    if not eigenvalues[-1] * MAX_GRAM_CONDITION**2 >= eigenvalues[0] > 0:
        return None
    S = eigenvalues.sqrt()
    return Basis(x=x, K=(V / S).to(x.dtype)), (S[:, None] * V.mT).to(x.dtype)


def left_singular_basis(x: Tensor) -> tuple[Basis, Tensor]:
    """Left singular vectors U of x (m × R) and the coordinates Uᵀ x, from x's QR and the SVD of R.

    x = Q R and R = Ur S Vh, so U = Q Ur and Uᵀ x = Urᵀ R. The coordinates are taken as Urᵀ R
    rather than S Vh: equal in exact arithmetic, but only Urᵀ R is accurate column by column
    in float32 (a zero column of x gives an exactly zero column). When x is well-conditioned,
    the float64 Gram matrix gives the same singular vectors about twice as fast as the
    Householder QR on a tall factor, and U stays implicit (:func:`_basis_by_gram`);
    rank-deficient, ill-conditioned and wide stacks take the QR.
    """
    return _basis_by_gram(x) or _basis_by_qr(x)


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
