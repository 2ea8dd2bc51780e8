"""Shared fixtures of the engine tests: random adapters with heterogeneous ranks and scales."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from worker.engine import LoraFactors

from .refs import HETERO_M, HETERO_N, HETERO_RANKS, HETERO_SCALES, make_factors, to64


@pytest.fixture(scope="package", autouse=True)
def _one_thread() -> Iterator[None]:
    """The matrices here are tiny: one intra-op thread is as fast, and far faster when the
    machine is busy (two OpenMP threads spin against each other: 2 s vs 20 s for this suite)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def hetero64() -> list[LoraFactors]:
    """Four float64 adapters, ranks 2, 4, 8, 3 on a 48 × 40 module, scalings folded into B."""
    return make_factors(HETERO_M, HETERO_N, HETERO_RANKS, seed=0, scales=HETERO_SCALES)


@pytest.fixture(scope="session")
def hetero32(hetero64: list[LoraFactors]) -> list[LoraFactors]:
    """The same adapters in float32, the dtype the worker runs in."""
    return [LoraFactors(A=f.A.float(), B=f.B.float()) for f in hetero64]


@pytest.fixture(scope="session")
def hetero32_as64(hetero32: list[LoraFactors]) -> list[LoraFactors]:
    """The float32 adapters converted exactly to float64, for float64 ground truths."""
    return to64(hetero32)


@pytest.fixture(scope="session")
def equal64() -> list[LoraFactors]:
    """Three float64 adapters of equal rank 3 on a 30 × 24 module (K/T = r in core/knots)."""
    return make_factors(30, 24, (3, 3, 3), seed=1, scales=(1.5, -0.8, 2.2))
