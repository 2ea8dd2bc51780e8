"""Every method in every space gives the same merge on an accelerator as on the CPU.

The device is named by the environment variable ``COREMERGE_TEST_DEVICE`` (``cuda``,
``cuda:1``, ``cpu``, …); unset, it is CUDA when torch sees a GPU, and the module is skipped
when the device is not available. With ``COREMERGE_TEST_DEVICE=cpu`` it runs anywhere (the CPU
against itself, and the batched core-space merge against the unbatched one), so it cannot rot
on machines without a GPU.

Each case merges the same factors on the device and on the CPU and compares ΔW = B A (the
factors may differ in the sign of each singular pair) to 1e-5 relative, in float32 (the
worker's dtype) except the few cases where float32 rounding alone can move the result further
(``_dtype``: they compare in float64). DARE's masks are drawn on the CPU from the module's
generator (docs/methods.md), so they are the same on every device. Where isotropize acts on a
rank-deficient matrix the result is not a function of the inputs (test_methods_reference.py):
there its well-defined part is compared (``_kind``). Knots ``tsv`` with mixed ranks is left out
(test_spaces.py: it is ill posed); the equal-rank set covers it. The ``batched`` cases merge a
group of modules with :func:`merge_group_in_core_space` on the device against
``merge_in_core_space`` on the CPU, module by module.

This module imports nothing but torch and the engine (not ``jobs.spec``, so not pydantic), so
on a machine with torch alone it runs without pytest's conftest:
``python3 -m tests.engine.test_device`` (exit status 1 when a case fails).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.engine import FactorStack, LoraFactors, MergedModule, merge_module
from worker.engine.batched import merge_group_in_core_space

try:
    import pytest
except ImportError:  # the plain runner below needs no pytest
    pytest = None  # type: ignore[assignment]

ENV = "COREMERGE_TEST_DEVICE"
TOL = 1e-5
F64 = torch.float64


def device_under_test() -> torch.device | None:
    """The device under test, or None when it is not available here."""
    name = os.environ.get(ENV) or ("cuda" if torch.cuda.is_available() else None)
    if not name:
        return None
    try:
        device = torch.device(name)
        if device.type == "cuda" and (
            not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
        ):
            return None
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError):
        return None
    return device


DEVICE = device_under_test()
CPU = torch.device("cpu")

#: The methods' parameters with their defaults filled in, as jobs.spec.validate_params would
#: (written out so this module does not need pydantic; a test checks them against jobs.spec).
DEFAULTS: dict[str, dict[str, Any]] = {
    "ta": {"alpha": "auto", "isotropize": False},
    "ties": {"alpha": "auto", "density": 0.1, "isotropize": False, "axes": "reference"},
    "dare": {"alpha": "auto", "drop": 0.3, "isotropize": False, "axes": "reference"},
    "dare_ties": {
        "alpha": "auto",
        "drop": 0.3,
        "density": 0.1,
        "isotropize": False,
        "axes": "reference",
    },
    "tsv": {"alpha": "auto", "isotropize": False, "rank_of": "space"},
    "cart": {
        "alpha": "auto",
        "rank_fraction": 0.04,
        "lam": 0.1,
        "isotropize": False,
        "rank_of": "space",
    },
    "iso_c": {"alpha": "auto", "isotropize": False},
}


# ----------------------------------------------------------------------------- inputs


def _factors(
    m: int, n: int, ranks: Sequence[int], scales: Sequence[float], seed: int
) -> list[LoraFactors]:
    """Random adapters ΔW_t = (s_t B_t) A_t, float64."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r, s in zip(ranks, scales, strict=True):
        A = torch.randn(r, n, generator=g, dtype=F64) / math.sqrt(n)
        B = torch.randn(m, r, generator=g, dtype=F64) * s
        out.append(LoraFactors(A=A, B=B))
    return out


