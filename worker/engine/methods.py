"""Merge methods: each maps T matrices X_t of one shape to one merged matrix X (docs/methods.md).

The same function serves every space: the X_t are the R × R core matrices in core space, the
dense ΔW_t in full space and the per-task blocks V_t in knots space; and every space hands
them over as :class:`Tasks`, for G modules of one shape at once (a leading batch dimension:
one module is the batch of one, the GPU merges a layer's modules of one kind together). The
global ``alpha``, ``isotropize`` and ``axes`` are applied by the space around the method.

A method is a function ``method(tasks, *, <its parameters>)`` whose keyword parameters are
named as in the job spec (``jobs.spec.METHOD_PARAMS``), and a cost function beside it that
replays its allocations (``worker.engine.ledger``). :data:`METHODS` is the one table of
them: adding a method is one function, its cost and one row (``tests/engine/test_registry.py``
holds the table to the spec's declaration by signature). Each follows the paper's reference
implementation; where it differs from PEFT's ``merge_utils`` the docstring says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from .ledger import F32, Ledger
from .linalg import (
    factored_svd,
    factored_svd_cost,
    isotropize,
    isotropize_cost,
    numerical_ranks,
    polar,
    polar_cost,
    svd,
    svd_cost,
)

__all__ = [
    "AUTO",
    "COMMON_PARAMS",
    "METHODS",
    "Method",
    "TaskShape",
    "Tasks",
    "apply_method",
    "auto_alpha",
    "cart",
    "dare",
    "dare_ties",
    "isotropic",
    "merge_tasks",
    "merge_tasks_cost",
    "rank_mode",
    "resolve_alphas",
    "task_arithmetic",
    "task_energies",
    "ties",
    "tsv",
]

#: ``alpha`` that asks for the data-free scale of :func:`auto_alpha`.
AUTO = "auto"
#: Below this norm relative to the tasks' (√ of energies), a merged X is rounding noise.
AUTO_FLOOR = 1e-5
#: Parameters the space applies around every method, not passed to it: the scale, the
#: optional isotropy of the result, the axes of the entry-wise methods (core space).
COMMON_PARAMS = ("alpha", "isotropize", "axes")

#: A parameter given per task: one value for every task, or one per task in input order.
PerTask = float | Sequence[float]


def _per_task(value: PerTask, T: int) -> list[float]:
    if isinstance(value, int | float):
        return [float(value)] * T
    if len(value) != T:
        raise ValueError(f"{len(value)} per-task values for {T} tasks")
    return [float(v) for v in value]


# ----------------------------------------------------------------------------- the inputs


class Tasks:
    """The T matrices X_t (a × b each) that a method merges, for G modules at once.

    Core space gives them as thin factors, X_t = left_t right_t with ``left`` (G, a, R) and
    ``right`` (G, R, b) split by ``ranks``, and they are formed only when a method asks for
    :attr:`matrices` (TSV works on the factors alone); full and knots space give them formed,
    (G, T, a, b). The formed matrices belong to the Tasks: a method may overwrite them (TIES
    trims them in place), so a space takes anything else it needs of them first
    (:meth:`energies`). ``layer_k`` is the layer's min(m, n) (``rank_of: "layer"``);
    ``generators`` one per module, for random methods (DARE).
    """

    def __init__(
        self,
        *,
        matrices: Tensor | None = None,
        factors: tuple[Tensor, Tensor, Sequence[int]] | None = None,
        layer_k: int | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> None:
        if (matrices is None) == (factors is None):
            raise ValueError("Tasks takes either the formed matrices or their thin factors")
        if matrices is not None:
            self.__dict__["matrices"] = matrices  # the cached_property's slot
            self.G, self.T, self.a, self.b = matrices.shape
            self.left = self.right = None
            self.ranks: tuple[int, ...] | None = None
        else:
            self.left, self.right, ranks = factors  # type: ignore[misc]
            self.ranks = tuple(ranks)
            self.G, self.a, self.b, self.T = (
                self.left.shape[0], self.left.shape[1], self.right.shape[2], len(self.ranks),
            )  # fmt: skip
        self.layer_k = layer_k
        self.generators = list(generators) if generators is not None else None

    @classmethod
    def of(cls, xs: Sequence[Tensor], **context) -> Tasks:
        """One module's T matrices, stacked (a copy: the Tasks may overwrite it)."""
        return cls(matrices=torch.stack(list(xs))[None], **context)

    @property
    def dtype(self) -> torch.dtype:
        return (self.left if self.left is not None else self.__dict__["matrices"]).dtype

    @property
    def device(self) -> torch.device:
        return (self.left if self.left is not None else self.__dict__["matrices"]).device

    def factor(self, t: int) -> tuple[Tensor, Tensor]:
        """Task t's thin factors (G, a, r_t) and (G, r_t, b)."""
        start = sum(self.ranks[:t])
        sl = slice(start, start + self.ranks[t])
        return self.left[:, :, sl], self.right[:, sl]

    @cached_property
    def matrices(self) -> Tensor:
        """X_t for every module and task, (G, T, a, b): one batched product when the ranks
        are equal, one per task otherwise."""
        G, a, b, T = self.G, self.a, self.b, self.T
        if len(set(self.ranks)) == 1:
            r = self.ranks[0]
            left = self.left.reshape(G, a, T, r).permute(0, 2, 1, 3)
            return left @ self.right.reshape(G, T, r, b)
        return torch.stack([left @ right for left, right in map(self.factor, range(T))], dim=1)

    def energies(self) -> Tensor:
        """‖X_t‖²_F per module and task, (G, T): a task at a time from the formed matrices,
        or, when they are not formed, from the thin factors as trace((LᵀL)(R Rᵀ)), r_t × r_t
        products instead of a × b ones."""
        if "matrices" in self.__dict__:
            X = self.matrices
            return torch.stack([X[:, t].square().sum((-2, -1)) for t in range(self.T)], dim=1)
        out = []
        for t in range(self.T):
            left, right = self.factor(t)
            out.append(((left.mT @ left) * (right @ right.mT)).sum((-2, -1)))
        return torch.stack(out, dim=1)

    def svd(self, t: int) -> tuple[Tensor, Tensor, Tensor]:
        """Task t's economy SVD for every module: from its thin factors when the Tasks has
        them (two QRs and an r_t × r_t SVD), else of the formed matrix."""
        if self.left is not None:
            return factored_svd(*self.factor(t))
        return svd(self.matrices[:, t])

    def rank_base(self, rank_of: str) -> int:
        """K of TSV and CART: min of the X_t's shape (``rank_of="space"``, the paper's), or
        the layer's min(m, n) (``"layer"``). In core space the first is R, so ``⌊K/T⌋`` and
        ``⌈rank_fraction·K⌉`` keep far fewer directions than full space does; with the second,
        core-space TSV and CART keep what full space keeps, and since both commute with the
        orthonormal reference bases, they then equal full space exactly."""
        if rank_of == "layer" and self.layer_k is not None:
            return self.layer_k
        return min(self.a, self.b)


