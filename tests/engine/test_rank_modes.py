"""Merging at a rank limit (``output.rank`` with ``output.rank_mode``, docs/methods.md):
truncation, the isotropic cut, and shared rank-k bases, each against a float64 reference
written from the definitions."""

from __future__ import annotations

import pytest
import torch

from jobs.spec import MergeSpec, validate_params
from worker.engine import merge_group_in_core_space, merge_module
from worker.engine.methods import rank_mode
from worker.engine.shared_bases import lift, tucker2_bases

from .refs import F64, delta_ws, dense, ref_core_bases, ref_method, ref_ta, rel_err

K = 5  # the rank limit: below R = 17 of the fixtures


def _merge(factors, method, params=None, *, space="core", rank=K, mode="auto"):
    return merge_module(
        factors, method, validate_params(method, {"alpha": 1.0, **(params or {})}), space=space, rank=rank,
        generator=torch.Generator().manual_seed(0), output_rank_mode=mode,
    )  # fmt: skip


def _cut(x: torch.Tensor, k: int, *, flat: bool) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    S_k = torch.full_like(S[:k], float(S[:k].mean())) if flat else S[:k]
    return (U[:, :k] * S_k) @ Vh[:k]


def _ref_core_merge(factors, method, params) -> torch.Tensor:
    """Algorithm 1's merged update (no isotropy), the dense float64 way."""
    U, V = ref_core_bases(factors)
    Ms = [(U.mT @ f.B.to(F64)) @ (f.A.to(F64) @ V) for f in factors]
    return U @ ref_method(method, Ms, params) @ V.mT


def test_auto_is_isotropic_for_an_isotropic_merge_and_truncate_otherwise() -> None:
    assert rank_mode("iso_c", {}, "auto") == "isotropic"
    assert rank_mode("tsv", {"isotropize": True}, "auto") == "isotropic"
    assert rank_mode("ties", {}, "auto") == "truncate"
    assert rank_mode("iso_c", {}, "truncate") == "truncate"


@pytest.mark.parametrize("space", ["core", "full"])
def test_iso_c_at_a_rank_limit_flattens_the_directions_it_keeps(hetero64, space) -> None:
    """Iso-C at rank k: task arithmetic cut to its top k directions, THEN one singular value
    for all k, where truncating Iso-C's flat result keeps k/R of it in arbitrary directions."""
    merged = _merge(hetero64, "iso_c", space=space)
    want = _cut(ref_ta(delta_ws(hetero64)), K, flat=True)
    assert merged.rank == K
    assert rel_err(dense(merged), want) <= 1e-9
    s = torch.linalg.svdvals(dense(merged))[:K]
    assert float(s.max() - s.min()) <= 1e-9 * float(s.max())  # one singular value


def test_truncate_keeps_the_paper_s_order_isotropize_then_cut(hetero64) -> None:
    """Iso-C's flat spectrum of R directions, cut to K: K/R of its energy is left, in K of
    those equal directions (which K, LAPACK picks: the reason for the isotropic cut)."""
    merged = _merge(hetero64, "iso_c", mode="truncate")
    assert merged.rank == K and merged.kept_energy == pytest.approx(K / 17)
    kept = float(torch.linalg.matrix_norm(dense(merged)) ** 2)
    full = float(torch.linalg.matrix_norm(_ref_core_merge(hetero64, "iso_c", {})) ** 2)
    assert kept == pytest.approx(full * K / 17, rel=1e-9)


def test_isotropic_cut_of_any_method_in_core_space(hetero64) -> None:
    merged = _merge(hetero64, "tsv", mode="isotropic")
    want = _cut(_ref_core_merge(hetero64, "tsv", {}), K, flat=True)
    assert rel_err(dense(merged), want) <= 1e-9
    plain = _merge(hetero64, "tsv", mode="truncate")
    assert merged.kept_energy == pytest.approx(plain.kept_energy)  # of the cut, before flattening


@pytest.mark.parametrize(
    ("method", "params"), [("ta", {}), ("ties", {"density": 0.5}), ("tsv", {})]
)
def test_shared_bases_merge_the_tasks_coordinates(hetero64, method, params) -> None:
    """``"shared"``: Tucker-2 bases P, Q of the core matrices, the method on Pᵀ M_t Q, lifted
    back; rank ≤ k by construction, and the kept energy is the share the bases hold."""
    merged = _merge(hetero64, method, params, mode="shared")
    U, V = ref_core_bases(hetero64)
    cores = torch.stack([(U.mT @ f.B) @ (f.A @ V) for f in hetero64])
    P, Q = tucker2_bases(cores, K)
    coordinates = P.mT @ cores @ Q
    left, right = lift(ref_method(method, list(coordinates), params), P, Q)
    assert rel_err(dense(merged), U @ left @ right @ V.mT) <= 1e-9
    assert merged.rank <= K and int(torch.linalg.matrix_rank(dense(merged))) <= K
    captured = float(coordinates.square().sum() / cores.square().sum())
    assert merged.kept_energy == pytest.approx(captured, rel=1e-9)


def test_shared_bases_batched_equal_one_by_one(hetero32) -> None:
    params = validate_params("ties", {"density": 0.4})
    groups = [hetero32, [type(f)(A=f.A.flip(1), B=f.B.flip(0)) for f in hetero32]]
    batched = merge_group_in_core_space(groups, "ties", params, K, output_rank_mode="shared")
    for factors, got in zip(groups, batched, strict=True):
        want = merge_module(factors, "ties", params, rank=K, output_rank_mode="shared")
        assert rel_err(dense(got), dense(want)) <= 1e-5


def test_rank_mode_is_validated_by_the_spec() -> None:
    base = {"adapters": [{"uri": "/a"}], "output": {"uri": "/o", "rank": 8}}
    with pytest.raises(ValueError, match="needs space 'core'"):
        MergeSpec.model_validate({**base, "space": "full", "output": {**base["output"], "rank_mode": "shared"}})  # fmt: skip
    with pytest.raises(ValueError, match="both choose the axes"):
        MergeSpec.model_validate({**base, "method": "ties", "params": {"axes": "aligned"},
                                  "output": {**base["output"], "rank_mode": "shared"}})  # fmt: skip
    with pytest.raises(ValueError, match=r"output\.rank is not set"):
        MergeSpec.model_validate({**base, "output": {"uri": "/o", "rank_mode": "isotropic"}})
