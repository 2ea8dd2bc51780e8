"""Merge methods: each maps T matrices X_t of one shape to one merged matrix X (docs/methods.md).

The same function serves every space: the X_t are the R × R core matrices in core space, the
dense ΔW_t in full space and the per-task blocks V_t in knots space. The global ``alpha`` and
the ``isotropize`` option are applied by the caller (:func:`apply_method`), once, after the
method. Each function follows the paper's reference implementation; where it differs from
PEFT's ``merge_utils`` the docstring says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import torch
from torch import Tensor

from .linalg import factored_svd, isotropize, numerical_rank, polar, svd

__all__ = [
    "AUTO",
    "LAYER_K",
    "METHOD_FUNCTIONS",
    "Factors",
    "apply_method",
    "auto_alpha",
    "cart",
    "dare",
    "dare_ties",
    "iso_c",
    "method_result",
    "rank_base",
    "resolve_alpha",
    "task_arithmetic",
    "ties",
    "tsv",
]


#: The X_t as products of thin factors, X_t = left_t @ right_t, when the caller has them (core
#: space: M_t = (Uᵀ B_t)(A_t V), inner size r_t). A method that needs each X_t's SVD takes it
#: from them: a QR of each factor and the SVD of an r_t × r_t matrix instead of an R × R one.
Factors = Sequence[tuple[Tensor, Tensor]]

#: ``params["alpha"]`` that asks for the data-free scale of :func:`auto_alpha`.
AUTO = "auto"
#: Below this norm relative to the tasks' (√ of energies), a merged X is rounding noise.
AUTO_FLOOR = 1e-5


def auto_alpha(task_energies: Sequence[float], merged_energy: float) -> float:
    """``alpha: "auto"``: the scale that gives the merged update the tasks' mean energy.

    alpha = √(mean_t ‖ΔW_t‖²_F) / ‖X‖_F, per module (docs/methods.md says why this rule and
    what else was measured). It needs no data: only the Frobenius norms of the updates, which
    core space keeps (‖U M Vᵀ‖_F = ‖M‖_F), so the rule costs one pass over R × R matrices.
    A merged X with no energy above rounding (tasks that cancel, or no update at all) keeps
    alpha 1: scaling rounding noise up to the tasks' size would invent an update.
    """
    total = sum(task_energies)
    if merged_energy <= AUTO_FLOOR**2 * total or total <= 0:
        return 1.0
    return math.sqrt(total / len(task_energies) / merged_energy)


def task_arithmetic(xs: Sequence[Tensor]) -> Tensor:
    """TA: X = Σ_t X_t."""
    return torch.stack(list(xs)).sum(0)


def _trim_to_density(stacked: Tensor, density: float) -> Tensor:
    """Zero, in place, all but the largest-magnitude entries of each task's row of
    ``stacked`` (…, T, d): one row per task, any leading dimensions (modules, batched).

    Keeps every entry whose magnitude is ≥ the (d − ⌊d·density⌋)-th smallest, i.e.
    ⌊d·density⌋ + 1 entries plus ties, as the reference's ``topk_values_mask`` does
    (PEFT's ``magnitude_based_pruning`` keeps exactly ⌊d·density⌋). A task at a time, so the
    temporaries (magnitudes, kthvalue's copy, the mask) are one task's size, not T tasks':
    at T = 64 and R = 1024 that is 4 MiB each instead of 256 MiB.
    """
    if density >= 1:
        return stacked
    d = stacked.shape[-1]
    kth = d - _floor_product(density, d)
    for t in range(stacked.shape[-2]):
        row = stacked[..., t, :]
        magnitude = row.abs()
        row.mul_(magnitude >= magnitude.kthvalue(kth, dim=-1, keepdim=True).values)
    return stacked


def _floor_product(fraction: float, count: int) -> int:
    """⌊fraction · count⌋ for the decimal the user wrote (0.29 · 100 = 29, not 28.999…)."""
    return math.floor(Decimal(repr(fraction)) * count)


def _ceil_product(fraction: float, count: int) -> int:
    """⌈fraction · count⌉ for the decimal the user wrote (0.28 · 25 = 7, not 7.000…1)."""
    return math.ceil(Decimal(repr(fraction)) * count)


def _elect_and_mean(kept: Tensor) -> Tensor:
    """TIES sign election and disjoint mean over the task rows of ``kept`` (…, T, d) → (…, d),
    a task at a time (temporaries of one task's size). An entry whose summed sign is 0
    takes the majority sign of its own module (the leading dimensions)."""
    sign = torch.sign(kept.sum(-2))
    majority = torch.sign(sign.sum(-1, keepdim=True))
    sign = torch.where(sign == 0, majority, sign)
    total, count = torch.zeros_like(sign), torch.zeros_like(sign)
    for t in range(kept.shape[-2]):
        row = kept[..., t, :]
        agree = torch.sign(row) == sign
        total.add_(row * agree)
        count.add_(agree)
    return total / count.clamp(min=1)


def ties(xs: Sequence[Tensor], density: float) -> Tensor:
    """TIES: trim each task to ``density``, elect a sign per entry, average the agreeing entries.

    An entry whose elected sign is 0 takes the module's majority sign (the reference's
    ``resolve_zero_signs``). The mean divides by the number of agreeing entries (at least 1).
    """
    shape = xs[0].shape
    if xs[0].numel() == 0:
        return torch.zeros_like(xs[0])
    stacked = torch.stack([x.reshape(-1) for x in xs])  # a copy: trimmed in place
    return _elect_and_mean(_trim_to_density(stacked, density)).reshape(shape)


def _drop_and_rescale(
    xs: Sequence[Tensor], drop: float, generator: torch.Generator
) -> list[Tensor]:
    """Drop each entry with probability ``drop``; rescale survivors by 1/(1 − drop).

    The masks are drawn on the CPU from ``generator`` in task order, so a seed gives the same
    merge on every device.
    """
    if drop == 0:
        return list(xs)
    out = []
    for x in xs:
        keep = torch.rand(x.shape, generator=generator, dtype=torch.float32) >= drop
        out.append(x * keep.to(x.device) / (1.0 - drop))
    return out


def dare(xs: Sequence[Tensor], drop: float, generator: torch.Generator) -> Tensor:
    """DARE: random drop with rescale, then X = Σ_t."""
    return task_arithmetic(_drop_and_rescale(xs, drop, generator))


def dare_ties(
    xs: Sequence[Tensor], drop: float, density: float, generator: torch.Generator
) -> Tensor:
    """DARE-TIES: DARE's drop and rescale (without the sum), then TIES on the results."""
    return ties(_drop_and_rescale(xs, drop, generator), density)


def tsv(xs: Sequence[Tensor], factors: Factors | None = None, K: int | None = None) -> Tensor:
    """Task Singular Vectors (TSV-M): keep each task's top singular triplets, decorrelate, sum.

    Task t keeps k_t = min(⌊K/T⌋, numerical rank of X_t) components (K = min dim). The kept
    U's and V's are concatenated and each replaced by its orthogonal polar factor, so the
    tasks' directions no longer interfere: X = polar(U_c) diag(s_c) polar(V_c)ᵀ. With
    ``factors``, each task's SVD is that of its factored form (the same triplets, up to the
    sign of each pair, which the result does not depend on). ``K`` overrides min(shape)
    (:func:`rank_base`).
    """
    T, K = len(xs), min(xs[0].shape) if K is None else K
    us, ss, vhs = [], [], []
    for t, x in enumerate(xs):
        if factors is None:
            U, S, Vh = svd(x)
        else:
            U, S, Vh = factored_svd(*factors[t])
        k = min(K // T, numerical_rank(S, tuple(x.shape)))
        us.append(U[:, :k])
        ss.append(S[:k])
        vhs.append(Vh[:k])
    s_c = torch.cat(ss)
    if s_c.numel() == 0:
        return torch.zeros_like(xs[0])
    return (polar(torch.cat(us, dim=1)) * s_c) @ polar(torch.cat(vhs, dim=0))


def cart(xs: Sequence[Tensor], rank_fraction: float, lam: float, K: int | None = None) -> Tensor:
    """CART: the mean plus ``lam`` times the sum of each task's low-rank residual from it.

    X = avg + lam · Σ_t trunc_k(X_t − avg), with k = ⌈rank_fraction · K⌉; ``K`` overrides
    min(shape) (:func:`rank_base`).
    """
    avg = torch.stack(list(xs)).mean(0)
    total = torch.zeros_like(avg)
    for x in xs:
        U, S, Vh = svd(x - avg)
        k = _ceil_product(rank_fraction, S.numel() if K is None else K)
        total += (U[:, :k] * S[:k]) @ Vh[:k]
    return avg + lam * total


def iso_c(xs: Sequence[Tensor]) -> Tensor:
    """Iso-C: task arithmetic, then every singular value replaced by their mean."""
    return isotropize(task_arithmetic(xs))


#: The key under which a space passes the layer's min(m, n) to the methods (not a job param).
LAYER_K = "_layer_k"


def rank_base(shape: Sequence[int], rank_of: str, params: Mapping[str, Any]) -> int:
    """K of TSV and CART: min of the X_t's ``shape`` (``rank_of="space"``, the paper's), or the
    layer's min(m, n) that the space passed (``"layer"``). In core space the first is R, so
    ``⌊K/T⌋`` and ``⌈rank_fraction·K⌉`` keep far fewer directions than full space does; with
    the second, core-space TSV and CART keep what full space keeps, and since both commute with
    the orthonormal reference bases, they then equal full space exactly."""
    if rank_of == "layer" and params.get(LAYER_K) is not None:
        return int(params[LAYER_K])
    return min(shape[-2:])


MethodFn = Callable[[Sequence[Tensor], Mapping[str, Any], torch.Generator, Factors | None], Tensor]

#: Each method by its API name, called with the validated params (``jobs.spec.METHOD_PARAMS`` declares them; a test keeps the two in step).
METHOD_FUNCTIONS: dict[str, MethodFn] = {
    "ta": lambda xs, p, g, f: task_arithmetic(xs),
    "ties": lambda xs, p, g, f: ties(xs, p["density"]),
    "dare": lambda xs, p, g, f: dare(xs, p["drop"], g),
    "dare_ties": lambda xs, p, g, f: dare_ties(xs, p["drop"], p["density"], g),
    "tsv": lambda xs, p, g, f: tsv(xs, f, rank_base(xs[0].shape, p["rank_of"], p)),
    "cart": lambda xs, p, g, f: cart(
        xs, p["rank_fraction"], p["lam"], rank_base(xs[0].shape, p["rank_of"], p)
    ),
    "iso_c": lambda xs, p, g, f: iso_c(xs),
}


def method_result(
    method: str,
    xs: Sequence[Tensor],
    params: Mapping[str, Any],
    generator: torch.Generator | None = None,
    factors: Factors | None = None,
) -> Tensor:
    """``method`` on the X_t, then the optional isotropize: the merged X before alpha."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    x = METHOD_FUNCTIONS[method](xs, params, generator, factors)
    if params.get("isotropize", False):
        x = isotropize(x)
    return x


def apply_method(
    method: str,
    xs: Sequence[Tensor],
    params: Mapping[str, Any],
    generator: torch.Generator | None = None,
    factors: Factors | None = None,
) -> Tensor:
    """Run ``method`` on the X_t, then the shared steps: optional isotropize, scale by alpha.

    ``factors``, when given, are the X_t as thin products (see :data:`Factors`). Where the X_t
    are not the updates themselves (knots space), the space resolves ``alpha: "auto"`` with
    :func:`resolve_alpha` and its own metric instead.
    """
    x = method_result(method, xs, params, generator, factors)
    return resolve_alpha(params, xs, x) * x


def resolve_alpha(
    params: Mapping[str, Any], xs: Sequence[Tensor], x: Tensor, row_scale: Tensor | None = None
) -> float:
    """The alpha to scale the merged ``x`` by: the number given, or :func:`auto_alpha`'s.

    ``row_scale`` weights the rows of every matrix before norms are taken, for a space whose
    X_t are not the updates (knots: ΔW_t = U diag(S) V_t, so ‖ΔW_t‖ = ‖diag(S) V_t‖).
    """
    alpha = params.get("alpha", 1.0)
    if alpha != AUTO:
        return float(alpha)
    if row_scale is not None:
        xs = [row_scale[:, None] * x_t for x_t in xs]
        x = row_scale[:, None] * x
    return auto_alpha([float(x_t.square().sum()) for x_t in xs], float(x.square().sum()))