@dataclass(frozen=True)
class TaskShape:
    """What a method's cost needs of its :class:`Tasks`: G modules of T matrices a × b,
    given as thin factors of ``ranks`` (core space) or formed (``ranks`` None)."""

    G: int
    T: int
    a: int
    b: int
    ranks: tuple[int, ...] | None = None
    layer_k: int | None = None

    @property
    def X(self) -> int:
        """Bytes of one matrix per module: G a b float32 values."""
        return F32 * self.G * self.a * self.b

    def matrices(self, L: Ledger) -> int:
        """:attr:`Tasks.matrices`: formed now when the Tasks has thin factors (returned, to be
        freed with the Tasks), else already allocated by the space (0)."""
        if self.ranks is None:
            return 0
        if len(set(self.ranks)) > 1:
            L.spike(self.X * self.T)  # the per-task products, before the stack copies them
        return L.alloc(self.X * self.T)

    def rank_base(self, rank_of: str) -> int:
        """:meth:`Tasks.rank_base`."""
        return self.layer_k if rank_of == "layer" and self.layer_k else min(self.a, self.b)


# ----------------------------------------------------------------------------- the methods
# Each method takes the Tasks and its own parameters, and returns the merged X (G, a, b).
# Its cost follows it: the bytes of X, left allocated.


def task_arithmetic(tasks: Tasks) -> Tensor:
    """TA: X = Σ_t X_t."""
    return tasks.matrices.sum(1)


def task_arithmetic_cost(L: Ledger, s: TaskShape) -> int:
    s.matrices(L)
    return L.alloc(s.X)