def _spread_factors(
    m: int, n: int, ranks: Sequence[int], scales: Sequence[float], seed: int
) -> list[LoraFactors]:
    """Adapters whose singular values are all distinct, 5% apart (2 · 0.95^j, dealt to the
    tasks in turn), along random directions: B_t = s_t Q_t diag(σ_t), A_t = P_tᵀ.

    Why: a device's rounding differs from the CPU's by ~1e-7, and what a merge does with a
    singular vector moves by that over the gap to its neighbour; Gaussian factors of these
    sizes have gaps of 1% and less, which the knots SVD and the truncations turn into
    differences beyond 1e-5 (measured by perturbing the inputs by 3e-7). Well separated
    singular values keep the comparison about the device, not about conditioning.
    """
    g = torch.Generator().manual_seed(seed)
    R = sum(ranks)
    sigma = 2.0 * 0.95 ** torch.arange(R, dtype=F64)
    dealt: list[list[int]] = [[] for _ in ranks]
    t = 0
    for j in range(R):
        while len(dealt[t]) >= ranks[t]:
            t = (t + 1) % len(ranks)
        dealt[t].append(j)
        t = (t + 1) % len(ranks)
    out = []
    for r, s, js in zip(ranks, scales, dealt, strict=True):
        mine = sigma[torch.tensor(js)]
        Q, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))
        P, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))
        out.append(LoraFactors(A=P.mT.contiguous(), B=s * Q * mine))
    return out


#: name → (generator, m, n, ranks, scales): small and mixed ranks; Llama-like widths beyond
#: the sizes (32) where cuSOLVER switches algorithms, with separated singular values; equal
#: ranks (knots TSV is only well posed so).
SETS: dict[
    str, tuple[Callable[..., list[LoraFactors]], int, int, tuple[int, ...], tuple[float, ...]]
] = {
    "hetero": (_factors, 48, 40, (2, 4, 8, 3), (8.0, 2.0, -1.4, 6.93)),
    "wide": (_spread_factors, 512, 384, (16, 8, 16, 12), (1.0, 1.0, -1.0, 1.0)),
    "equal": (_factors, 30, 24, (3, 3, 3), (1.5, -0.8, 2.2)),
}


