"""The batched core-space merge equals the unbatched one, module by module.

``merge_group_in_core_space`` exists only to run the same maths with fewer kernel launches on
a GPU, so every test here holds it to ``merge_in_core_space`` on each module of a group: ΔW =
B A within 1e-5 relative (the factors may differ in the sign of each singular pair), the same
rank, kept energy and self-check residual, and DARE's masks drawn from each module's generator
exactly as the unbatched merge draws them.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from jobs.spec import validate_params
from worker.engine import (
    METHODS,
    FactorStack,
    NonFiniteError,
    merge_group_in_core_space,
    merge_in_core_space,
    merge_stacks_in_core_space,
    shape_groups,
)
from worker.engine.factors import stack_group
from worker.engine.linalg import left_singular_basis
from worker.engine.methods import Method, Tasks, TaskShape

from .refs import HETERO_M, HETERO_N, HETERO_RANKS, HETERO_SCALES, dense, make_factors, rel_err

TOL = 1e-5


def _group(
    m: int = HETERO_M,
    n: int = HETERO_N,
    ranks: Sequence[int] = HETERO_RANKS,
    count: int = 4,
    seed: int = 10,
) -> list[FactorStack]:
    """``count`` float32 modules of one shape, heterogeneous ranks and scalings (one negative)."""
    scales = HETERO_SCALES[: len(ranks)] if len(ranks) <= len(HETERO_SCALES) else None
    return [
        FactorStack.of(make_factors(m, n, ranks, seed=seed + i, scales=scales, dtype=torch.float32))
        for i in range(count)
    ]


def _generators(count: int, seed: int = 7) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def _assert_same_as_unbatched(
    stacks: Sequence[FactorStack],
    method: str,
    params: dict,
    rank: int | None = None,
    seed: int = 7,
) -> None:
    p = validate_params(method, params)
    batched = merge_group_in_core_space(stacks, method, p, rank, _generators(len(stacks), seed))
    assert len(batched) == len(stacks)
    for stack, got, gen in zip(stacks, batched, _generators(len(stacks), seed), strict=True):
        want = merge_in_core_space(stack, method, p, rank, gen)
        assert rel_err(dense(got), dense(want)) <= TOL
        assert got.rank == want.rank
        assert got.B.shape == want.B.shape and got.A.shape == want.A.shape
        assert (
            got.A.is_contiguous()
        )  # B may lie in a QR's column-major buffer: the writer copies it
        if want.kept_energy is None:
            assert got.kept_energy is None
        else:
            assert got.kept_energy == pytest.approx(want.kept_energy, abs=1e-6)
        if want.residual is None:  # plain TA: a stacked sum, nothing projected
            assert got.residual is None
        else:
            assert abs(got.residual - want.residual) <= 1e-6
        assert got.residual is None or got.residual <= 1e-5
        assert got.alpha == pytest.approx(want.alpha, rel=1e-5)


#: Every method, with parameters away from their defaults where that exercises more.
CASES = [
    ("ta", {}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 1.0}),
    ("dare", {"drop": 0.3}),
    ("dare", {"drop": 0.0}),
    ("dare_ties", {"drop": 0.2, "density": 0.4}),
    ("tsv", {}),
    ("cart", {}),
    ("cart", {"rank_fraction": 0.2, "lam": 0.5}),
    ("iso_c", {}),
    ("ties", {"density": 0.3, "axes": "aligned"}),
    ("dare_ties", {"drop": 0.2, "density": 0.4, "axes": "aligned"}),
    ("ties", {"alpha": "auto", "axes": "aligned"}),
    ("tsv", {"alpha": "auto"}),
    ("dare", {"alpha": "auto"}),
    ("tsv", {"rank_of": "layer"}),
    ("cart", {"rank_of": "layer"}),
]


def _case_id(case: tuple[str, dict]) -> str:
    method, params = case
    return method + "".join(f"-{k}={v}" for k, v in params.items())


def test_cases_cover_every_method() -> None:
    assert {m for m, _ in CASES} == set(METHODS)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_batched_equals_unbatched(case: tuple[str, dict]) -> None:
    _assert_same_as_unbatched(_group(), *case)


@pytest.mark.parametrize(
    ("method", "params", "rank"),
    [("tsv", {}, 5), ("ties", {"density": 0.3}, 3), ("dare", {"drop": 0.3}, 40)],
)
def test_batched_truncation_equals_unbatched(method: str, params: dict, rank: int) -> None:
    """``output.rank``: the same truncation and kept energy (rank 40 > R keeps everything)."""
    _assert_same_as_unbatched(_group(), method, params, rank)


@pytest.mark.parametrize(
    ("method", "params"),
    [("ties", {"density": 0.6, "isotropize": True, "alpha": -1.5}), ("dare", {"isotropize": True})],
)
def test_batched_isotropize_equals_unbatched(method: str, params: dict) -> None:
    """Isotropize is only well defined on a full-rank merge (see test_methods_reference.py):
    the test data is checked to be one, with a gap to zero."""
    stacks = _group()
    R = sum(HETERO_RANKS)
    plain = {k: v for k, v in params.items() if k != "isotropize"}
    for merged in merge_group_in_core_space(
        stacks, method, validate_params(method, plain), generators=_generators(len(stacks))
    ):
        s = torch.linalg.svdvals(dense(merged))
        assert float(s[R - 1]) > 1e-3 * float(s[0]), "test data: the merge is rank-deficient"
    _assert_same_as_unbatched(stacks, method, params)


def _conditioned_stack(m: int, R: int, condition: float, seed: int) -> torch.Tensor:
    """An m × R float32 stack with singular values spread from 1 to 1/condition."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, R, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(R, R, generator=g, dtype=torch.float64))
    S = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), R, dtype=torch.float64)
    return ((U * S) @ V.mT).float()


