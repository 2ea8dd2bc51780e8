"""Edge cases: one adapter, R = Σ r_t beyond m or n, a zero adapter, duplicated adapters."""

from __future__ import annotations

import pytest
import torch

from worker.engine import LoraFactors, core_matrices, merge_module, reference_bases

from .refs import (
    REF_SPACES,
    bases_residual,
    bases_ta,
    delta_ws,
    dense,
    make_factors,
    ref_core,
    ref_full,
    rel_err,
    run,
    to64,
)


def max_abs(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


SPACES = ["core", "full", "knots"]
NONLINEAR = [
    ("ties", {"density": 0.3}),
    ("dare", {"drop": 0.3}),
    ("dare_ties", {"drop": 0.3, "density": 0.5}),
    ("tsv", {}),
    ("cart", {"rank_fraction": 0.4, "lam": 0.6}),
]


def test_merge_module_refuses_an_empty_list():
    with pytest.raises(ValueError, match="at least one"):
        merge_module([], "ta", {"alpha": 1.0})


# ---------------------------------------------------------------------------- one adapter


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ta", {}),
        ("ties", {"density": 1.0}),
        ("dare", {"drop": 0.0}),
        ("tsv", {}),
        ("cart", {"rank_fraction": 0.5, "lam": 2.0}),
    ],
)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_single_adapter_is_returned_unchanged(space, method, params, dtype, tol):
    (f,) = make_factors(20, 12, (5,), seed=3, scales=(2.5,), dtype=dtype)
    merged = run([f], method, params, space=space)
    assert merged.B.dtype == dtype
    assert rel_err(dense(merged), f.B.double() @ f.A.double()) <= tol


@pytest.mark.parametrize("space", SPACES)
def test_single_adapter_iso_c(space):
    """Core: the r non-zero singular values are averaged; full: all min(m, n) of them; knots:
    the block V_1 is already isotropic, so ΔW = U diag(S) V_1 comes back unchanged."""
    (f,) = make_factors(20, 12, (5,), seed=3)
    dW = f.B @ f.A
    merged = dense(run([f], "iso_c", space=space))
    if space == "knots":
        assert rel_err(merged, dW) <= 1e-10
        return
    s = torch.linalg.svdvals(merged)
    k = 12 if space == "full" else 5
    want = torch.linalg.svdvals(dW).sum() / k
    assert torch.allclose(s[:k], want.expand(k), rtol=1e-10)
    assert max_abs(s[k:]) <= 1e-10 * float(want)


# ---------------------------------------------------------------------------- R > m or n


@pytest.mark.parametrize(("m", "n"), [(6, 5), (48, 5), (5, 48)])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_stack_wider_than_the_module_is_still_lossless(m, n, dtype, tol):
    factors = make_factors(m, n, (4, 4), seed=5, scales=(1.0, -2.0), dtype=dtype)
    bases = reference_bases(factors)
    a, b = min(m, 8), min(n, 8)
    assert bases.U.shape == (m, a) and bases.V.shape == (n, b)
    assert all(M.shape == (a, b) for M in core_matrices(factors, bases))
    truth = sum(delta_ws(factors))
    for space in SPACES:
        merged = run(factors, "ta", space=space)
        assert merged.B.shape[0] == m and merged.A.shape[1] == n
        assert rel_err(dense(merged), truth) <= tol
    assert bases_residual(factors) < tol
    assert rel_err(bases_ta(factors), truth) <= tol


@pytest.mark.parametrize(("m", "n"), [(6, 5), (48, 5)])
@pytest.mark.parametrize("space", ["core", "full"])
@pytest.mark.parametrize(("method", "params"), [*NONLINEAR, ("iso_c", {})])
def test_stack_wider_than_the_module_matches_reference(m, n, space, method, params):
    factors = make_factors(m, n, (4, 4), seed=5, scales=(1.0, -2.0))
    got = dense(run(factors, method, params, space=space, seed=4))
    assert rel_err(got, REF_SPACES[space](factors, method, params, seed=4)) <= 1e-8


# ---------------------------------------------------------------------------- zero adapter


@pytest.fixture(scope="module")
def with_zero(hetero64):
    """The heterogeneous adapters with the rank-8 one's B zeroed (rank-deficient B stack)."""
    f = hetero64[2]
    return [*hetero64[:2], LoraFactors(A=f.A, B=torch.zeros_like(f.B)), hetero64[3]]


