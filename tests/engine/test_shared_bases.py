"""Shared rank-k bases (worker/engine/shared_bases.py) against float64 references.

The references use dense ``torch.linalg.svd`` of the unfoldings, never the module's Gram
matrices and ``eigh``, so a bug in those cannot cancel out against itself.
"""

from __future__ import annotations

import doctest
import itertools

import pytest
import torch
from torch import Tensor

from worker.engine import LoraFactors, core_matrices, reference_bases
from worker.engine.linalg import isotropize
from worker.engine.shared_bases import (
    captured_energy,
    hosvd_bases,
    isotropic_truncation,
    lift,
    project,
    rank_aware_isotropize,
    rescale_towards_mean_norm,
    shared_bases,
    tucker2_bases,
)

from .refs import F64, make_factors, rel_err


def _cores(T: int = 4, a: int = 12, b: int = 10, seed: int = 0, batch: tuple = ()) -> Tensor:
    """Random cores with a decaying spectrum, as real core matrices have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, T, a, b, generator=g, dtype=F64)
    return x * torch.linspace(1.0, 0.05, b, dtype=F64)


def _projector(X: Tensor) -> Tensor:
    return X @ X.mT


def _ref_top_left(x: Tensor, k: int) -> Tensor:
    """Top-k left singular vectors of x by a dense SVD."""
    return torch.linalg.svd(x, full_matrices=False)[0][:, :k]


def _ref_hooi(cores: Tensor, k: int, iterations: int) -> tuple[Tensor, Tensor]:
    """HOOI on the mode-1 and mode-2 unfoldings, written with dense SVDs."""
    P = _ref_top_left(torch.cat(list(cores), dim=1), k)
    Q = _ref_top_left(torch.cat([c.mT for c in cores], dim=1), k)
    for _ in range(iterations):
        P = _ref_top_left(torch.cat([c @ Q for c in cores], dim=1), k)
        Q = _ref_top_left(torch.cat([c.mT @ P for c in cores], dim=1), k)
    return P, Q


def test_one_task_is_the_truncated_svd() -> None:
    """With T = 1, Tucker-2 is the SVD: P, Q span the top-k singular vectors, the coordinate
    is diag(S_k) up to signs, and the lifted update is the best rank-k approximation."""
    M = _cores(T=1)
    U, S, Vh = torch.linalg.svd(M[0], full_matrices=False)
    sb = shared_bases(M, k=3)
    assert rel_err(_projector(sb.P), _projector(U[:, :3])) < 1e-10
    assert rel_err(_projector(sb.Q), _projector(Vh[:3].mT)) < 1e-10
    assert rel_err(sb.coordinates[0].abs(), torch.diag(S[:3])) < 1e-10
    left, right = lift(sb.coordinates[0], sb.P, sb.Q)
    assert rel_err(left @ right, (U[:, :3] * S[:3]) @ Vh[:3]) < 1e-10


@pytest.mark.parametrize("iterations", [0, 1, 4])
def test_bases_equal_a_dense_hooi(iterations: int) -> None:
    """The same subspaces as HOOI written with dense SVDs of the unfoldings, after every
    number of sweeps (0: the HOSVD)."""
    cores = _cores(T=5, a=14, b=11)
    P, Q = tucker2_bases(cores, 4, iterations=iterations)
    P_ref, Q_ref = _ref_hooi(cores, 4, iterations)
    assert rel_err(_projector(P), _projector(P_ref)) < 1e-9
    assert rel_err(_projector(Q), _projector(Q_ref)) < 1e-9


def test_each_sweep_keeps_at_least_as_much_energy() -> None:
    cores = _cores(T=6, a=16, b=16, seed=3)
    kept = [
        float(captured_energy(cores, project(cores, *tucker2_bases(cores, 5, iterations=i))))
        for i in range(6)
    ]
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(kept)), kept
    assert 0 < kept[0] <= kept[-1] <= 1


@pytest.mark.parametrize(("a", "b", "k"), [(12, 10, 12), (12, 10, 40), (8, 8, 8)])
def test_full_rank_is_lossless(a: int, b: int, k: int) -> None:
    """k ≥ a and k ≥ b: square orthogonal bases, every M_t comes back exactly, all energy
    kept, and the bases are clamped to (a × a, b × b)."""
    cores = _cores(T=3, a=a, b=b)
    sb = shared_bases(cores, k)
    assert sb.P.shape == (a, a) and sb.Q.shape == (b, b)
    left, right = lift(sb.coordinates, sb.P, sb.Q)
    assert rel_err(left @ right, cores) < 1e-12
    assert abs(float(sb.captured) - 1.0) < 1e-12


def test_lossless_on_real_core_matrices_at_k_equal_r() -> None:
    """Core matrices from LoRA factors (R × R, R = Σ r_t): k = R loses nothing, in float32."""
    factors = [
        LoraFactors(A=f.A.float(), B=f.B.float())
        for f in make_factors(40, 36, (3, 5, 4), seed=2, scales=(2.0, -1.0, 0.5))
    ]
    cores = torch.stack(core_matrices(factors, reference_bases(factors)))
    sb = shared_bases(cores, k=12)
    left, right = lift(sb.coordinates, sb.P, sb.Q)
    assert sb.P.dtype == torch.float32 and sb.coordinates.dtype == torch.float32
    assert rel_err(left @ right, cores) < 1e-5


def test_output_rank_is_k_by_construction() -> None:
    """Bases orthonormal, coordinates k × k, and any merge of them lifts to rank ≤ k."""
    cores = _cores(T=4, a=20, b=18)
    sb = shared_bases(cores, k=5)
    eye = torch.eye(5, dtype=F64)
    assert rel_err(sb.P.mT @ sb.P, eye) < 1e-12 and rel_err(sb.Q.mT @ sb.Q, eye) < 1e-12
    assert sb.coordinates.shape == (4, 5, 5)
    for merged in (sb.coordinates.sum(0), rank_aware_isotropize(sb.coordinates.sum(0))):
        left, right = lift(merged, sb.P, sb.Q)
        assert left.shape == (20, 5) and right.shape == (5, 18)
        assert int(torch.linalg.matrix_rank(left @ right)) == 5


def test_batched_equals_one_by_one() -> None:
    """A batch of modules (leading dimension) gives each module's bases, signs included."""
    cores = _cores(T=4, a=12, b=9, batch=(3,))
    batched = shared_bases(cores, k=4, beta=0.5)
    for g in range(3):
        alone = shared_bases(cores[g], k=4, beta=0.5)
        assert rel_err(batched.P[g], alone.P) < 1e-12
        assert rel_err(batched.Q[g], alone.Q) < 1e-12
        assert rel_err(batched.coordinates[g], alone.coordinates) < 1e-12
        assert abs(float(batched.captured[g] - alone.captured)) < 1e-12