def _mixed_route_group() -> list[FactorStack]:
    """Four modules whose B stacks take every route: float32 Gram (cond 2), float64 Gram
    (cond 10), QR (cond 1000) and QR again (two equal columns: rank-deficient)."""
    m, n, ranks = 160, 120, (4, 8, 3, 5)
    R = sum(ranks)
    out = []
    for i, condition in enumerate((2.0, 10.0, 1000.0, 2.0)):
        B = _conditioned_stack(m, R, condition, seed=20 + i)
        if i == 3:
            B[:, 1] = B[:, 0]
        A = _conditioned_stack(n, R, 2.0 + 3 * i, seed=40 + i).mT.contiguous()
        out.append(FactorStack(B, A, ranks))
    return out


def test_mixed_route_group_takes_every_route() -> None:
    stacks = _mixed_route_group()
    left = left_singular_basis(torch.stack([s.B for s in stacks]))
    right = left_singular_basis(torch.stack([s.A for s in stacks]).mT)
    assert left.routes == ("gram32", "gram64", "qr", "qr")
    assert set(right.routes) == {"gram32", "gram64"}
    assert not left.on_the_stack  # mixed routes: one base holds each stack or Q
    U = left.matrix
    eye = torch.eye(U.shape[-1]).expand_as(U.mT @ U)
    assert torch.allclose(U.mT @ U, eye, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "params"),
    [("ta", {}), ("ties", {"density": 0.3}), ("dare_ties", {}), ("tsv", {}), ("cart", {})],
)
def test_batched_equals_unbatched_across_routes(method: str, params: dict) -> None:
    _assert_same_as_unbatched(_mixed_route_group(), method, params)


@pytest.mark.parametrize(("m", "n"), [(10, 40), (40, 10)], ids=["R>m", "R>n"])
@pytest.mark.parametrize(
    ("method", "params", "rank"),
    [
        ("ta", {}, None),
        ("ties", {"density": 0.3}, None),
        ("dare", {}, None),
        ("tsv", {}, None),
        ("cart", {"rank_fraction": 0.3, "lam": 0.5}, None),
        ("iso_c", {}, None),
        ("ta", {}, 4),
        ("ties", {"density": 0.3, "axes": "aligned", "alpha": "auto"}, None),
    ],
)
def test_batched_non_square_core(m: int, n: int, method: str, params: dict, rank: int) -> None:
    """R > min(m, n): a wide stack takes the QR route and the core matrix is a × b, a ≠ b,
    written back through its SVD."""
    _assert_same_as_unbatched(_group(m, n, (4, 8, 3)), method, params, rank)


def test_equal_ranks_take_the_single_product_path() -> None:
    for method, params in [("ties", {"density": 0.2}), ("dare_ties", {}), ("cart", {})]:
        _assert_same_as_unbatched(_group(64, 48, (6, 6, 6)), method, params)


@pytest.mark.parametrize("method", ["dare", "dare_ties"])
def test_dare_draws_each_modules_masks_from_its_own_generator(method: str) -> None:
    """Same masks as the unbatched merge (exactly: the same entries dropped), and each
    generator left in the same state, so a caller can go on using it."""
    stacks = _group()
    p = validate_params(method, {"drop": 0.5})
    mine, theirs = _generators(4, seed=3), _generators(4, seed=3)
    batched = merge_group_in_core_space(stacks, method, p, generators=mine)
    for stack, got, gen in zip(stacks, batched, theirs, strict=True):
        assert rel_err(dense(got), dense(merge_in_core_space(stack, method, p, None, gen))) <= TOL
    for a, b in zip(mine, theirs, strict=True):
        assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


def test_no_generator_is_a_seed_zero_generator_per_module() -> None:
    stacks = _group()
    p = validate_params("dare", {"drop": 0.5})
    batched = merge_group_in_core_space(stacks, "dare", p)
    seed0 = [torch.Generator().manual_seed(0) for _ in stacks]
    explicit = merge_group_in_core_space(stacks, "dare", p, generators=seed0)
    for got, want, stack in zip(batched, explicit, stacks, strict=True):
        assert torch.equal(dense(got), dense(want))
        assert rel_err(dense(got), dense(merge_in_core_space(stack, "dare", p))) <= TOL


