"""Property tests on random shapes and ranks (small, derandomised, no example database)."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.engine import LoraFactors

from .refs import bases_residual, bases_ta, delta_ws, dense, make_factors, run

FAST = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,  # the same examples on every run: no flaky CI
    database=None,  # and no .hypothesis/ directory written into the tree
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def adapters(draw, max_tasks: int = 4, max_dim: int = 12, max_rank: int = 5):
    """(m, n, ranks, scales, seed): random adapters, some with R = Σ r_t beyond m or n."""
    T = draw(st.integers(1, max_tasks))
    m = draw(st.integers(1, max_dim))
    n = draw(st.integers(1, max_dim))
    ranks = draw(st.lists(st.integers(1, max_rank), min_size=T, max_size=T))
    mags = draw(st.lists(st.floats(0.05, 20.0), min_size=T, max_size=T))
    signs = draw(st.lists(st.sampled_from([1.0, -1.0]), min_size=T, max_size=T))
    seed = draw(st.integers(0, 2**31 - 1))
    scales = [a * s for a, s in zip(mags, signs, strict=True)]
    return make_factors(m, n, ranks, seed=seed, scales=scales)


def _abs_err(got, want) -> float:
    return float((got - want).norm())


def _scale(factors) -> float:
    """Σ_t ‖ΔW_t‖: the natural size of rounding errors (the sum itself may cancel)."""
    return sum(float(d.norm()) for d in delta_ws(factors))


@FAST
@given(adapters())
def test_ta_is_lossless_in_core_and_knots_space(factors):
    truth = sum(delta_ws(factors))
    scale = _scale(factors)
    core = run(factors, "ta", space="core")
    assert _abs_err(dense(core), truth) <= 1e-10 * scale
    assert _abs_err(bases_ta(factors), truth) <= 1e-10 * scale
    assert bases_residual(factors) < 1e-10
    # Knots drops singular values ≤ 1e-5 of the stack, by definition.
    R = sum(f.A.shape[0] for f in factors)
    bound = 1e-10 * scale + 1e-5 * math.sqrt(min(truth.shape[0], R))
    assert _abs_err(dense(run(factors, "ta", space="knots")), truth) <= bound


@FAST
@given(adapters())
def test_ta_is_lossless_in_float32(factors):
    f32 = [LoraFactors(A=f.A.float(), B=f.B.float()) for f in factors]
    truth = sum(delta_ws(f32))
    merged = run(f32, "ta", space="core")
    assert merged.B.dtype == torch.float32
    assert _abs_err(dense(merged), truth) <= 1e-5 * _scale(f32)
    # (merged.residual is not checked here: it grows with the ratio of the adapters' norms,
    # see test_lossless.py::test_self_check_residual_does_not_depend_on_relative_weights.)


@FAST
@given(
    adapters(),
    st.sampled_from(
        [
            ("core", "ta", {}),
            ("core", "ties", {"density": 0.3}),
            ("core", "iso_c", {}),
            ("core", "cart", {"rank_fraction": 0.5, "lam": 0.7}),
            ("core", "tsv", {}),
            ("full", "ta", {}),
            ("full", "ties", {"density": 0.3}),
            ("full", "cart", {"rank_fraction": 0.5, "lam": 0.7}),
            ("full", "tsv", {}),
            ("knots", "ta", {}),
            ("knots", "iso_c", {}),
        ]
    ),
    st.randoms(use_true_random=False),
)
def test_symmetric_methods_ignore_adapter_order(factors, case, rnd):
    space, method, params = case
    order = list(range(len(factors)))
    rnd.shuffle(order)
    a = dense(run(factors, method, params, space=space))
    b = dense(run([factors[i] for i in order], method, params, space=space))
    assert _abs_err(b, a) <= 1e-8 * max(_scale(factors), float(a.norm()))


@FAST
@given(adapters(), st.floats(-5.0, 5.0), st.sampled_from(["core", "full", "knots"]))
def test_ta_is_linear_in_a_common_weight(factors, c, space):
    scaled = [LoraFactors(A=f.A, B=c * f.B) for f in factors]
    base = dense(run(factors, "ta", space=space))
    got = dense(run(scaled, "ta", space=space))
    bound = 1e-10 * abs(c) * _scale(factors)
    if space == "knots":  # S ≤ 1e-5 dropped on either side
        bound += 2e-5 * math.sqrt(min(base.shape[0], sum(f.A.shape[0] for f in factors)))
    assert _abs_err(got, c * base) <= bound


@FAST
@given(
    adapters(),
    st.floats(0.1, 10.0),
    st.sampled_from(
        [("ties", {"density": 0.3}), ("tsv", {}), ("cart", {"rank_fraction": 0.5}), ("iso_c", {})]
    ),
)
def test_methods_are_positively_homogeneous_in_core_space(factors, c, case):
    method, params = case
    scaled = [LoraFactors(A=f.A, B=c * f.B) for f in factors]
    base = dense(run(factors, method, params))
    got = dense(run(scaled, method, params))
    assert _abs_err(got, c * base) <= 1e-8 * c * max(_scale(factors), float(base.norm()))


@FAST
@given(adapters(), st.integers(1, 6), st.sampled_from(["core", "full", "knots"]))
def test_truncation_attains_the_eckart_young_error(factors, k, space):
    """Whatever the singular-value gaps: rank ≤ k and ‖X − X_k‖ = √(Σ_{i>k} S_i²)."""
    exact = dense(run(factors, "ta", space=space))
    merged = run(factors, "ta", space=space, rank=k)
    assert merged.rank <= k
    S = torch.linalg.svdvals(exact)
    optimal = float(S[k:].pow(2).sum().sqrt())
    tol = 1e-9 * float(S.norm()) + 1e-12
    assert abs(_abs_err(dense(merged), exact) - optimal) <= tol
    assert merged.kept_energy is not None and 0.0 <= merged.kept_energy <= 1.0
    if float(S.norm()) > 0:
        kept = float(S[:k].pow(2).sum() / S.pow(2).sum())
        assert abs(merged.kept_energy - kept) <= 1e-9


@FAST
@given(adapters(), st.data())
def test_ta_is_linear_in_the_weight_vector(factors, data):
    """ta(w) + ta(w′) = ta(w + w′) for per-adapter weights w, w′ (folded into B_t as the
    runner does): the merge is a linear map of the weights, not only of a common factor."""
    T = len(factors)
    weights = st.lists(st.floats(-3.0, 3.0), min_size=T, max_size=T)
    w, v = data.draw(weights), data.draw(weights)

    def ta(ws):
        return dense(
            run([LoraFactors(A=f.A, B=x * f.B) for f, x in zip(factors, ws, strict=True)], "ta")
        )

    both = ta([a + b for a, b in zip(w, v, strict=True)])
    scale = (max(map(abs, w)) + max(map(abs, v)) + 1.0) * _scale(factors)
    assert _abs_err(ta(w) + ta(v), both) <= 1e-10 * scale