def factor_set(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[LoraFactors]:
    """The set's adapters, drawn in float64 and cast to ``dtype`` (the worker's: float32)."""
    make, m, n, ranks, scales = SETS[name]
    return [LoraFactors(A=f.A.to(dtype), B=f.B.to(dtype)) for f in make(m, n, ranks, scales, seed)]


def _on(factors: Sequence[LoraFactors], device: torch.device) -> list[LoraFactors]:
    return [LoraFactors(A=f.A.to(device), B=f.B.to(device)) for f in factors]


def _dense(merged: MergedModule) -> torch.Tensor:
    return merged.B.to(CPU, F64) @ merged.A.to(CPU, F64)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    den = float(want.norm())
    return float((got - want).norm()) / den if den > 0 else float(got.norm())


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One comparison of the device against the CPU; ``check`` raises AssertionError."""

    name: str
    space: str  # core, full, knots, or batched (core space, merge_group_in_core_space)
    method: str
    check: Callable[[torch.device], None] = field(repr=False)


METHOD_CASES: list[tuple[str, dict[str, Any], int | None]] = [
    ("ta", {}, None),
    ("ta", {"alpha": -0.7, "isotropize": True}, None),
    ("ties", {}, None),
    ("ties", {"density": 0.3}, None),
    ("ties", {"density": 0.3, "isotropize": True}, None),
    ("dare", {"drop": 0.3}, None),
    ("dare_ties", {"drop": 0.4, "density": 0.3}, None),
    ("tsv", {}, None),
    ("tsv", {"isotropize": True}, None),
    ("cart", {}, None),
    ("cart", {"rank_fraction": 0.2, "lam": 0.5}, None),
    ("iso_c", {}, None),
    ("tsv", {}, 6),
    ("ties", {"density": 0.3}, 5),
    ("ties", {"density": 0.3, "axes": "aligned"}, None),
    ("dare_ties", {"drop": 0.4, "density": 0.3, "axes": "aligned", "alpha": "auto"}, None),
    ("tsv", {"alpha": "auto"}, None),
    ("cart", {"rank_of": "layer"}, None),
]


def _kind(space: str, set_name: str, method: str, params: dict[str, Any]) -> str | None:
    """How a case is compared: ``exact`` (all of ΔW), ``isotropic`` (its well-defined part),
    or None (not a function of the inputs at all: skipped).

    Isotropizing a rank-deficient matrix gives its zero singular values the mean too, along
    singular vectors LAPACK or cuSOLVER pick as they like (test_methods_reference.py): the
    dense ΔW of full space always is one, knots isotropizes the dense ΔW, and a trimmed or
    truncated core matrix may be one. What is defined is compared instead: the singular
    values, and ΔW restricted to the range of the merge without isotropize.
    """
    if space == "knots" and method == "tsv" and len(set(SETS[set_name][3])) > 1:
        return None  # test_spaces.py: knots TSV with mixed ranks picks an arbitrary subspace
    isotropize = params.get("isotropize", False)
    if space == "full" and method == "iso_c":
        return "isotropic"
    if isotropize and not (space == "core" and method == "ta"):  # core ta: full rank R
        return "isotropic"
    return "exact"


def _dtype(space: str, set_name: str, method: str) -> torch.dtype:
    """float32 (the worker's dtype), except where float32 rounding alone may move the result
    beyond 1e-5, so that a device would fail without being wrong:

    - knots CART truncates blocks V_t whose r_t singular values are all 1, so V_t − avg has
      clustered ones (perturbing the inputs by 3e-7, float32's rounding, moved it 1e-4);
    - TIES trims at a threshold and elects signs entry by entry: a rounding difference flips
      an entry that sits on the threshold or sums to nearly zero, with a chance that grows
      with the number of entries; in knots space (blocks rotated by the knots SVD) and on
      the 512 × 384 dense ΔW_t of full space it is a matter of luck (one flip moved ΔW 1e-3).
      Float32 TIES stays covered on core matrices and on the small set.

    In float64 the same comparison checks that the device does the same maths.
    """
    if space == "knots" and method in ("cart", "ties", "dare_ties"):
        return F64
    if space == "full" and set_name == "wide" and method in ("ties", "dare_ties"):
        return F64
    return torch.float32


def _params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULTS[method], **params}


def _base(
    factors: Sequence[LoraFactors], space: str, method: str, params: dict[str, Any], seed: int
) -> torch.Tensor:
    """The merge without isotropize (iso_c: task arithmetic), on the CPU, as dense ΔW."""
    plain = {**params, "isotropize": False}
    base_method = "ta" if method == "iso_c" else method
    base = merge_module(
        factors, base_method, plain, space, None, torch.Generator().manual_seed(seed)
    )
    return _dense(base)


def _compare(
    got: MergedModule, want: MergedModule, what: str, base: torch.Tensor | None = None
) -> None:
    """``got`` (on the device) against ``want`` (on the CPU); raises AssertionError."""
    X, Y = _dense(got), _dense(want)
    if base is None:
        err = _rel_err(X, Y)
        assert err <= TOL, f"{what}: ΔW relative error {err:.2e} > {TOL:g}"
    else:
        U, sv, Vh = torch.linalg.svd(base, full_matrices=False)
        k = int((sv > sv[0] * 1e-5).sum())
        err = _rel_err(torch.linalg.svdvals(X), torch.linalg.svdvals(Y))
        assert err <= TOL, f"{what}: singular values' relative error {err:.2e} > {TOL:g}"
        part_x, part_y = (U[:, :k].mT @ Z @ Vh[:k].mT for Z in (X, Y))
        err = _rel_err(part_x, part_y)
        assert err <= TOL, f"{what}: ΔW on the merge's range: relative error {err:.2e} > {TOL:g}"
    assert got.rank == want.rank, f"{what}: rank {got.rank} vs {want.rank}"
    if want.kept_energy is not None:
        assert abs(got.kept_energy - want.kept_energy) <= 1e-5, what
    if want.residual is not None:
        assert got.residual is not None and got.residual <= 1e-5, f"{what}: {got.residual}"


def _merge_check(
    space: str, set_name: str, method: str, params: dict[str, Any], rank: int | None, kind: str
) -> Callable[[torch.device], None]:
    def check(device: torch.device) -> None:
        factors = factor_set(set_name, dtype=_dtype(space, set_name, method))
        p = _params(method, params)
        got = merge_module(
            _on(factors, device), method, p, space, rank, torch.Generator().manual_seed(5)
        )
        want = merge_module(factors, method, p, space, rank, torch.Generator().manual_seed(5))
        assert got.B.device.type == device.type and got.A.device.type == device.type
        base = _base(factors, space, method, p, 5) if kind == "isotropic" else None
        _compare(got, want, f"{space} on {device} vs cpu", base)

    return check


def _batched_check(
    method: str, params: dict[str, Any], rank: int | None, kind: str, eigh_device: str | None
) -> Callable[[torch.device], None]:
    """A group of three Llama-like modules merged batched on the device vs one by one on the
    CPU."""

    def check(device: torch.device) -> None:
        group = [factor_set("wide", seed) for seed in (1, 2, 3)]
        p = _params(method, params)
        gens = [torch.Generator().manual_seed(11 + i) for i in range(len(group))]
        got = merge_group_in_core_space(
            [FactorStack.of(_on(f, device)) for f in group],
            method,
            p,
            rank,
            gens,
            eigh_device=eigh_device,
        )
        for i, (factors, merged) in enumerate(zip(group, got, strict=True)):
            want = merge_module(
                factors, method, p, "core", rank, torch.Generator().manual_seed(11 + i)
            )
            base = _base(factors, "core", method, p, 11 + i) if kind == "isotropic" else None
            _compare(merged, want, f"module {i} batched on {device} vs cpu", base)

    return check


def _label(method: str, params: dict[str, Any], rank: int | None) -> str:
    extra = "".join(f"-{k}={v}" for k, v in params.items())
    return method + extra + ("" if rank is None else f"-rank={rank}")


def cases() -> list[Case]:
    """Every comparison this module makes, for pytest and for the plain runner alike."""
    out = []
    for space in ("core", "full", "knots"):
        for set_name in SETS:
            for method, params, rank in METHOD_CASES:
                if set_name == "equal" and method != "tsv":
                    continue  # the equal-rank set is there for knots TSV
                if space != "core" and "axes" in params:
                    continue  # rotating onto aligned axes is a core-space option
                kind = _kind(space, set_name, method, params)
                if kind is not None:
                    label = f"{space}-{set_name}-{_label(method, params, rank)}"
                    if _dtype(space, set_name, method) == F64:
                        label += "-float64"
                    check = _merge_check(space, set_name, method, params, rank, kind)
                    out.append(Case(label, space, method, check))
    for method, params, rank in METHOD_CASES:
        kind = _kind("core", "wide", method, params)
        check = _batched_check(method, params, rank, kind, None)
        out.append(Case(f"batched-{_label(method, params, rank)}", "batched", method, check))
    for method in ("ties", "tsv"):
        check = _batched_check(method, {}, None, "exact", "cpu")
        out.append(Case(f"batched-eigh-on-cpu-{method}", "batched", method, check))
    return out


CASES = cases()


def test_every_method_is_covered_in_every_space() -> None:
    covered = {(c.space, c.method) for c in CASES}
    spaces = ("core", "full", "knots", "batched")
    assert covered == {(space, method) for space in spaces for method in DEFAULTS}


def test_defaults_match_the_spec() -> None:
    spec = pytest.importorskip("jobs.spec")
    assert {m: spec.validate_params(m, {}) for m in spec.METHODS} == DEFAULTS


if pytest is not None:

    @pytest.mark.skipif(DEVICE is None, reason=f"no device: set {ENV} (cuda, cpu, …)")
    @pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
    def test_device_matches_cpu(case: Case) -> None:
        case.check(DEVICE)


# ----------------------------------------------------------------------------- plain runner


def main() -> int:
    """Run every case without pytest: one line per failure, a summary, status 1 on failure."""
    if DEVICE is None:
        print(f"test_device: no device ({ENV}={os.environ.get(ENV)!r}); skipped", flush=True)
        return 0
    # As tests/engine/conftest.py does: the CPU side's matrices are small, and two OpenMP
    # threads spinning against a busy neighbour make this 15 times slower.
    torch.set_num_threads(1)
    t0, failed = time.perf_counter(), []
    for case in CASES:
        try:
            case.check(DEVICE)
        except Exception as exc:  # an assertion, or an error on the device: both fail
            failed.append(case.name)
            print(f"FAILED {case.name}: {type(exc).__name__}: {exc}", flush=True)
    seconds = time.perf_counter() - t0
    print(
        f"test_device on {DEVICE}: {len(CASES) - len(failed)} passed, {len(failed)} failed "
        f"in {seconds:.1f} s",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
