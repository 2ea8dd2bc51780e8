"""Independent float64 references for the engine tests, written from docs/methods.md.

Nothing here calls the engine's maths: the references use plain dense ``torch.linalg.svd``
/ ``eigh`` and explicit thresholds, so an engine bug cannot cancel out against itself.
Integer counts (⌊d·density⌋, ⌈rank_fraction·K⌉) are computed in exact rational arithmetic,
as the contract writes them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from jobs.spec import validate_params
from worker.engine import LoraFactors, MergedModule, core_matrices, merge_module, reference_bases
from worker.engine.core_space import projection_residual

F64 = torch.float64

#: The heterogeneous adapters of most tests: ranks, per-adapter LoRA scaling s_t times job
#: weight w_t (one negative: task negation), all folded into B as docs/methods.md says.
HETERO_M, HETERO_N = 48, 40
HETERO_RANKS = (2, 4, 8, 3)
HETERO_SCALES = (16 / 2 * 1.0, 16 / 4 * 0.5, 16 / 8 * -0.7, 16 / 3 * 1.3)


# ---------------------------------------------------------------------------- inputs


def make_factors(
    m: int,
    n: int,
    ranks: Sequence[int],
    *,
    seed: int,
    scales: Sequence[float] | None = None,
    dtype: torch.dtype = F64,
) -> list[LoraFactors]:
    """Random adapters ΔW_t = (s_t B_t) A_t, drawn in float64 then cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(ranks):
        A = torch.randn(r, n, generator=g, dtype=F64) / math.sqrt(n)
        B = torch.randn(m, r, generator=g, dtype=F64)
        s = 1.0 if scales is None else scales[i]
        out.append(LoraFactors(A=A.to(dtype), B=(s * B).to(dtype)))
    return out


def to64(factors: Sequence[LoraFactors]) -> list[LoraFactors]:
    return [LoraFactors(A=f.A.to(F64), B=f.B.to(F64)) for f in factors]


def delta_ws(factors: Sequence[LoraFactors]) -> list[Tensor]:
    """The dense updates ΔW_t = B_t A_t in float64."""
    return [f.B.to(F64) @ f.A.to(F64) for f in factors]


def dense(merged: MergedModule) -> Tensor:
    return merged.B.to(F64) @ merged.A.to(F64)


def rel_err(got: Tensor, want: Tensor) -> float:
    """‖got − want‖_F / ‖want‖_F (absolute when want is zero)."""
    got, want = got.to(F64), want.to(F64)
    assert got.shape == want.shape, (got.shape, want.shape)
    den = float(want.norm())
    num = float((got - want).norm())
    return num / den if den > 0 else num


def run(
    factors: Sequence[LoraFactors],
    method: str,
    params: Mapping[str, Any] | None = None,
    *,
    space: str = "core",
    rank: int | None = None,
    seed: int = 0,
) -> MergedModule:
    """The engine under test, with validated params and a fresh seeded generator; alpha 1
    (the paper's) unless ``params`` says otherwise, as the references assume."""
    return merge_module(
        factors,
        method,
        validate_params(method, {"alpha": 1.0, **(params or {})}),
        space=space,
        rank=rank,
        generator=torch.Generator().manual_seed(seed),
    )


def bases_residual(factors: Sequence[LoraFactors]) -> float:
    """The engine's self-check on the engine's reference bases of ``factors``: how far the
    inputs lie off them. Plain TA no longer builds the bases (a stacked sum), so tests of
    the lossless projection call it here."""
    return projection_residual(factors, reference_bases(factors))


def bases_ta(factors: Sequence[LoraFactors]) -> Tensor:
    """Task arithmetic through the engine's bases, Algorithm 1 step by step: U (Σ_t M_t) Vᵀ
    (the engine itself takes the stacked sum, which equals it)."""
    bases = reference_bases(factors)
    M = torch.stack(core_matrices(factors, bases)).sum(0)
    return bases.U.to(F64) @ M.to(F64) @ bases.V.to(F64).mT


# ---------------------------------------------------------------------------- methods


def ref_ta(xs: Sequence[Tensor]) -> Tensor:
    out = torch.zeros_like(xs[0])
    for x in xs:
        out = out + x
    return out


def ref_trim(x: Tensor, density: float) -> Tensor:
    """Keep the entries whose magnitude is ≥ the (d − ⌊d·density⌋)-th smallest (1-based)."""
    if density >= 1:
        return x.clone()
    d = x.numel()
    keep = math.floor(Fraction(str(density)) * d)
    mags = sorted(x.abs().reshape(-1).tolist())
    threshold = mags[d - keep - 1]
    return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))


def ref_elect_mean(kept: Sequence[Tensor]) -> Tensor:
    """Sign election (0 → the module's majority sign), then the disjoint mean."""
    elected = torch.sign(ref_ta(kept))
    majority = torch.sign(elected.sum())
    elected = torch.where(elected == 0, majority, elected)
    num = torch.zeros_like(kept[0])
    count = torch.zeros_like(kept[0])
    for k in kept:
        agree = (k != 0) & (torch.sign(k) == elected)
        num = num + torch.where(agree, k, torch.zeros_like(k))
        count = count + agree.to(k.dtype)
    return num / count.clamp(min=1)