def test_float32_matches_float64() -> None:
    cores = _cores(T=4, a=24, b=24, seed=5)
    sb64 = shared_bases(cores, k=6)
    sb32 = shared_bases(cores.float(), k=6)
    assert sb32.P.dtype == torch.float32
    assert rel_err(sb32.P, sb64.P) < 1e-5 and rel_err(sb32.coordinates, sb64.coordinates) < 1e-5


def test_signs_are_fixed() -> None:
    """Each basis vector's largest-magnitude entry is positive: the same cores give the same
    bases whatever eigh's sign choice, so entry-wise methods (TIES, DARE) are reproducible."""
    P, Q = hosvd_bases(_cores(), 4)
    for X in (P, Q):
        pivot = X.abs().argmax(0)
        assert bool((X[pivot, torch.arange(X.shape[1])] > 0).all())


def test_beta_rescales_only_the_fit() -> None:
    """β = 1 leaves the tasks alone; β = 0 gives every task the mean norm; the coordinates
    are always those of the tasks as they are."""
    cores = _cores(T=3) * torch.tensor([1.0, 10.0, 0.1], dtype=F64)[:, None, None]
    assert rescale_towards_mean_norm(cores, 1.0) is cores
    norms = torch.linalg.matrix_norm(rescale_towards_mean_norm(cores, 0.0))
    assert rel_err(norms, torch.linalg.matrix_norm(cores).mean().expand(3)) < 1e-12
    sb = shared_bases(cores, k=3, beta=0.0)
    assert rel_err(sb.coordinates, project(cores, sb.P, sb.Q)) < 1e-15
    small = shared_bases(cores, k=3, beta=1.0)
    # the fit without rescaling serves the large task; with β = 0 the small one gains
    assert float(sb.coordinates[2].norm()) > float(small.coordinates[2].norm())


def test_a_task_without_update_stays_zero() -> None:
    cores = _cores(T=3)
    cores[1] = 0
    sb = shared_bases(cores, k=3, beta=0.0)
    assert bool(torch.isfinite(sb.P).all()) and float(sb.coordinates[1].abs().max()) == 0.0


def test_rank_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        shared_bases(_cores(), k=0)


def test_rank_aware_isotropize() -> None:
    """Full rank: the plain isotropize. Rank 2 of 5: the two nonzero singular values become
    their mean and the zeros stay zero (the plain one would spread the energy over five)."""
    x = _cores(T=1, a=5, b=5)[0]
    assert rel_err(rank_aware_isotropize(x), isotropize(x)) < 1e-12
    g = torch.Generator().manual_seed(1)
    low = torch.randn(5, 2, generator=g, dtype=F64) @ torch.randn(2, 5, generator=g, dtype=F64)
    S = torch.linalg.svdvals(low)
    got = torch.linalg.svdvals(rank_aware_isotropize(low))
    want = torch.tensor([S[:2].mean(), S[:2].mean(), 0, 0, 0], dtype=F64)
    assert rel_err(got, want) < 1e-10


def test_isotropic_truncation_is_isotropize_after_the_cut() -> None:
    """Rank k, every kept singular value the mean of the top k, the top-k singular subspaces
    of M kept; batched as one by one; k ≥ rank equals the plain (rank-aware) isotropize."""
    M = _cores(T=3, a=12, b=10, seed=4)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    left, right = isotropic_truncation(M, 4)
    got = left @ right
    want = (U[..., :4] * S[..., :4].mean(-1, keepdim=True)[..., None, :]) @ Vh[..., :4, :]
    assert rel_err(got, want) < 1e-12
    cut = (U[..., :4] * S[..., None, :4]) @ Vh[..., :4, :]
    assert rel_err(rank_aware_isotropize(cut), want) < 1e-12
    for t in range(3):
        one_left, one_right = isotropic_truncation(M[t], 4)
        assert rel_err(one_left @ one_right, got[t]) < 1e-12
        assert int(torch.linalg.matrix_rank(got[t])) == 4
    full_left, full_right = isotropic_truncation(M[0], 50)
    assert rel_err(full_left @ full_right, rank_aware_isotropize(M[0])) < 1e-12
    with pytest.raises(ValueError, match="at least 1"):
        isotropic_truncation(M, 0)


def test_docstring_example() -> None:
    import worker.engine.shared_bases as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