def test_mixed_shapes_are_grouped_and_returned_in_order() -> None:
    a = _group(48, 40, (2, 4, 8, 3), count=3, seed=1)
    b = _group(30, 24, (3, 3, 3), count=2, seed=5)
    c = _group(48, 40, (4, 4), count=2, seed=9)  # same shape as a, other ranks
    stacks = [a[0], b[0], c[0], a[1], b[1], a[2], c[1]]
    assert shape_groups(stacks) == [[0, 3, 5], [1, 4], [2, 6]]
    assert shape_groups(stacks, max_group=2) == [[0, 3], [1, 4], [2, 6], [5]]
    p = validate_params("ties", {"density": 0.3})
    for max_group in (None, 2):
        got = merge_stacks_in_core_space(stacks, "ties", p, max_group=max_group)
        for stack, merged in zip(stacks, got, strict=True):
            assert rel_err(dense(merged), dense(merge_in_core_space(stack, "ties", p))) <= TOL


def _mean(tasks: Tasks) -> torch.Tensor:
    return tasks.matrices.mean(1)


def _mean_cost(L, s: TaskShape) -> int:
    s.matrices(L)
    return L.alloc(s.X)


def test_a_method_added_to_the_table_merges_batched(monkeypatch) -> None:
    """A new method is one function over the tasks and one row: it runs on the group."""
    monkeypatch.setitem(METHODS, "mean", Method(_mean, _mean_cost))
    stacks = _group()
    for stack, merged in zip(
        stacks, merge_group_in_core_space(stacks, "mean", {"alpha": 2.0}), strict=True
    ):
        want = merge_in_core_space(stack, "mean", {"alpha": 2.0})
        assert rel_err(dense(merged), dense(want)) <= TOL


def test_the_group_must_share_shapes_ranks_and_generators_count() -> None:
    p = validate_params("ta", {})
    with pytest.raises(ValueError, match="another group"):
        merge_group_in_core_space([*_group(count=1), *_group(30, 24, (3, 3, 3), count=1)], "ta", p)
    with pytest.raises(ValueError, match="another group"):
        merge_group_in_core_space([*_group(count=1), *_group(ranks=(4, 2, 8, 3), count=1)], "ta", p)
    with pytest.raises(ValueError, match="one per module"):
        merge_group_in_core_space(_group(count=2), "ta", p, generators=_generators(3))
    with pytest.raises(KeyError):
        merge_group_in_core_space(_group(count=2), "no_such_method", p)
    assert merge_group_in_core_space([], "ta", p) == []


def test_plain_factor_lists_are_accepted() -> None:
    stacks = _group(count=2)
    as_lists = [list(s) for s in stacks]
    p = validate_params("ta", {})
    for got, want in zip(
        merge_group_in_core_space(as_lists, "ta", p),
        merge_group_in_core_space(stacks, "ta", p),
        strict=True,
    ):
        assert torch.equal(dense(got), dense(want))


def test_eigh_on_another_device_gives_the_same_merge() -> None:
    """``eigh_device``: the small eigendecompositions elsewhere (here: the CPU itself, and
    float64 on the CPU for float32 inputs) change nothing."""
    stacks = _group()
    p = validate_params("ties", {"density": 0.3})
    for got, want in zip(
        merge_group_in_core_space(stacks, "ties", p, eigh_device="cpu"),
        merge_group_in_core_space(stacks, "ties", p),
        strict=True,
    ):
        assert torch.equal(dense(got), dense(want))


def test_an_overflowing_merge_raises_non_finite_error_as_unbatched() -> None:
    """alpha pushes the merged core matrix past float32: its truncating SVD refuses it, in
    the group as in the module's own merge."""
    stacks = _group()
    p = validate_params("ta", {"alpha": 3e38})
    with pytest.raises(NonFiniteError):
        merge_in_core_space(stacks[0], "ta", p, rank=2)
    with pytest.raises(NonFiniteError):
        merge_group_in_core_space(stacks, "ta", p, rank=2)


def test_factors_read_into_one_batched_buffer_are_not_copied() -> None:
    """``FactorStack(B=buffer_B[g], A=buffer_A[g])``: the group's stacks are used in place."""
    stacks = _group()
    buffer_B = torch.stack([s.B for s in stacks])
    buffer_A = torch.stack([s.A for s in stacks])
    views = [FactorStack(buffer_B[g], buffer_A[g], HETERO_RANKS) for g in range(len(stacks))]
    B_stacks, A_stacks, copied = stack_group(views)
    assert B_stacks is buffer_B and A_stacks is buffer_A and not copied
    reversed_B, _, copied = stack_group(views[::-1])
    assert copied
    assert reversed_B is not buffer_B  # out of order: a copy
    assert torch.equal(reversed_B, buffer_B.flip(0))
    assert stack_group(stacks)[0] is not buffer_B
    p = validate_params("ties", {"density": 0.3})
    for got, want in zip(
        merge_group_in_core_space(views, "ties", p),
        merge_group_in_core_space(stacks, "ties", p),
        strict=True,
    ):
        assert torch.equal(dense(got), dense(want))
