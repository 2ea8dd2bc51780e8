"""Every merge method against an independent float64 reference of docs/methods.md."""

from __future__ import annotations

import math

import pytest
import torch

from jobs.spec import validate_params
from worker.engine import LoraFactors, apply_method

from .refs import (
    F64,
    HETERO_RANKS,
    delta_ws,
    dense,
    make_factors,
    ref_cart,
    ref_core,
    ref_full,
    ref_ta,
    ref_ties,
    rel_err,
    run,
)

#: (method, params) checked in full and core space. Isotropize is only paired with methods
#: whose merged matrix has full rank (see test_isotropize_of_a_rank_deficient_merge…).
CASES = [
    ("ta", {}),
    ("ta", {"alpha": -0.7, "isotropize": True}),
    ("ties", {}),
    ("ties", {"density": 0.2}),
    ("ties", {"density": 1.0}),
    ("ties", {"density": 0.3, "alpha": 1.7, "isotropize": True}),
    ("dare", {"drop": 0.3}),
    ("dare", {"drop": 0.0}),
    ("dare_ties", {"drop": 0.4, "density": 0.3}),
    ("tsv", {}),
    ("tsv", {"alpha": 0.5}),
    ("cart", {}),
    ("cart", {"rank_fraction": 0.2, "lam": 0.5}),
    ("iso_c", {}),
]


def _well_posed(space, method, params):
    """Full space: Σ ΔW_t has rank R < min(m, n), so isotropising it is not well defined."""
    return not (
        space == "full" and (method == "iso_c" or (method == "ta" and params.get("isotropize")))
    )


def _case_id(case):
    method, params = case
    return method + "".join(f"-{k}={v}" for k, v in params.items())


FULL_CASES = [c for c in CASES if _well_posed("full", *c)]


@pytest.mark.parametrize("case", FULL_CASES, ids=_case_id)
def test_full_space_matches_reference(hetero64, case):
    method, params = case
    got = dense(run(hetero64, method, params, space="full", seed=3))
    assert rel_err(got, ref_full(hetero64, method, params, seed=3)) <= 1e-8


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_core_space_matches_reference_on_core_matrices(hetero64, case):
    method, params = case
    merged = run(hetero64, method, params, space="core", seed=3)
    assert merged.B.shape[0] == 48 and merged.A.shape[1] == 40
    assert rel_err(dense(merged), ref_core(hetero64, method, params, seed=3)) <= 1e-8