def _trim_to_density(stacked: Tensor, densities: Sequence[float]) -> Tensor:
    """Zero, in place, all but the largest-magnitude entries of each task's row of
    ``stacked`` (G, T, d): one row per task, ``densities[t]`` of task t's kept.

    Keeps every entry whose magnitude is ≥ the (d − ⌊d·density⌋)-th smallest, i.e.
    ⌊d·density⌋ + 1 entries plus ties, as the reference's ``topk_values_mask`` does
    (PEFT's ``magnitude_based_pruning`` keeps exactly ⌊d·density⌋). A task at a time, so the
    temporaries (magnitudes, kthvalue's copy, the mask) are one task's size, not T tasks':
    at T = 64 and R = 1024 that is 4 MiB each instead of 256 MiB.
    """
    d = stacked.shape[-1]
    for t, density in enumerate(densities):
        if density >= 1:
            continue
        row = stacked[:, t]
        magnitude = row.abs()
        kth = d - _floor_product(density, d)
        row.mul_(magnitude >= magnitude.kthvalue(kth, dim=-1, keepdim=True).values)
    return stacked


def _floor_product(fraction: float, count: int) -> int:
    """⌊fraction · count⌋ for the decimal the user wrote (0.29 · 100 = 29, not 28.999…)."""
    return math.floor(Decimal(repr(fraction)) * count)


def _ceil_product(fraction: float, count: int) -> int:
    """⌈fraction · count⌉ for the decimal the user wrote (0.28 · 25 = 7, not 7.000…1)."""
    return math.ceil(Decimal(repr(fraction)) * count)


def _elect_and_mean(kept: Tensor) -> Tensor:
    """TIES sign election and disjoint mean over the task rows of ``kept`` (G, T, d) →
    (G, d), a task at a time (temporaries of one task's size). An entry whose summed sign is
    0 takes the majority sign of its own module."""
    sign = torch.sign(kept.sum(-2))
    majority = torch.sign(sign.sum(-1, keepdim=True))
    sign = torch.where(sign == 0, majority, sign)
    total, count = torch.zeros_like(sign), torch.zeros_like(sign)
    for t in range(kept.shape[-2]):
        row = kept[:, t]
        agree = torch.sign(row) == sign
        total.add_(row * agree)
        count.add_(agree)
    return total / count.clamp(min=1)


def _ties_in_place(X: Tensor, densities: Sequence[float]) -> Tensor:
    """TIES on (G, T, a, b) → (G, a, b), trimming ``X`` itself."""
    G, T, a, b = X.shape
    if a * b == 0:
        return X.new_zeros(G, a, b)
    return _elect_and_mean(_trim_to_density(X.reshape(G, T, a * b), densities)).reshape(G, a, b)


