"""Both routes to the reference bases (float64 Gram, Householder QR) give the same bases."""

from __future__ import annotations

import torch

from worker.engine.linalg import (
    MAX_GRAM_CONDITION,
    _basis_by_gram,
    _basis_by_qr,
    left_singular_basis,
)


def _stack(m: int, R: int, condition: float, seed: int = 0) -> torch.Tensor:
    """An m × R float32 matrix with singular values spread from 1 to 1/condition."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, R, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(R, R, generator=g, dtype=torch.float64))
    S = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), R, dtype=torch.float64)
    return ((U * S) @ V.mT).float()


def _same_columns_up_to_sign(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    signs = torch.sign((a * b).sum(0))
    return torch.allclose(a, b * signs, atol=tol)


def test_gram_route_matches_householder_qr() -> None:
    x = _stack(600, 24, condition=10.0)
    gram, qr = _basis_by_gram(x), _basis_by_qr(x)
    assert gram is not None and gram[0].K is not None  # well-conditioned: the Gram route
    U_gram, U_qr = gram[0].matrix, qr[0].matrix
    assert _same_columns_up_to_sign(U_gram, U_qr, tol=1e-5)
    eye = torch.eye(24)
    assert torch.allclose(U_gram.mT @ U_gram, eye, atol=1e-5)
    # The coordinates reproduce x in both cases.
    for basis, coords in (gram, qr):
        assert torch.allclose(basis.apply(coords), x, atol=1e-5)


def test_ill_conditioned_and_rank_deficient_stacks_take_the_qr() -> None:
    ill = _stack(600, 24, condition=10 * MAX_GRAM_CONDITION)
    assert _basis_by_gram(ill) is None
    basis, coords = left_singular_basis(ill)
    assert basis.U is not None
    assert torch.allclose(basis.U.mT @ basis.U, torch.eye(24), atol=1e-5)
    duplicate = torch.cat([ill[:, :12], ill[:, :12]], dim=1)
    assert _basis_by_gram(duplicate) is None
    basis, coords = left_singular_basis(duplicate)
    assert torch.allclose(basis.apply(coords), duplicate, atol=1e-5)


def test_wide_stack_takes_the_qr() -> None:
    x = torch.randn(6, 10)
    assert _basis_by_gram(x) is None
    basis, coords = left_singular_basis(x)
    assert torch.allclose(basis.apply(coords), x, atol=1e-5)
