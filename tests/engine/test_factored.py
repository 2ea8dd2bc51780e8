"""Factored inputs: the stacked factors and TSV's task SVDs taken from thin factors."""

from __future__ import annotations

import pytest
import torch

from worker.engine import FactorStack, core_factors, reference_bases
from worker.engine.methods import Tasks, tsv

from .refs import F64, HETERO_RANKS, dense, ref_core, ref_tsv, rel_err, run


def _tsv_dense(xs):
    return tsv(Tasks.of(xs), rank_of="space")[0]


def _tsv_factored(pairs):
    left = torch.cat([p for p, _ in pairs], dim=1)[None]
    right = torch.cat([q for _, q in pairs], dim=0)[None]
    ranks = [p.shape[1] for p, _ in pairs]
    return tsv(Tasks(factors=(left, right, ranks)), rank_of="space")[0]


def _products(ranks, m=20, n=18, seed=3):
    g = torch.Generator().manual_seed(seed)
    pairs = [
        (torch.randn(m, r, generator=g, dtype=F64), torch.randn(r, n, generator=g, dtype=F64))
        for r in ranks
    ]
    return [p @ q for p, q in pairs], pairs


@pytest.mark.parametrize(
    "ranks",
    [
        (2, 4, 8, 3),  # heterogeneous, the largest above ⌊K/T⌋ = 4: truncated
        (5, 5, 5),  # rank 5 < ⌊18/3⌋ = 6: all kept
        (9, 9),  # 9 = ⌊18/2⌋: all kept, U_c square
        (1,),  # one task
    ],
)
def test_tsv_from_factors_equals_tsv_from_the_dense_matrices(ranks):
    xs, pairs = _products(ranks)
    want = ref_tsv(xs)
    assert rel_err(_tsv_dense(xs), want) <= 1e-10
    assert rel_err(_tsv_factored(pairs), want) <= 1e-10


def test_tsv_from_factors_skips_a_zero_task():
    xs, pairs = _products((3, 4))
    pairs[0] = (torch.zeros_like(pairs[0][0]), pairs[0][1])
    xs[0] = torch.zeros_like(xs[0])
    assert rel_err(_tsv_factored(pairs), ref_tsv(xs)) <= 1e-10


def test_core_factors_multiply_to_the_core_matrices(hetero64):
    bases = reference_bases(hetero64)
    for f, (left, right) in zip(hetero64, core_factors(hetero64, bases), strict=True):
        assert left.shape[1] == right.shape[0] == f.A.shape[0]
        core = left @ right
        # U M_t Vᵀ reconstructs ΔW_t
        assert rel_err(bases.U @ core @ bases.V.mT, f.B @ f.A) <= 1e-12


def test_core_tsv_of_a_stack_matches_the_reference(hetero32):
    stack = FactorStack.of(hetero32)
    got = dense(run(stack, "tsv", space="core"))
    assert rel_err(got, ref_core(hetero32, "tsv", {})) <= 1e-5


def test_a_stack_is_a_sequence_of_views(hetero64):
    stack = FactorStack.of(hetero64)
    assert len(stack) == len(hetero64)
    assert stack.ranks == HETERO_RANKS
    assert FactorStack.of(stack) is stack
    assert torch.equal(stack.B, torch.cat([f.B for f in hetero64], dim=1))
    for got, want in zip(stack, hetero64, strict=True):
        assert torch.equal(got.A, want.A) and torch.equal(got.B, want.B)
        assert got.A.untyped_storage().data_ptr() == stack.A.untyped_storage().data_ptr()
    assert [f.A.shape[0] for f in stack[1:3]] == list(HETERO_RANKS[1:3])
    stack.B[0, 0] = 123.0  # a view: writes show through
    assert stack[0].B[0, 0] == 123.0


@pytest.mark.parametrize("space", ["core", "full", "knots"])
@pytest.mark.parametrize("method", ["ta", "ties", "tsv"])
def test_every_space_merges_a_stack_as_it_merges_the_list(hetero32, space, method):
    stack = FactorStack.of(hetero32)
    got, want = run(stack, method, space=space), run(hetero32, method, space=space)
    assert torch.equal(got.B, want.B) and torch.equal(got.A, want.A)


def test_a_stack_refuses_ranks_that_do_not_add_up():
    with pytest.raises(ValueError, match="do not hold ranks"):
        FactorStack(torch.zeros(8, 5), torch.zeros(5, 6), [2, 2])
    with pytest.raises(ValueError, match="do not hold ranks"):
        FactorStack(torch.zeros(8, 4), torch.zeros(5, 6), [2, 2])
