"""The merge options that go beyond the paper (docs/methods.md): ``axes: "aligned"``
(entry-wise methods on the tasks' joint singular axes, core space), ``alpha: "auto"`` (the
data-free scale) and ``rank_of: "layer"`` (TSV and CART count kept ranks as full space does). Each is held to a dense float64 reference written from the docs, and
to the property that motivates it."""

from __future__ import annotations

import pytest
import torch

from worker.engine import LoraFactors
from worker.engine.core_space import aligned_axes
from worker.engine.methods import Tasks

from .refs import (
    F64,
    HETERO_M,
    HETERO_N,
    HETERO_RANKS,
    HETERO_SCALES,
    delta_ws,
    dense,
    make_factors,
    ref_drop,
    ref_ta,
    ref_ties,
    rel_err,
    run,
)

TOL = 1e-9  # float64 throughout


def _factors(seed: int = 3) -> list[LoraFactors]:
    return make_factors(HETERO_M, HETERO_N, HETERO_RANKS, seed=seed, scales=HETERO_SCALES)


def _joint_axes(dws: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The left singular vectors of [ΔW_1 … ΔW_T] and the right ones of [ΔW_1; …; ΔW_T],
    as many as the updates' total rank, by plain dense SVDs."""
    R = sum(HETERO_RANKS)
    left = torch.linalg.svd(torch.cat(dws, dim=1), full_matrices=False).U[:, :R]
    right = torch.linalg.svd(torch.cat(dws, dim=0), full_matrices=False).Vh[:R].mT
    return left, right


def _ref_aligned(factors, merge) -> torch.Tensor:
    """``merge`` applied to each update's coordinates on the joint axes, mapped back."""
    dws = delta_ws(factors)
    L, Rt = _joint_axes(dws)
    return L @ merge([L.mT @ dw @ Rt for dw in dws]) @ Rt.mT


# ---------------------------------------------------------------------------- aligned axes


@pytest.mark.parametrize("density", [0.1, 0.3, 1.0])
def test_aligned_ties_is_ties_on_the_joint_singular_axes(density: float) -> None:
    got = dense(run(_factors(), "ties", {"density": density, "axes": "aligned"}))
    want = _ref_aligned(_factors(), lambda xs: ref_ties(xs, density))
    assert rel_err(got, want) <= TOL


def test_aligned_dare_is_dare_on_the_joint_singular_axes() -> None:
    got = dense(run(_factors(), "dare", {"drop": 0.3, "axes": "aligned"}, seed=4))
    want = _ref_aligned(_factors(), lambda xs: ref_ta(ref_drop(xs, 0.3, 4)))
    assert rel_err(got, want) <= TOL


def test_rotating_onto_aligned_axes_is_lossless() -> None:
    """Without trimming or dropping, the rotation changes nothing: DARE at drop 0 is TA."""
    got = dense(run(_factors(), "dare", {"drop": 0.0, "axes": "aligned"}))
    assert rel_err(got, ref_ta(delta_ws(_factors()))) <= TOL
    g = torch.Generator().manual_seed(4)
    left, right = torch.randn(1, 5, 6, generator=g, dtype=F64), torch.randn(1, 6, 7, dtype=F64)
    P, Q = (x[0] for x in aligned_axes(Tasks(factors=(left, right, (2, 2, 2)))))
    assert P.shape == (5, 5) and Q.shape == (7, 7)
    assert rel_err(P.mT @ P, torch.eye(5, dtype=F64)) <= TOL
    assert rel_err(Q.mT @ Q, torch.eye(7, dtype=F64)) <= TOL


def _resplit(factors: list[LoraFactors], seed: int) -> list[LoraFactors]:
    """The same updates with each adapter's factors re-split: B G_t and G_t⁻¹ A, G_t an
    invertible r × r matrix far from a rotation (a different scale per direction)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for f in factors:
        r = f.A.shape[0]
        G = torch.randn(r, r, generator=g, dtype=F64) + 3 * torch.eye(r, dtype=F64)
        out.append(LoraFactors(A=torch.linalg.solve(G, f.A), B=f.B @ G))
    return out


@pytest.mark.parametrize(("method", "params"), [("ties", {"density": 0.2}), ("dare_ties", {})])
def test_aligned_axes_do_not_depend_on_how_adapters_split_a_b(method: str, params: dict) -> None:
    """The point of the option: the paper's reference axes come from the stacked factors, so
    the same updates factored differently give a different TIES merge; the aligned axes come
    from the updates alone."""
    factors, resplit = _factors(), _resplit(_factors(), seed=9)
    assert rel_err(ref_ta(delta_ws(resplit)), ref_ta(delta_ws(factors))) <= 1e-10

    def merged(fs, axes):
        return dense(run(fs, method, {**params, "axes": axes}, seed=2))

    assert rel_err(merged(resplit, "aligned"), merged(factors, "aligned")) <= 1e-8
    assert rel_err(merged(resplit, "reference"), merged(factors, "reference")) > 1e-3


# ---------------------------------------------------------------------------- alpha "auto"


CASES = [
    ("ta", {}, "core"),
    ("ta", {}, "full"),
    ("ties", {"density": 0.3}, "core"),
    ("ties", {"density": 0.3, "axes": "aligned"}, "core"),
    ("dare", {"drop": 0.2}, "full"),
    ("tsv", {}, "core"),
    ("iso_c", {}, "core"),
    ("iso_c", {}, "full"),
    ("cart", {}, "core"),
    ("ties", {"density": 0.3}, "knots"),
    ("ta", {"isotropize": True}, "knots"),
]


@pytest.mark.parametrize(("method", "params", "space"), CASES)
def test_auto_alpha_gives_the_merge_the_tasks_mean_energy(method, params, space) -> None:
    """‖alpha·X‖_F² = mean_t ‖ΔW_t‖_F², and the merge is the alpha-1 merge times that alpha."""
    factors = _factors()
    auto = run(factors, method, {**params, "alpha": "auto"}, space=space, seed=1)
    one = run(factors, method, {**params, "alpha": 1.0}, space=space, seed=1)
    mean_energy = sum(float(dw.square().sum()) for dw in delta_ws(factors)) / len(factors)
    assert float(dense(auto).square().sum()) == pytest.approx(mean_energy, rel=1e-9)
    assert auto.alpha == pytest.approx((mean_energy / float(dense(one).square().sum())) ** 0.5)
    assert rel_err(dense(auto), auto.alpha * dense(one)) <= TOL
    assert one.alpha == 1.0


def test_auto_alpha_is_lossless_too() -> None:
    """Core-space TA with alpha "auto" equals full-space TA with alpha "auto"."""
    core = run(_factors(), "ta", {"alpha": "auto"}, space="core")
    full = run(_factors(), "ta", {"alpha": "auto"}, space="full")
    assert rel_err(dense(core), dense(full)) <= TOL
    assert core.alpha == pytest.approx(full.alpha, rel=1e-12)


def test_auto_alpha_of_a_zero_merge_is_one() -> None:
    """Updates that cancel leave nothing to scale: alpha stays 1 rather than dividing by 0."""
    f = _factors()[0]
    merged = run([f, LoraFactors(A=f.A, B=-f.B)], "ta", {"alpha": "auto"})
    assert merged.alpha == 1.0
    assert float(dense(merged).abs().max()) <= 1e-12


# ---------------------------------------------------------------------------- rank_of "layer"


@pytest.mark.parametrize(
    ("method", "params"),
    [("tsv", {}), ("cart", {}), ("cart", {"rank_fraction": 0.2, "lam": 0.5})],
)
def test_rank_of_layer_makes_core_space_equal_full_space(method: str, params: dict) -> None:
    """With K the layer's min(m, n), core-space TSV and CART keep what full space keeps, and
    both commute with the orthonormal reference bases: the same update, at core cost. With
    the paper's K (R in core space) they keep fewer directions and differ."""
    factors = make_factors(96, 80, (2, 6, 12, 4), seed=5, scales=HETERO_SCALES)
    full = dense(run(factors, method, params, space="full"))
    layer = dense(run(factors, method, {**params, "rank_of": "layer"}, space="core"))
    paper = dense(run(factors, method, params, space="core"))
    assert rel_err(layer, full) <= 1e-9
    assert rel_err(paper, full) > 1e-3
    assert (
        rel_err(dense(run(factors, method, {**params, "rank_of": "layer"}, space="full")), full)
        == 0
    )