def _ties_in_place_cost(L: Ledger, s: TaskShape, densities: Sequence[float]) -> int:
    """The trim (one task's magnitudes, kthvalue's copy with its int64 indices and the
    mask), then the election: the column sums, the sign and its where, the running total
    and count, one task's sign, mask and product at a time; the mean."""
    X = s.X
    if any(d < 1 for d in densities):
        L.spike(X + 3 * X + X // 4)
    sign = L.alloc(3 * X)  # the column sums, their sign, the elected sign
    running = L.alloc(2 * X)  # total and count
    L.spike(X + X // 4 + X)  # sign(row), agree, row * agree
    out = L.alloc(X)
    L.free(sign, running)
    return out


def ties(tasks: Tasks, *, density: PerTask) -> Tensor:
    """TIES: trim each task to its ``density``, elect a sign per entry, average the agreeing
    entries.

    An entry whose elected sign is 0 takes the module's majority sign (the reference's
    ``resolve_zero_signs``). The mean divides by the number of agreeing entries (at least 1).
    """
    return _ties_in_place(tasks.matrices, _per_task(density, tasks.T))


def ties_cost(L: Ledger, s: TaskShape, *, density: PerTask) -> int:
    s.matrices(L)
    return _ties_in_place_cost(L, s, _per_task(density, s.T))


def _drop_and_rescale(X: Tensor, drops: Sequence[float], generators) -> Tensor:
    """Drop each entry of task t with probability ``drops[t]``, in place; rescale survivors
    by 1/(1 − drop).

    The masks are drawn on the CPU from each module's generator, task by task (the same calls
    in the same order, batched or not), so a seed gives the same merge on every device.
    """
    shape = X.shape[2:]
    for t, drop in enumerate(drops):
        if drop == 0:
            continue
        for g, generator in enumerate(generators):
            keep = torch.rand(shape, generator=generator, dtype=torch.float32) >= drop
            X[g, t].mul_(keep.to(X.device)).div_(1.0 - drop)
    return X


def _drop_and_rescale_cost(L: Ledger, s: TaskShape, drops: Sequence[float]) -> None:
    if any(d > 0 for d in drops):
        X = s.X // s.G  # one module's matrix at a time
        L.spike(X + X // 4)  # the uniform draws (freed once compared), the mask


def dare(tasks: Tasks, *, drop: PerTask) -> Tensor:
    """DARE: random drop with rescale, then X = Σ_t."""
    X = _drop_and_rescale(tasks.matrices, _per_task(drop, tasks.T), tasks.generators)
    return X.sum(1)


def dare_cost(L: Ledger, s: TaskShape, *, drop: PerTask) -> int:
    s.matrices(L)
    _drop_and_rescale_cost(L, s, _per_task(drop, s.T))
    return L.alloc(s.X)


def dare_ties(tasks: Tasks, *, drop: PerTask, density: PerTask) -> Tensor:
    """DARE-TIES: DARE's drop and rescale (without the sum), then TIES on the results."""
    X = _drop_and_rescale(tasks.matrices, _per_task(drop, tasks.T), tasks.generators)
    return _ties_in_place(X, _per_task(density, tasks.T))


def dare_ties_cost(L: Ledger, s: TaskShape, *, drop: PerTask, density: PerTask) -> int:
    s.matrices(L)
    _drop_and_rescale_cost(L, s, _per_task(drop, s.T))
    return _ties_in_place_cost(L, s, _per_task(density, s.T))


def tsv(tasks: Tasks, *, rank_of: str) -> Tensor:
    """Task Singular Vectors (TSV-M): keep each task's top singular triplets, decorrelate, sum.

    Task t keeps k_t = min(⌊K/T⌋, numerical rank of X_t) components (K from
    :meth:`Tasks.rank_base`). The kept U's and V's are concatenated and each replaced by its
    orthogonal polar factor, so the tasks' directions no longer interfere:
    X = polar(U_c) diag(s_c) polar(V_c)ᵀ. Each task's SVD is of its factored form when the
    Tasks has one (the same triplets, up to the sign of each pair, which the result does not
    depend on). The number kept is decided per module; modules with the same k's share the
    polar factors (with random adapters: all of them).
    """
    G, T, a, b = tasks.G, tasks.T, tasks.a, tasks.b
    cap = tasks.rank_base(rank_of) // T
    us, ss, vhs, counts = [], [], [], []
    for t in range(T):
        U, S, Vh = tasks.svd(t)
        counts.append(numerical_ranks(S, (a, b)).clamp(max=cap))
        # Only what may be kept: a dense X_t's full U and Vh are freed now (thin ones are
        # small, kept whole)
        us.append(U[..., :cap].clone() if cap < U.shape[-1] else U)
        ss.append(S[..., :cap])
        vhs.append(Vh[..., :cap, :].clone() if cap < Vh.shape[-2] else Vh)
        del U, S, Vh
    kept = torch.stack(counts, dim=1).tolist()  # (G, T)
    by_pattern: dict[tuple[int, ...], list[int]] = {}
    for g, ks in enumerate(kept):
        by_pattern.setdefault(tuple(ks), []).append(g)
    X = None
    for ks, members in by_pattern.items():
        whole = len(members) == G
        pick = slice(None) if whole else torch.tensor(members, device=tasks.device)
        if sum(ks) == 0:  # nothing kept: X = 0
            merged = torch.zeros(len(members), a, b, dtype=tasks.dtype, device=tasks.device)
        else:
            U_c = torch.cat([U[pick][..., :k] for U, k in zip(us, ks, strict=True)], -1)
            s_c = torch.cat([S[pick][..., :k] for S, k in zip(ss, ks, strict=True)], -1)
            V_c = torch.cat([Vh[pick][..., :k, :] for Vh, k in zip(vhs, ks, strict=True)], -2)
            merged = (polar(U_c) * s_c[:, None, :]) @ polar(V_c)
        if whole:
            return merged
        if X is None:
            X = torch.empty(G, a, b, dtype=tasks.dtype, device=tasks.device)
        X[pick] = merged
    return X


def tsv_cost(L: Ledger, s: TaskShape, *, rank_of: str) -> int:
    G, T, a, b = s.G, s.T, s.a, s.b
    cap = s.rank_base(rank_of) // T
    held = 0
    for t in range(T):
        if s.ranks is not None:
            factors = factored_svd_cost(L, G, a, s.ranks[t], b)
        else:
            factors = svd_cost(L, G, a, b)
        k = min(cap, a, b, s.ranks[t] if s.ranks is not None else cap)
        held += L.alloc(F32 * G * (a * k + k + k * b))
        L.free(factors)
    kept = min(a, b, T * cap)
    cat = L.alloc(F32 * G * (a * kept + kept + kept * b))
    pu = polar_cost(L, G, a, kept)
    pv = polar_cost(L, G, kept, b)
    scaled = L.alloc(F32 * G * a * kept)  # polar(U_c) · s_c
    X = L.alloc(s.X)
    L.free(held, cat, pu, pv, scaled)
    return X


def cart(tasks: Tasks, *, rank_fraction: float, lam: float, rank_of: str) -> Tensor:
    """CART: the mean plus ``lam`` times the sum of each task's low-rank residual from it.

    X = avg + lam · Σ_t trunc_k(X_t − avg), with k = ⌈rank_fraction · K⌉ (K from
    :meth:`Tasks.rank_base`), a task at a time.
    """
    X = tasks.matrices
    avg = X.mean(1)
    k = _ceil_product(rank_fraction, tasks.rank_base(rank_of))
    total = torch.zeros_like(avg)
    for t in range(tasks.T):
        U, S, Vh = svd(X[:, t] - avg)
        total += (U[..., :k] * S[..., None, :k]) @ Vh[..., :k, :]
        del U, S, Vh
    return avg + lam * total


def cart_cost(L: Ledger, s: TaskShape, *, rank_fraction: float, lam: float, rank_of: str) -> int:
    s.matrices(L)
    K = min(s.a, s.b)
    k = min(K, math.ceil(rank_fraction * s.rank_base(rank_of)))
    avg, total = L.alloc(s.X), L.alloc(s.X)
    diff = L.alloc(s.X)
    factors = svd_cost(L, s.G, s.a, s.b)
    L.free(diff)
    L.spike(F32 * s.G * s.a * k + s.X)  # U_k S_k and its product with Vh_k, added in place
    L.free(factors)
    L.spike(s.X)  # lam · total
    out = L.alloc(s.X)
    L.free(avg, total)
    return out


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Method:
    """One merge method: ``merge(tasks, **params)`` → X (G, a, b), and ``cost(ledger, shape,
    **params)`` → the bytes of X, which it leaves allocated on the ledger. Both take the
    method's own parameters (``jobs.spec.METHOD_PARAMS`` without :data:`COMMON_PARAMS`) as
    keywords. ``isotropic``: the method's result is isotropized, as ``isotropize: true``
    asks of any method (the space's common step, which can defer it past a rank cut:
    :func:`rank_mode`)."""

    merge: Callable[..., Tensor]
    cost: Callable[..., int]
    isotropic: bool = False


#: Every method by its API name.
METHODS: dict[str, Method] = {
    "ta": Method(task_arithmetic, task_arithmetic_cost),
    "ties": Method(ties, ties_cost),
    "dare": Method(dare, dare_cost),
    "dare_ties": Method(dare_ties, dare_ties_cost),
    "tsv": Method(tsv, tsv_cost),
    "cart": Method(cart, cart_cost),
    # Iso-C (Marczak et al., 2025): task arithmetic, every singular value then their mean
    "iso_c": Method(task_arithmetic, task_arithmetic_cost, isotropic=True),
}


def _own(params: Mapping[str, Any]) -> dict[str, Any]:
    """The job's params that the method itself takes (the common ones stripped)."""
    return {k: v for k, v in params.items() if k not in COMMON_PARAMS}


# ----------------------------------------------------------------------------- the merge step


def isotropic(method: str, params: Mapping[str, Any]) -> bool:
    """Whether the merge's result is isotropized: Iso-C, or any method with ``isotropize``."""
    return METHODS[method].isotropic or bool(params.get("isotropize", False))


def rank_mode(method: str, params: Mapping[str, Any], mode: str) -> str:
    """How a merge is brought to ``output.rank`` (docs/methods.md, "Merging at a rank limit"):
    ``"truncate"`` (the best rank-k approximation of the merge), ``"isotropic"`` (cut to rank
    k, then the k singular values made their mean: the isotropy moved past the cut, so it
    flattens the directions the output keeps instead of being cut down to k/R of a flat
    spectrum) or ``"shared"`` (the tasks compressed onto shared rank-k bases first, then
    merged). ``"auto"`` is ``"isotropic"`` for an isotropic merge, else ``"truncate"``."""
    if mode == "auto":
        return "isotropic" if isotropic(method, params) else "truncate"
    return mode


def merge_tasks(
    method: str,
    tasks: Tasks,
    params: Mapping[str, Any],
    *,
    row_scale: Tensor | None = None,
    isotropize_later: bool = False,
) -> tuple[Tensor, list[float]]:
    """The merge step of every space: ``method`` on the tasks, then the isotropy an isotropic
    merge asks for (unless ``isotropize_later``: the space flattens the spectrum after its
    rank cut), then the scale alpha. Returns X (G, a, b), scaled, and each module's alpha.

    ``row_scale`` (G, a) weights the rows of every matrix before norms are taken, for a space
    whose X_t are not the updates (knots: ΔW_t = U diag(S) V_t, so ‖ΔW_t‖ = ‖diag(S) V_t‖).
    The tasks' energies are taken first, when ``alpha`` is ``"auto"``: the method may
    overwrite its inputs.
    """
    energies = task_energies(tasks, row_scale) if params.get("alpha", 1.0) == AUTO else None
    X = METHODS[method].merge(tasks, **_own(params))
    if isotropic(method, params) and not isotropize_later:
        X = isotropize(X)
    alphas = resolve_alphas(params, energies, X, row_scale)
    if any(alpha != 1.0 for alpha in alphas):
        X.mul_(torch.tensor(alphas, dtype=X.dtype, device=X.device)[:, None, None])
    return X, alphas


def merge_tasks_cost(
    L: Ledger,
    s: TaskShape,
    method: str,
    params: Mapping[str, Any],
    *,
    isotropize_later: bool = False,
) -> tuple[int, int]:
    """:func:`merge_tasks`'s allocations: (the bytes of X, the bytes of the matrices the
    method formed from thin factors), both left allocated (the second until the Tasks dies)."""
    if params.get("alpha", 1.0) == AUTO and s.ranks is None:
        L.spike(s.X)  # one task's squares at a time
    before = L.now
    X = METHODS[method].cost(L, s, **_own(params))
    formed = L.now - before - X
    if params.get("alpha", 1.0) == AUTO:
        L.spike(s.X)  # the merged X's squares
    if isotropic(method, params) and not isotropize_later:
        iso = isotropize_cost(L, s.G, s.a, s.b)
        L.free(X)
        X = iso
    return X, formed


def task_energies(tasks: Tasks, row_scale: Tensor | None = None) -> list[list[float]]:
    """‖X_t‖²_F per module and task (rows weighted by ``row_scale``, see :func:`merge_tasks`)."""
    if row_scale is None:
        return tasks.energies().tolist()
    X, w = tasks.matrices, row_scale[:, :, None]
    return torch.stack([(w * X[:, t]).square().sum((-2, -1)) for t in range(tasks.T)], 1).tolist()


def resolve_alphas(
    params: Mapping[str, Any],
    energies: list[list[float]] | None,
    X: Tensor,
    row_scale: Tensor | None = None,
) -> list[float]:
    """Each module's alpha: the number given, or :func:`auto_alpha` of the tasks'
    ``energies`` (:func:`task_energies`) and the merged X's."""
    alpha = params.get("alpha", 1.0)
    if alpha != AUTO:
        return [float(alpha)] * X.shape[0]
    weighted = X if row_scale is None else row_scale[:, :, None] * X
    merged = weighted.square().sum((-2, -1)).tolist()
    return [auto_alpha(t, m) for t, m in zip(energies, merged, strict=True)]


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


def apply_method(
    method: str,
    xs: Sequence[Tensor],
    params: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """The merge step on one module's matrices X_t (a list, not overwritten):
    :func:`merge_tasks` of the batch of one; X with alpha applied."""
    gen = torch.Generator().manual_seed(0) if generator is None else generator
    X, _ = merge_tasks(method, Tasks.of(xs, generators=[gen]), params)
    return X[0]
