"""Every route to the reference bases (float32 Gram, float64 Gram, Householder QR) gives the
same bases, orthonormal to float32 accuracy."""

from __future__ import annotations

import pytest
import torch

from worker.engine import reference_bases
from worker.engine.linalg import (
    MAX_F32_GRAM_CONDITION,
    MAX_GRAM_CONDITION,
    Basis,
    left_singular_basis,
)

from .refs import dense, make_factors, ref_core, rel_err, run


def _stack(m: int, R: int, condition: float, seed: int = 0) -> torch.Tensor:
    """An m × R float32 matrix with singular values spread from 1 to 1/condition."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, R, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(R, R, generator=g, dtype=torch.float64))
    S = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), R, dtype=torch.float64)
    return ((U * S) @ V.mT).float()


def _basis(x: torch.Tensor) -> Basis:
    """One stack's basis (the group of one)."""
    return left_singular_basis(x[None])


def _householder(x: torch.Tensor) -> torch.Tensor:
    """The QR route's U, as the engine takes it: Q of x's QR times the left singular vectors
    of its R factor."""
    Q, R = torch.linalg.qr(x)
    return Q @ torch.linalg.svd(R).U


def _same_columns_up_to_sign(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    signs = torch.sign((a * b).sum(0))
    return torch.allclose(a, b * signs, atol=tol)


def test_gram_route_matches_householder_qr() -> None:
    x = _stack(600, 24, condition=10.0)
    gram = _basis(x)
    assert gram.routes == ("gram64",) and gram.on_the_stack  # well-conditioned: the Gram route
    U_gram, U_qr = gram.matrix[0], _householder(x)
    assert _same_columns_up_to_sign(U_gram, U_qr, tol=1e-5)
    eye = torch.eye(24)
    assert torch.allclose(U_gram.mT @ U_gram, eye, atol=1e-5)
    # The coordinates reproduce x.
    assert torch.allclose(gram.apply(gram.coords)[0], x, atol=1e-5)


def test_ill_conditioned_and_rank_deficient_stacks_take_the_qr() -> None:
    ill = _stack(600, 24, condition=10 * MAX_GRAM_CONDITION)
    basis = _basis(ill)
    assert basis.routes == ("qr",) and not basis.on_the_stack
    U = basis.matrix[0]
    assert torch.allclose(U.mT @ U, torch.eye(24), atol=1e-5)
    duplicate = torch.cat([ill[:, :12], ill[:, :12]], dim=1)
    basis = _basis(duplicate)
    assert basis.routes == ("qr",)
    assert torch.allclose(basis.apply(basis.coords)[0], duplicate, atol=1e-5)


def test_wide_stack_takes_the_qr() -> None:
    x = torch.randn(6, 10)
    basis = _basis(x)
    assert basis.routes == ("qr",)
    assert torch.allclose(basis.apply(basis.coords)[0], x, atol=1e-5)


@pytest.mark.parametrize("m", [1024, 4096, 14336])
@pytest.mark.parametrize(
    "condition",
    [1.5, MAX_F32_GRAM_CONDITION * 0.99, MAX_F32_GRAM_CONDITION * 2, MAX_GRAM_CONDITION],
)
def test_gram_routes_are_orthonormal_to_float32_accuracy(m: int, condition: float) -> None:
    """The Llama widths at rank 128: the float32 Gram (cond ≤ 4) and the float64 Gram (≤ 32)
    both give U with ‖UᵀU − I‖₂ ≤ 1e-5, the accuracy of a float32 Householder QR."""
    x = _stack(m, 128, condition=condition, seed=m)
    basis = _basis(x)
    assert basis.routes[0] in ("gram32", "gram64")
    U = basis.matrix[0].double()
    error = torch.linalg.matrix_norm(U.mT @ U - torch.eye(128, dtype=torch.float64), ord=2)
    assert error <= 1e-5
    Q = _householder(x).double()
    qr_error = torch.linalg.matrix_norm(Q.mT @ Q - torch.eye(128, dtype=torch.float64), ord=2)
    assert error <= max(4 * qr_error, 5e-6)  # no worse than the QR it replaces, give or take


def test_float32_gram_is_used_only_when_well_conditioned(monkeypatch: pytest.MonkeyPatch) -> None:
    """The float64 Gram is formed only above MAX_F32_GRAM_CONDITION."""
    doubled: list[tuple[int, ...]] = []
    original = torch.Tensor.double

    def spy(self: torch.Tensor) -> torch.Tensor:
        if self.ndim == 3 and self.shape[1] > self.shape[2]:  # the tall stack itself
            doubled.append(tuple(self.shape))
        return original(self)

    monkeypatch.setattr(torch.Tensor, "double", spy)
    assert _basis(_stack(600, 24, condition=2.0)).routes == ("gram32",)
    assert doubled == []
    assert _basis(_stack(600, 24, condition=10.0)).routes == ("gram64",)
    assert doubled == [(1, 600, 24)]


def test_float32_overflow_decides_in_float64() -> None:
    x = _stack(600, 24, condition=2.0) * 1e20  # x is finite, xᵀx overflows float32
    basis = _basis(x)
    assert basis.routes == ("gram64",)  # still the Gram route, in float64
    assert (basis.apply(basis.coords)[0] - x).norm() <= 1e-5 * x.norm()


@pytest.mark.parametrize(("m", "n"), [(192, 80), (80, 192)])
def test_the_map_back_writes_the_wider_stack_as_it_is(m: int, n: int) -> None:
    """With both bases on the Gram route, U M Vᵀ is written as B_stack C A_stack with C on
    the narrower side: the wider side's factor is its stack, bit for bit, and the update is
    the float64 reference's."""
    factors = make_factors(m, n, (4, 6, 2), seed=3)
    bases = reference_bases(factors)
    assert bases.left.on_the_stack and bases.right.on_the_stack  # well-conditioned stacks
    params = {"density": 0.5}
    merged = run(factors, "ties", params)
    if m >= n:
        assert torch.equal(merged.B, torch.cat([f.B for f in factors], dim=1))
    else:
        assert torch.equal(merged.A, torch.cat([f.A for f in factors], dim=0))
    assert rel_err(dense(merged), ref_core(factors, "ties", params)) <= 1e-10


@pytest.mark.parametrize("m", [3000, 2 * 4096 + 20])
def test_the_qr_route_over_the_stack_gives_the_same_basis(m: int) -> None:
    """``overwrite``: U formed in the stack's own memory by a blocked QR (one block, or
    several with a last one shorter than R) is the Householder route's, and the stack's
    buffer holds it."""
    x = _stack(m, 48, condition=10 * MAX_GRAM_CONDITION, seed=m)
    buffer = x.clone()
    basis = left_singular_basis(buffer[None], overwrite=True)
    assert basis.routes == ("qr",) and basis.owned
    U = basis.matrix[0]
    assert U.data_ptr() == buffer.data_ptr()  # formed over the stack
    assert torch.allclose(U.mT @ U, torch.eye(48), atol=2e-5)
    assert torch.allclose((U @ basis.coords[0]), x, atol=1e-6)
    # Left singular vectors: Uᵀx = S Vh has orthogonal rows, in the SVD's order.
    gram = basis.coords[0].double() @ basis.coords[0].double().mT
    off = gram - torch.diag(gram.diagonal())
    assert off.abs().max() <= 1e-5 * gram.diagonal().max()
    assert torch.all(gram.diagonal()[:-1] >= gram.diagonal()[1:])