def ref_ties(xs: Sequence[Tensor], density: float) -> Tensor:
    return ref_elect_mean([ref_trim(x, density) for x in xs])


def ref_drop(xs: Sequence[Tensor], drop: float, seed: int) -> list[Tensor]:
    """DARE's drop and rescale, masks from the engine's documented CPU stream."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for x in xs:
        u = torch.rand(x.shape, generator=g, dtype=torch.float32)
        out.append(torch.where(u >= drop, x / (1 - drop), torch.zeros_like(x)))
    return out


def ref_polar(y: Tensor) -> Tensor:
    """Orthogonal polar factor of a full-column-rank y: y (yᵀy)^(−1/2), by eigh."""
    w, Q = torch.linalg.eigh(y.mT @ y)
    return y @ (Q * w.rsqrt()) @ Q.mT


def true_rank(x: Tensor, rtol: float = 1e-9) -> int:
    """Rank with a loose tolerance: the inputs are exactly low-rank products in float64."""
    S = torch.linalg.svdvals(x.to(F64))
    return int((rtol * S.max() < S).sum()) if S.numel() and S.max() > 0 else 0


def ref_tsv(xs: Sequence[Tensor]) -> Tensor:
    T, K = len(xs), min(xs[0].shape)
    us, ss, vs = [], [], []
    for x in xs:
        U, S, Vh = torch.linalg.svd(x, full_matrices=False)
        k = min(K // T, true_rank(x))
        us.append(U[:, :k])
        ss.append(S[:k])
        vs.append(Vh[:k].mT)
    s_c = torch.cat(ss)
    if s_c.numel() == 0:
        return torch.zeros_like(xs[0])
    U_c, V_c = torch.cat(us, dim=1), torch.cat(vs, dim=1)
    return ref_polar(U_c) @ torch.diag(s_c) @ ref_polar(V_c).mT


def ref_cart(xs: Sequence[Tensor], rank_fraction: float, lam: float) -> Tensor:
    avg = ref_ta(xs) / len(xs)
    k = math.ceil(Fraction(str(rank_fraction)) * min(avg.shape))
    total = torch.zeros_like(avg)
    for x in xs:
        U, S, Vh = torch.linalg.svd(x - avg, full_matrices=False)
        total = total + U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
    return avg + lam * total


def ref_isotropize(x: Tensor) -> Tensor:
    """Every one of the min(m, n) singular values replaced by their mean."""
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    return S.mean() * (U @ Vh)


def ref_method(
    method: str, xs: Sequence[Tensor], params: Mapping[str, Any], seed: int = 0
) -> Tensor:
    """alpha · [isotropize] · method({X_t}), docs/methods.md (alpha 1 unless given)."""
    p = validate_params(method, {"alpha": 1.0, **params})
    xs = [x.to(F64) for x in xs]
    if method == "ta":
        X = ref_ta(xs)
    elif method == "ties":
        X = ref_ties(xs, p["density"])
    elif method == "dare":
        X = ref_ta(ref_drop(xs, p["drop"], seed))
    elif method == "dare_ties":
        X = ref_ties(ref_drop(xs, p["drop"], seed), p["density"])
    elif method == "tsv":
        X = ref_tsv(xs)
    elif method == "cart":
        X = ref_cart(xs, p["rank_fraction"], p["lam"])
    elif method == "iso_c":
        X = ref_isotropize(ref_ta(xs))
    else:  # pragma: no cover
        raise AssertionError(method)
    if p["isotropize"]:
        X = ref_isotropize(X)
    return p["alpha"] * X


# ---------------------------------------------------------------------------- spaces


def ref_full(factors, method, params, seed: int = 0) -> Tensor:
    return ref_method(method, delta_ws(factors), params, seed)


def ref_core_bases(factors) -> tuple[Tensor, Tensor]:
    """U_ref, V_ref by a plain dense economy SVD of the stacked factors (float64)."""
    B_stack = torch.cat([f.B.to(F64) for f in factors], dim=1)
    A_stack = torch.cat([f.A.to(F64) for f in factors], dim=0)
    U = torch.linalg.svd(B_stack, full_matrices=False).U
    V = torch.linalg.svd(A_stack, full_matrices=False).Vh.mT
    return U, V


def ref_core(factors, method, params, seed: int = 0) -> Tensor:
    """Algorithm 1 with independent bases; the merge is invariant to their sign choice."""
    U, V = ref_core_bases(factors)
    Ms = [(U.mT @ f.B.to(F64)) @ (f.A.to(F64) @ V) for f in factors]
    return U @ ref_method(method, Ms, params, seed) @ V.mT


def ref_knots(factors, method, params, seed: int = 0) -> Tensor:
    """KnOTS the dense way: SVD of [ΔW_1 … ΔW_T], keep S > 1e-5, merge the V_t blocks."""
    dws = delta_ws(factors)
    n = dws[0].shape[1]
    U, S, Vh = torch.linalg.svd(torch.cat(dws, dim=1), full_matrices=False)
    keep = S > 1e-5
    blocks = list(Vh[keep].split(n, dim=1))
    return U[:, keep] @ torch.diag(S[keep]) @ ref_method(method, blocks, params, seed)


REF_SPACES = {"full": ref_full, "core": ref_core, "knots": ref_knots}