@pytest.mark.parametrize("space", ["core", "full"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_float32_engine_is_close_to_float64_reference(hetero32, hetero32_as64, space, case):
    """The worker's dtype: same merge as the float64 maths, to float32 accuracy."""
    method, params = case
    if not _well_posed(space, method, params):
        pytest.skip("ill-posed in this space")
    ref = {"core": ref_core, "full": ref_full}[space]
    got = dense(run(hetero32, method, params, space=space, seed=5))
    assert rel_err(got, ref(hetero32_as64, method, params, seed=5)) <= 1e-4


@pytest.mark.parametrize("space", ["core", "full"])
@pytest.mark.parametrize(
    ("method", "params"),
    [("ties", {"density": 0.2}), ("dare", {"drop": 0.5}), ("tsv", {}), ("cart", {})],
)
def test_alpha_scales_the_merge(hetero64, space, method, params):
    base = dense(run(hetero64, method, params, space=space, seed=1))
    for alpha in (2.5, -0.3):
        scaled = dense(run(hetero64, method, {**params, "alpha": alpha}, space=space, seed=1))
        assert rel_err(scaled, alpha * base) <= 1e-12


def test_isotropize_param_on_ta_is_iso_c(hetero64):
    iso = dense(run(hetero64, "iso_c", space="core"))
    ta_iso = dense(run(hetero64, "ta", {"isotropize": True}, space="core"))
    assert rel_err(ta_iso, iso) <= 1e-12


def test_core_iso_c_has_equal_singular_values(hetero64):
    """Core space averages the R singular values of Σ M_t, i.e. the non-zero ones of Σ ΔW_t."""
    R = sum(HETERO_RANKS)
    ta_s = torch.linalg.svdvals(sum(delta_ws(hetero64)))
    s = torch.linalg.svdvals(dense(run(hetero64, "iso_c", space="core")))
    assert torch.allclose(s[:R], ta_s[:R].mean().expand(R), rtol=1e-10)
    assert float(s[R:].abs().max()) <= 1e-10 * float(s[0])


def test_full_iso_c_well_defined_part(hetero64):
    """Full space averages all min(m, n) singular values; on the range of Σ ΔW_t it is mean·I."""
    ta = sum(delta_ws(hetero64))
    U, S, Vh = torch.linalg.svd(ta, full_matrices=False)
    R = sum(HETERO_RANKS)
    mean = S.sum() / min(ta.shape)  # the zero singular values count in the mean
    X = dense(run(hetero64, "iso_c", space="full"))
    s = torch.linalg.svdvals(X)
    assert torch.allclose(s, mean.expand_as(s), rtol=1e-10)
    restricted = U[:, :R].mT @ X @ Vh[:R].mT
    assert torch.allclose(restricted, mean * torch.eye(R, dtype=F64), atol=1e-10 * float(mean))


@pytest.mark.xfail(
    strict=True,
    reason="engine/contract issue: isotropising a rank-deficient matrix (full-space iso_c of "
    "LoRA updates, tsv + isotropize in core) gives the zero singular values the mean too, "
    "along singular vectors that LAPACK picks arbitrarily; the result is not a function of "
    "the inputs (adapter order changes it by ~100%)",
)
@pytest.mark.parametrize(
    ("space", "method", "params"),
    [("full", "iso_c", {}), ("core", "tsv", {"isotropize": True})],
)
def test_isotropize_of_a_rank_deficient_merge_is_order_independent(hetero64, space, method, params):
    order = [2, 0, 3, 1]
    a = dense(run(hetero64, method, params, space=space))
    b = dense(run([hetero64[i] for i in order], method, params, space=space))
    assert rel_err(b, a) <= 1e-6


# ---------------------------------------------------------------------------- TIES


def test_ties_hand_made_zero_sign_takes_positive_majority():
    x1 = torch.tensor([[4.0, -2.0], [1.0, -3.0]], dtype=F64)
    x2 = torch.tensor([[-1.0, 2.0], [5.0, 3.0]], dtype=F64)
    # d = 4, density 0.5: keep |x| ≥ the 2nd smallest magnitude (3 entries).
    # kept: [4, -2, 0, -3] and [0, 2, 5, 3]; sums [4, 0, 5, 0] → signs [+, 0, +, 0];
    # majority sign(+1 + 1) = + fills the zeros; disjoint means [4, 2, 5, 3].
    got = apply_method("ties", [x1, x2], validate_params("ties", {"alpha": 1.0, "density": 0.5}))
    assert torch.equal(got, torch.tensor([[4.0, 2.0], [5.0, 3.0]], dtype=F64))


def test_ties_hand_made_zero_sign_takes_negative_majority():
    x1 = torch.tensor([[-4.0, -2.0], [1.0, 3.0]], dtype=F64)
    x2 = torch.tensor([[-1.0, 2.0], [-5.0, -3.0]], dtype=F64)
    got = apply_method("ties", [x1, x2], validate_params("ties", {"alpha": 1.0, "density": 0.5}))
    assert torch.equal(got, torch.tensor([[-4.0, -2.0], [-5.0, -3.0]], dtype=F64))


def test_ties_keeps_floor_plus_one_entries_plus_ties():
    # d = 4, density 0.25 → threshold is the 3rd smallest magnitude (1.0), shared by 3 entries.
    x = torch.tensor([[1.0, -1.0], [1.0, 0.5]], dtype=F64)
    got = apply_method("ties", [x], validate_params("ties", {"alpha": 1.0, "density": 0.25}))
    assert torch.equal(got, torch.tensor([[1.0, -1.0], [1.0, 0.0]], dtype=F64))
    # Distinct magnitudes: d = 20, density 0.25 → ⌊5⌋ + 1 = 6 entries survive, the largest.
    y = torch.arange(1.0, 21.0, dtype=F64).reshape(4, 5) * torch.tensor([1.0, -1.0] * 10).reshape(
        4, 5
    )
    got = apply_method("ties", [y], validate_params("ties", {"alpha": 1.0, "density": 0.25}))
    kept = got.abs().reshape(-1)
    assert int((kept != 0).sum()) == 6
    assert set(kept[kept != 0].tolist()) == {15.0, 16.0, 17.0, 18.0, 19.0, 20.0}
    assert torch.equal(got[got != 0], y[got != 0])


def test_ties_density_one_keeps_everything():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 5, generator=g, dtype=F64) for _ in range(3)]
    got = apply_method("ties", xs, validate_params("ties", {"alpha": 1.0, "density": 1.0}))
    assert torch.allclose(got, ref_ties(xs, 1.0), rtol=0, atol=1e-15)
    # Same-sign tasks: nothing is trimmed, everything agrees, so TIES is the mean.
    pos = [x.abs() + 0.1 for x in xs]
    got = apply_method("ties", pos, validate_params("ties", {"alpha": 1.0, "density": 1.0}))
    assert torch.allclose(got, sum(pos) / 3, rtol=1e-15, atol=0)


@pytest.mark.parametrize("space", ["core", "full", "knots"])
def test_ties_density_one_of_identical_adapters_is_that_adapter(hetero64, space):
    f = hetero64[2]
    merged = dense(run([f, f, f], "ties", {"density": 1.0}, space=space))
    assert rel_err(merged, f.B @ f.A) <= 1e-10


def test_ties_count_uses_the_exact_floor():
    """⌊d·density⌋ of the decimal written: in floats 100 · 0.29 = 28.999…, whose int is 28."""
    x = torch.arange(1.0, 101.0, dtype=F64).reshape(10, 10)
    got = apply_method("ties", [x], validate_params("ties", {"alpha": 1.0, "density": 0.29}))
    assert int((got != 0).sum()) == 30


# ---------------------------------------------------------------------------- DARE


