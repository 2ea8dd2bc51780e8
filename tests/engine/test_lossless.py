"""Core space is lossless for task arithmetic (docs/methods.md, the paper's theorem)."""

from __future__ import annotations

import pytest
import torch

from worker.engine import core_matrices, reference_bases

from .refs import (
    F64,
    HETERO_M,
    HETERO_N,
    HETERO_RANKS,
    bases_residual,
    bases_ta,
    delta_ws,
    dense,
    make_factors,
    rel_err,
    run,
)

R = sum(HETERO_RANKS)


def test_core_ta_equals_full_ta_and_the_float64_sum_in_float32(hetero32, hetero32_as64):
    truth = sum(delta_ws(hetero32_as64))
    core = run(hetero32, "ta", space="core")
    full = run(hetero32, "ta", space="full")
    assert core.B.dtype == core.A.dtype == torch.float32
    assert rel_err(dense(core), truth) <= 1e-5
    assert rel_err(dense(full), truth) <= 1e-5
    assert rel_err(dense(core), dense(full)) <= 1e-5
    # Exact rank Σ r_t, written as a LoRA pair of that rank.
    assert core.B.shape == (HETERO_M, R) and core.A.shape == (R, HETERO_N)
    assert core.kept_energy is None and full.kept_energy is None


def test_core_ta_in_float64_is_exact(hetero64):
    truth = sum(delta_ws(hetero64))
    assert rel_err(dense(run(hetero64, "ta", space="core")), truth) <= 1e-12
    assert rel_err(dense(run(hetero64, "ta", space="full")), truth) <= 1e-12


@pytest.mark.parametrize(("fixture", "tol"), [("hetero32", 1e-5), ("hetero64", 1e-12)])
def test_core_matrices_reconstruct_each_update(request, fixture, tol):
    factors = request.getfixturevalue(fixture)
    bases = reference_bases(factors)
    Ms = core_matrices(factors, bases)
    assert len(Ms) == len(factors)
    U, V = bases.U.to(F64), bases.V.to(F64)
    for M, dW in zip(Ms, delta_ws(factors), strict=True):
        assert M.shape == (R, R)
        assert rel_err(U @ M.to(F64) @ V.mT, dW) <= tol


@pytest.mark.parametrize(("fixture", "tol"), [("hetero32", 1e-5), ("hetero64", 1e-12)])
def test_self_check_residual_is_tiny_for_lossless_inputs(request, fixture, tol):
    factors = request.getfixturevalue(fixture)
    assert 0.0 <= bases_residual(factors) < tol
    merged = run(factors, "ties", {"density": 1.0}, space="core")  # a method through the bases
    assert merged.residual is not None and 0.0 <= merged.residual < tol


@pytest.mark.parametrize(("fixture", "tol"), [("hetero32", 1e-5), ("hetero64", 1e-12)])
def test_core_ta_through_the_bases_equals_the_stacked_sum_it_takes(request, fixture, tol):
    """Algorithm 1's TA, U (Σ M_t) Vᵀ, is the stacked sum B_stack A_stack the engine writes."""
    factors = request.getfixturevalue(fixture)
    merged = run(factors, "ta", {"alpha": 0.5}, space="core")
    B_stack = torch.cat([f.B for f in factors], dim=1)
    A_stack = torch.cat([f.A for f in factors], dim=0)
    assert torch.equal(merged.B, 0.5 * B_stack) and torch.equal(merged.A, A_stack)
    assert merged.residual is None and merged.alpha == 0.5
    assert rel_err(bases_ta(factors), sum(delta_ws(factors))) <= tol
    assert rel_err(0.5 * bases_ta(factors), dense(merged)) <= tol


def test_core_ta_takes_the_bases_when_it_needs_them(hetero64):
    """alpha "auto", isotropize and output.rank need the core matrices: Algorithm 1 runs."""
    for params, rank in (({"alpha": "auto"}, None), ({"isotropize": True}, None), ({}, 4)):
        assert run(hetero64, "ta", params, space="core", rank=rank).residual is not None


def test_self_check_residual_does_not_depend_on_relative_weights():
    """A job weight of 1e-4 (any finite weight is legal) must not fail the lossless check."""
    factors = make_factors(128, 96, (8, 8, 8), seed=0, scales=(1.0, 1.0, 1e-4), dtype=torch.float32)
    bases = reference_bases(factors)
    small = factors[2]
    U, V = bases.U.to(F64), bases.V.to(F64)
    B, A = small.B.to(F64), small.A.to(F64)
    # The bases themselves are fine: the small adapter lies in their span to float32 accuracy.
    assert rel_err(U @ (U.mT @ B), B) <= 1e-5
    assert rel_err((A @ V) @ V.mT, A) <= 1e-5
    exact_M = (U.mT @ B) @ (A @ V)
    assert rel_err(core_matrices(factors, bases)[2], exact_M) <= 1e-5
    assert bases_residual(factors) < 1e-5


def test_residual_is_reported_only_by_core_space(hetero64):
    assert run(hetero64, "ta", space="full").residual is None
    assert run(hetero64, "ta", space="knots").residual is None


def test_reference_bases_are_the_singular_vectors_of_the_stacks(hetero64):
    """TIES and DARE act entry by entry, so the bases must be the SVD's, not any basis."""
    bases = reference_bases(hetero64)
    B_stack = torch.cat([f.B for f in hetero64], dim=1)
    A_stack = torch.cat([f.A for f in hetero64], dim=0)
    U, V = bases.U, bases.V
    assert U.shape == (HETERO_M, R) and V.shape == (HETERO_N, R)
    eye = torch.eye(R, dtype=F64)
    assert torch.allclose(U.mT @ U, eye, atol=1e-12)
    assert torch.allclose(V.mT @ V, eye, atol=1e-12)
    assert torch.allclose(bases.UtB, U.mT @ B_stack, atol=1e-12)
    assert torch.allclose(bases.AV, A_stack @ V, atol=1e-12)
    # Each column of U (V) matches the dense SVD's singular vector up to its sign.
    U_ref, S_b, _ = torch.linalg.svd(B_stack, full_matrices=False)
    V_ref = torch.linalg.svd(A_stack, full_matrices=False).Vh.mT
    assert torch.allclose((U.mT @ U_ref).abs(), eye, atol=1e-8)
    assert torch.allclose((V.mT @ V_ref).abs(), eye, atol=1e-8)
    # Equivalently, Uᵀ B_stack has orthogonal rows of decreasing norm S_b.
    gram = bases.UtB @ bases.UtB.mT
    assert torch.allclose(gram, torch.diag(S_b**2), atol=1e-9 * float(S_b[0] ** 2))


@pytest.mark.parametrize(
    ("method", "params"),
    [("ta", {}), ("ta", {"alpha": -0.7}), ("dare", {"drop": 0.0, "alpha": 2.0})],
)
@pytest.mark.parametrize(("fixture", "tol"), [("hetero32", 1e-5), ("hetero64", 1e-12)])
def test_linear_methods_agree_in_core_and_full_space(request, fixture, tol, method, params):
    factors = request.getfixturevalue(fixture)
    core = dense(run(factors, method, params, space="core"))
    full = dense(run(factors, method, params, space="full"))
    alpha = params.get("alpha", 1.0)
    assert rel_err(core, full) <= tol
    assert rel_err(core, alpha * sum(delta_ws(factors))) <= tol
