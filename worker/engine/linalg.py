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
    "MAX_F32_GRAM_CONDITION",
    "MAX_GRAM_CONDITION",
    "Basis",
    "NonFiniteError",
    "factored_svd",
    "isotropize",
    "left_singular_basis",
    "numerical_rank",
    "polar",
    "svd",
    "truncate",
]


#: The Gram route to a basis (below) is taken only for stacks at most this ill-conditioned,
#: with the Gram matrix in float64: U = x V S⁻¹ is then orthonormal to about 4e-6.
MAX_GRAM_CONDITION = 32.0
#: Up to this condition number the Gram matrix is formed in float32 (three times faster on a
#: CPU): its rounding error grows as cond², and at 4 U is still orthonormal to about 4e-6,
#: as good as the float64 Gram at 32 or a float32 Householder QR (tests/engine/test_bases.py).
MAX_F32_GRAM_CONDITION = 4.0


class NonFiniteError(ArithmeticError):
    """A matrix to decompose holds NaN or ±inf: the merge's own arithmetic overflowed float32
    (huge weights, alpha or scalings), since the inputs are checked finite as they are read."""


def svd(x: Tensor, full_matrices: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Economy SVD ``torch.linalg.svd(x, full_matrices=False)`` (or the full one), refusing NaN
    and ±inf first.

    LAPACK given a non-finite matrix either fails ("failed to converge", after printing its
    own error lines) or returns garbage; :class:`NonFiniteError` says what happened instead.
    The check is one pass over x (an SVD costs min(m, n) passes): its sum, and the exact
    test only when the sum is not finite (finite values near float32's limit can overflow it).
    """
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"a {tuple(x.shape)} matrix to decompose has NaN or infinite values")
    return torch.linalg.svd(x, full_matrices=full_matrices)


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
    Ur, _, _ = svd(Rx)
    return Basis(x=x, U=Q @ Ur), Ur.mT @ Rx


def _descending_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    eigenvalues, V = torch.linalg.eigh(gram.double())
    return eigenvalues.flip(0), V.flip(1)  # descending, as an SVD orders them


def _conditioned(eigenvalues: Tensor, condition: float) -> bool:
    """cond(x)² = λ_max / λ_min of the Gram matrix is ≤ condition², all finite, λ_min > 0."""
    top, bottom = eigenvalues[0], eigenvalues[-1]
    return bool(torch.isfinite(top) and bottom > 0 and top <= bottom * condition**2)


def _basis_by_gram(x: Tensor) -> tuple[Basis, Tensor] | None:
    """U and Uᵀx from the eigendecomposition of the Gram matrix xᵀx = V S² Vᵀ.

    Then U = x V S⁻¹ and Uᵀ x = S Vᵀ. The Gram matrix costs accuracy in proportion to
    cond(x)² and the product x V S⁻¹ about cond(x)·eps, so it is formed in float32 when
    cond(x) ≤ ``MAX_F32_GRAM_CONDITION``, again in float64 when cond(x) ≤
    ``MAX_GRAM_CONDITION``, and None is returned otherwise (the float32 Gram's eigenvalues
    are good enough to tell which: their error is ~1e-7 of the largest). Whatever the Gram's
    rounding, x = U (S Vᵀ) holds to float32 accuracy; only U's orthonormality depends on it.
    """
    gram = x.mT @ x
    if torch.isfinite(gram).all():  # else it overflowed in float32: decide in float64
        eigenvalues, V = _descending_eigh(gram)
        if _conditioned(eigenvalues, MAX_F32_GRAM_CONDITION):
            return _gram_basis(x, eigenvalues, V)
        if not _conditioned(eigenvalues, 1.01 * MAX_GRAM_CONDITION):  # 1%: the estimate's margin
            return None
    xd = x.double()
    eigenvalues, V = _descending_eigh(xd.mT @ xd)
    if _conditioned(eigenvalues, MAX_GRAM_CONDITION):
        return _gram_basis(x, eigenvalues, V)
    return None


def _gram_basis(x: Tensor, eigenvalues: Tensor, V: Tensor) -> tuple[Basis, Tensor]:
    S = eigenvalues.sqrt()
    return Basis(x=x, K=(V / S).to(x.dtype)), (S[:, None] * V.mT).to(x.dtype)


def left_singular_basis(x: Tensor) -> tuple[Basis, Tensor]:
    """Left singular vectors U of x (m × R) and the coordinates Uᵀ x, from x's QR and the SVD of R.

    x = Q R and R = Ur S Vh, so U = Q Ur and Uᵀ x = Urᵀ R. The coordinates are taken as Urᵀ R
    rather than S Vh: equal in exact arithmetic, but only Urᵀ R is accurate column by column
    in float32 (a zero column of x gives an exactly zero column). When x is well-conditioned,
    the Gram matrix gives the same singular vectors several times faster than the
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
    Us, S, Vhs = svd(Rb @ Ra.mT)
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
    P, _, Qh = svd(x)
    return P @ Qh


def isotropize(x: Tensor) -> Tensor:
    """Replace every singular value of x (all min(m, n) of them) by their mean (Iso-C)."""
    U, S, Vh = svd(x)
    return (U * S.mean()) @ Vh