@pytest.mark.parametrize("space", ["core", "full"])
@pytest.mark.parametrize("method", ["dare", "dare_ties"])
def test_dare_is_reproducible_per_seed(hetero64, space, method):
    params = {"drop": 0.3, "density": 0.5} if method == "dare_ties" else {"drop": 0.3}
    a = run(hetero64, method, params, space=space, seed=7)
    b = run(hetero64, method, params, space=space, seed=7)
    c = run(hetero64, method, params, space=space, seed=8)
    assert torch.equal(a.B, b.B) and torch.equal(a.A, b.A)
    assert rel_err(dense(c), dense(a)) > 1e-3


def test_dare_drops_the_right_fraction_and_rescales_survivors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 100, generator=g, dtype=F64)
    params = validate_params("dare", {"alpha": 1.0, "drop": 0.3})
    got = apply_method("dare", [x], params, torch.Generator().manual_seed(11))
    dropped = got == 0
    assert abs(float(dropped.double().mean()) - 0.3) < 0.02
    assert torch.allclose(got[~dropped], x[~dropped] / 0.7, rtol=1e-15, atol=0)
    # The masks are the documented CPU stream: torch.rand(shape, float32) >= drop.
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float32)
    assert torch.equal(~dropped, u >= 0.3)


def test_dare_without_drop_is_task_arithmetic(hetero64):
    xs = delta_ws(hetero64)
    got = apply_method("dare", xs, validate_params("dare", {"alpha": 1.0, "drop": 0.0}))
    assert torch.allclose(got, ref_ta(xs), rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------- TSV, CART


@pytest.mark.parametrize("space", ["core", "full", "knots"])
def test_tsv_and_cart_of_one_adapter_are_that_adapter(hetero64, space):
    f = hetero64[3]
    for method, params in [("tsv", {}), ("cart", {"rank_fraction": 0.3, "lam": 0.7})]:
        assert rel_err(dense(run([f], method, params, space=space)), f.B @ f.A) <= 1e-10


@pytest.mark.parametrize("space", ["core", "full", "knots"])
def test_tsv_of_mutually_orthogonal_adapters_is_task_arithmetic(space):
    """Orthogonal tasks do not interfere: the polar factors change nothing, TSV = TA."""
    g = torch.Generator().manual_seed(4)
    m, n, r, T = 24, 20, 3, 3
    Q_out = torch.linalg.qr(torch.randn(m, r * T, generator=g, dtype=F64)).Q
    Q_in = torch.linalg.qr(torch.randn(n, r * T, generator=g, dtype=F64)).Q
    factors = []
    for t in range(T):
        core = torch.randn(r, r, generator=g, dtype=F64)
        B = Q_out[:, t * r : (t + 1) * r] @ core
        A = Q_in[:, t * r : (t + 1) * r].mT * (t + 1.0)
        factors.append(LoraFactors(A=A, B=B))
    ta = sum(delta_ws(factors))
    assert rel_err(dense(run(factors, "tsv", space=space)), ta) <= 1e-10


def test_tsv_keeps_at_most_the_numerical_rank():
    """K/T larger than a task's rank must not pull that task's null-space vectors in."""
    factors = make_factors(20, 16, (1, 2), seed=9)  # full space: K/T = 8 > r_t
    merged = run(factors, "tsv", space="full")
    assert merged.rank == 3
    assert rel_err(dense(merged), ref_full(factors, "tsv", {})) <= 1e-8


def test_cart_with_full_rank_fraction_is_the_mean(hetero64):
    xs = delta_ws(hetero64)
    params = validate_params("cart", {"alpha": 1.0, "rank_fraction": 1.0, "lam": 0.9})
    got = apply_method("cart", xs, params)
    assert torch.allclose(got, sum(xs) / len(xs), rtol=0, atol=1e-12)


def test_cart_rank_from_rank_fraction():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(20, 20, generator=g, dtype=F64) for _ in range(3)]
    # k = ⌈0.12 · 20⌉ = 3: differs from k = 2 and k = 4.
    params = validate_params("cart", {"alpha": 1.0, "rank_fraction": 0.12, "lam": 1.0})
    got = apply_method("cart", xs, params)
    assert torch.allclose(got, ref_cart(xs, 0.12, 1.0), rtol=0, atol=1e-12)
    assert not torch.allclose(got, ref_cart(xs, 0.1, 1.0), rtol=0, atol=1e-6)  # k = 2
    assert not torch.allclose(got, ref_cart(xs, 0.2, 1.0), rtol=0, atol=1e-6)  # k = 4


def test_cart_rank_uses_the_exact_ceiling():
    """⌈rank_fraction·K⌉ of the decimal written: ⌈0.28 · 25⌉ = 7, not ceil(7.000…1) = 8."""
    assert math.ceil(0.28 * 25) == 8  # the float product is just above 7
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(25, 25, generator=g, dtype=F64) for _ in range(3)]
    got = apply_method(
        "cart", xs, validate_params("cart", {"alpha": 1.0, "rank_fraction": 0.28, "lam": 1.0})
    )
    assert torch.allclose(got, ref_cart(xs, 0.28, 1.0), rtol=0, atol=1e-10)