@pytest.mark.parametrize("space", SPACES)
def test_zero_adapter_ta_is_lossless(with_zero, space):
    merged = run(with_zero, "ta", space=space)
    assert rel_err(dense(merged), sum(delta_ws(with_zero))) <= 1e-12
    if space == "core":
        assert 0.0 <= bases_residual(with_zero) < 1e-12
        assert rel_err(bases_ta(with_zero), sum(delta_ws(with_zero))) <= 1e-12


@pytest.mark.parametrize(
    ("space", "method", "params"),
    [
        pytest.param(space, method, params, marks=())
        if space == "core" and method in ("ties", "dare_ties", "tsv")
        else (space, method, params)
        for space in ("core", "full")
        for method, params in NONLINEAR
    ],
)
def test_zero_adapter_nonlinear_matches_reference(with_zero, space, method, params):
    got = dense(run(with_zero, method, params, space=space, seed=6))
    assert torch.isfinite(got).all()
    assert rel_err(got, REF_SPACES[space](with_zero, method, params, seed=6)) <= 1e-8


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tsv_with_a_zero_weight_adapter_agrees_in_core_and_full_space(dtype):
    """Equal ranks with R/T = r: TSV is basis-free, so core = full; a job weight of 0 (B_t = 0)
    must leave task t out (numerical rank 0), as full space does. Engine: ~55% apart."""
    factors = make_factors(16, 16, (2, 2, 2), seed=7, scales=(1.0, 0.0, 1.0), dtype=dtype)
    core = dense(run(factors, "tsv", space="core"))
    full = dense(run(factors, "tsv", space="full"))
    assert rel_err(full, ref_full(factors, "tsv", {})) <= 1e-5
    assert rel_err(core, full) <= 1e-4


def test_tsv_agrees_in_core_and_full_space_with_equal_ranks():
    """The control for the test above: without the zero-weight adapter core = full."""
    factors = make_factors(16, 16, (2, 2, 2), seed=7, scales=(1.0, 0.5, 1.0))
    core = dense(run(factors, "tsv", space="core"))
    assert rel_err(core, dense(run(factors, "tsv", space="full"))) <= 1e-10


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("method", ["ta", "ties", "dare", "dare_ties", "tsv", "cart", "iso_c"])
def test_zero_adapter_never_produces_nan(with_zero, space, method):
    merged = run(
        [LoraFactors(A=f.A.float(), B=f.B.float()) for f in with_zero],
        method,
        {},
        space=space,
        rank=4,
    )
    assert torch.isfinite(merged.B).all() and torch.isfinite(merged.A).all()
    assert merged.kept_energy is not None and 0.0 < merged.kept_energy <= 1.0


@pytest.mark.parametrize("space", ["core", "full"])
@pytest.mark.parametrize("method", ["ta", "ties", "tsv", "cart", "iso_c"])
def test_all_zero_module_merges_to_zero(space, method):
    factors = [
        LoraFactors(A=f.A, B=torch.zeros_like(f.B)) for f in make_factors(8, 6, (2, 3), seed=0)
    ]
    merged = run(factors, method, space=space)
    assert max_abs(dense(merged)) == 0.0


# ---------------------------------------------------------------------------- duplicates


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_duplicated_adapters_are_lossless(hetero64, space, dtype, tol):
    f, g = hetero64[1], hetero64[3]
    factors = [LoraFactors(A=x.A.to(dtype), B=x.B.to(dtype)) for x in (f, g, f, f, g)]
    merged = run(factors, "ta", space=space)
    want = 3 * (f.B @ f.A) + 2 * (g.B @ g.A)
    assert rel_err(dense(merged), want) <= tol
    if space == "core":
        assert bases_residual(factors) < tol
        assert rel_err(bases_ta(factors), want) <= tol


@pytest.mark.parametrize(("method", "params"), [c for c in NONLINEAR if c[0] != "tsv"])
def test_duplicated_adapters_nonlinear_matches_reference(hetero64, method, params):
    """(TSV is left out: duplicated tasks make the concatenated U_c rank-deficient, and its
    polar factor, hence the merge, is then not unique.)"""
    f, g = hetero64[1], hetero64[3]
    factors = to64([f, g, f])
    got = dense(run(factors, method, params, space="core", seed=1))
    assert rel_err(got, ref_core(factors, method, params, seed=1)) <= 1e-8
    got = dense(run(factors, method, params, space="full", seed=1))
    assert rel_err(got, ref_full(factors, method, params, seed=1)) <= 1e-8
