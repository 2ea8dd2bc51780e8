"""Core-space merges of many equal-shape modules at once: one batched decomposition per step.

Why: on a GPU a module's core merge (docs/methods.md, Algorithm 1) is a chain of small
kernels (two Gram products, two R × R eigendecompositions, the method's R × R work, two
products back) whose launches and host synchronisations cost far more than their arithmetic,
and a Llama-3-8B merge runs 224 such chains one after another. The modules of one kind (every
layer's q_proj, say) share m, n and their adapters' ranks, so each step can run on all of them
at once through torch's batched linear algebra (a leading batch dimension): the number of
kernel launches and host round trips per step stops growing with the number of modules.

:func:`merge_group_in_core_space` computes, for every module of such a group, exactly what
:func:`worker.engine.spaces.merge_in_core_space` computes for it alone, step by step:

- **Reference bases.** The Gram route of :func:`worker.engine.linalg.left_singular_basis`,
  batched: one batched product xᵀx per stack and one batched float64 eigendecomposition of the
  R × R Gram matrices. A tall-skinny Householder QR batches poorly on CUDA (cuSOLVER factors
  one matrix per call) while a batched product and a small eigendecomposition do well. The
  route is still decided per module with the same conditioning thresholds; the modules that
  fail them (rank-deficient, ill-conditioned or wide stacks) take the QR route, batched among
  themselves, so every module gets the basis the unbatched engine would give it.
- **Core matrices** M_t = (Uᵀ B_t)(A_t V) for all modules and tasks in one batched product
  (one per task when the ranks differ). TSV needs only their thin factors, as unbatched.
- **Methods** on the (G, T, a, b) stack of core matrices, batched over modules: TIES' trim,
  election and mean, DARE's rescale, TSV's per-task factored SVDs and polar factors, CART's
  per-task SVDs, Iso-C's SVD. A method with no batched form here (a new one) runs module by
  module through :data:`worker.engine.methods.METHOD_FUNCTIONS`: slower, never different.
- **DARE's masks** are drawn on the CPU from each module's own generator, task by task, with
  the same calls in the same order as :func:`worker.engine.methods._drop_and_rescale`, so a
  seed gives the same masks batched or not; all of a group's masks then move in one copy.
- **Map back, truncation, self-check**: batched, with one host transfer for the kept energies
  and one for the residuals of the whole group.
- **Errors**: every SVD goes through :func:`worker.engine.linalg.svd`, which raises
  ``NonFiniteError`` for NaN or ±inf as the unbatched merge does; for a group, when any of
  its modules' matrices is not finite.

Results equal the unbatched engine's to float32 rounding (the tests hold ΔW = B A to 1e-5
relative; the factors themselves may differ in the sign of each singular pair).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from .linalg import MAX_F32_GRAM_CONDITION, MAX_GRAM_CONDITION, Basis, svd
from .methods import (
    AUTO,
    LAYER_K,
    METHOD_FUNCTIONS,
    _ceil_product,
    _elect_and_mean,
    _trim_to_density,
    auto_alpha,
    rank_base,
)
from .spaces import (
    FactorStack,
    LoraFactors,
    MergedModule,
    _rank_slices,
    _spread,
    stacked_sum,
    takes_stacked_sum,
    through_the_stacks,
)

__all__ = [
    "group_key",
    "merge_group_in_core_space",
    "merge_stacks_in_core_space",
    "shape_groups",
]

# ----------------------------------------------------------------------------- grouping


def group_key(stack: FactorStack) -> Hashable:
    """What modules must share to be merged in one batch: shapes, ranks, dtype and device."""
    return (tuple(stack.B.shape), tuple(stack.A.shape), stack.ranks, stack.B.dtype, stack.B.device)


def shape_groups(stacks: Sequence[FactorStack], max_group: int | None = None) -> list[list[int]]:
    """Indices of ``stacks`` grouped by :func:`group_key`, each group at most ``max_group`` long.

    Groups come in the order of their first member and keep their members' order, so a caller
    that merges the groups one after another can put the results back in input order.
    """
    open_group: dict[Hashable, list[int]] = {}
    groups: list[list[int]] = []
    for i, stack in enumerate(stacks):
        key = group_key(stack)
        current = open_group.get(key)
        if current is None or (max_group is not None and len(current) >= max_group):
            current = open_group[key] = []
            groups.append(current)
        current.append(i)
    return groups


def _check_group(stacks: Sequence[FactorStack]) -> None:
    first = group_key(stacks[0])
    for i, stack in enumerate(stacks[1:], start=1):
        if group_key(stack) != first:
            raise ValueError(
                f"module {i} of the group does not match module 0 (B {tuple(stack.B.shape)}, "
                f"A {tuple(stack.A.shape)}, ranks {stack.ranks}, {stack.B.dtype} on "
                f"{stack.B.device}; expected {first}): merge it in another group"
            )


def _generators(
    generators: Sequence[torch.Generator | None] | None, count: int
) -> list[torch.Generator]:
    """One generator per module; a missing one is a fresh seed-0 generator, as
    :func:`worker.engine.methods.apply_method` makes when given none."""
    if generators is None:
        generators = [None] * count
    if len(generators) != count:
        raise ValueError(f"{len(generators)} generators for {count} modules: one per module")
    return [torch.Generator().manual_seed(0) if g is None else g for g in generators]


def _stacked(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.stack(tensors)``, without the copy when they are already the slices 0 … G−1 of
    one (G, …) tensor: a caller that reads a group's factors straight into one batched buffer
    (``FactorStack(B=buffer_B[g], A=buffer_A[g], ranks)``) saves the group's size in memory
    and a pass over it."""
    base = tensors[0]._base
    if (
        base is not None
        and base.shape == (len(tensors), *tensors[0].shape)
        and all(
            t._base is base
            and t.data_ptr() == base[g].data_ptr()
            and t.stride() == base[g].stride()
            for g, t in enumerate(tensors)
        )
    ):
        return base
    return torch.stack(list(tensors))


def _take(t: Tensor, index: list[int]) -> Tensor:
    """``t[index]`` along the batch dimension, without a copy when ``index`` is everything."""
    if index == list(range(t.shape[0])):
        return t
    return t[torch.tensor(index, device=t.device)]


# ----------------------------------------------------------------------------- bases


@dataclass(frozen=True)
class _Bases(Basis):
    """Orthonormal bases U (G × m × k) of G stacked factors x (G × m × R), and Uᵀ x.

    U is kept implicitly as x K (K: G × R × k) when every module took a Gram route, as
    :class:`worker.engine.linalg.Basis` does (U @ M is then x @ (K M), one product with the
    tall factor), else explicitly. Its products broadcast over the leading G unchanged; only
    :meth:`rows` indexes the second dimension.
    """

    coords: Tensor | None = None  # Uᵀ x, (G, k, R)
    routes: tuple[str, ...] = ()  # per module: "gram32", "gram64" or "qr", as linalg chooses

    def rows(self, index: Tensor) -> Tensor:
        """U[:, index]."""
        return self.U[:, index] if self.U is not None else self.x[:, index] @ self.K


def _descending_eigh(gram: Tensor, device: torch.device | None) -> tuple[Tensor, Tensor]:
    """Batched float64 eigendecomposition, largest eigenvalue first (as an SVD orders them).

    ``device`` moves the small Gram matrices first: cuSOLVER decomposes R > 32 matrices one
    call at a time, so on some GPUs the host's LAPACK is as fast and saves the separate
    round trip that the conditioning test needs anyway.
    """
    gram = gram.double()
    if device is not None:
        gram = gram.to(device)
    eigenvalues, V = torch.linalg.eigh(gram)
    return eigenvalues.flip(-1), V.flip(-1)


def _conditioned(eigenvalues: Tensor, condition: float) -> list[bool]:
    """Per module: cond(x)² = λ_max / λ_min ≤ condition², all finite, λ_min > 0
    (:func:`worker.engine.linalg._conditioned`, batched)."""
    top, bottom = eigenvalues[:, 0], eigenvalues[:, -1]
    return (torch.isfinite(top) & (bottom > 0) & (top <= bottom * condition**2)).tolist()


def _basis(x: Tensor, eigh_device: torch.device | None) -> _Bases:
    """:func:`worker.engine.linalg.left_singular_basis` for G stacks x (G × m × R) at once.

    The same decisions per module: the float32 Gram matrix when cond(x) ≤ 4, the float64 one
    when cond(x) ≤ 32 (or the float32 Gram overflowed), a Householder QR otherwise.
    """
    G, m, R = x.shape
    routes = ["qr"] * G
    eig: dict[int, tuple[Tensor, Tensor]] = {}
    gram = x.mT @ x
    finite = torch.isfinite(gram).flatten(1).all(1).tolist()
    first = [g for g in range(G) if finite[g]]
    retry = [g for g in range(G) if not finite[g]]  # overflowed in float32: decide in float64
    if first:
        values, vectors = _descending_eigh(_take(gram, first), eigh_device)
        good = _conditioned(values, MAX_F32_GRAM_CONDITION)
        near = _conditioned(values, 1.01 * MAX_GRAM_CONDITION)  # 1%: the estimate's margin
        for i, g in enumerate(first):
            if good[i]:
                routes[g], eig[g] = "gram32", (values[i], vectors[i])
            elif near[i]:
                retry.append(g)
    if retry:
        retry.sort()
        xd = _take(x, retry).double()
        values, vectors = _descending_eigh(xd.mT @ xd, eigh_device)
        good = _conditioned(values, MAX_GRAM_CONDITION)
        for i, g in enumerate(retry):
            if good[i]:
                routes[g], eig[g] = "gram64", (values[i], vectors[i])

    by_gram = [g for g in range(G) if routes[g] != "qr"]
    by_qr = [g for g in range(G) if routes[g] == "qr"]
    if by_gram:
        S = torch.stack([eig[g][0] for g in by_gram]).sqrt()
        V = torch.stack([eig[g][1] for g in by_gram])
        K = (V / S[:, None, :]).to(device=x.device, dtype=x.dtype)
        gram_coords = (S[:, :, None] * V.mT).to(device=x.device, dtype=x.dtype)
        if not by_qr:
            return _Bases(x=x, coords=gram_coords, K=K, routes=tuple(routes))
    # The QR route (U = Q Ur, Uᵀx = Urᵀ Rx), batched over the modules that need it.
    Q, Rx = torch.linalg.qr(_take(x, by_qr), mode="reduced")
    Ur = svd(Rx)[0]
    U_qr, qr_coords = Q @ Ur, Ur.mT @ Rx
    if not by_gram:
        return _Bases(x=x, coords=qr_coords, U=U_qr, routes=tuple(routes))
    # Both routes in one group (rare: the stacks' conditioning straddles a threshold). Only
    # possible when R ≤ m (a Gram route needs full column rank), so both give k = R.
    U = torch.empty(G, m, U_qr.shape[-1], dtype=x.dtype, device=x.device)
    coords = torch.empty(G, qr_coords.shape[-2], R, dtype=x.dtype, device=x.device)
    gram_index = torch.tensor(by_gram, device=x.device)
    qr_index = torch.tensor(by_qr, device=x.device)
    U[gram_index] = x[gram_index] @ K
    U[qr_index] = U_qr
    coords[gram_index] = gram_coords
    coords[qr_index] = qr_coords
    return _Bases(x=x, coords=coords, U=U, routes=tuple(routes))


# ----------------------------------------------------------------------------- methods


class _Core:
    """The group's core matrices, as thin factors and (on demand) formed."""

    def __init__(self, UtB: Tensor, AV: Tensor, ranks: tuple[int, ...]) -> None:
        self.UtB, self.AV, self.ranks = UtB, AV, ranks  # (G, a, R), (G, R, b)
        self.slices = _rank_slices(ranks)

    @property
    def shape(self) -> tuple[int, int]:
        """(a, b): one core matrix."""
        return self.UtB.shape[-2], self.AV.shape[-1]

    def thin(self, t: int) -> tuple[Tensor, Tensor]:
        """Task t's M_t as (Uᵀ B_t, A_t V), (G, a, r_t) and (G, r_t, b)."""
        sl = self.slices[t]
        return self.UtB[:, :, sl], self.AV[:, sl]

    @cached_property
    def matrices(self) -> Tensor:
        """M_t for every module and task, (G, T, a, b): one batched product when the ranks
        are equal, one per task otherwise."""
        G, a, _ = self.UtB.shape
        b, T = self.AV.shape[-1], len(self.ranks)
        if len(set(self.ranks)) == 1:
            r = self.ranks[0]
            left = self.UtB.reshape(G, a, T, r).permute(0, 2, 1, 3)
            return left @ self.AV.reshape(G, T, r, b)
        return torch.stack([left @ right for left, right in map(self.thin, range(T))], dim=1)

    @property
    def total(self) -> Tensor:
        """Σ_t M_t, summed over the formed M_t as :func:`worker.engine.methods.task_arithmetic`
        sums them. (Uᵀ B_stack)(A_stack V) is the same sum in one product of the same cost,
        but its rounding differs, and a truncation to ``output.rank`` inside a cluster of
        singular values turns that into differences beyond 1e-5 (measured: 3e-5).
        """
        return self.matrices.sum(1)


def _drop_and_rescale(X: Tensor, drop: float, generators: Sequence[torch.Generator]) -> Tensor:
    """DARE on (G, T, a, b): the masks of :func:`worker.engine.methods._drop_and_rescale`,
    drawn on the CPU from module g's generator, task by task, then moved in one copy."""
    if drop == 0:
        return X
    T, shape = X.shape[1], X.shape[2:]
    keep = torch.stack(
        [
            torch.stack(
                [torch.rand(shape, generator=g, dtype=torch.float32) >= drop for _ in range(T)]
            )
            for g in generators
        ]
    )
    return X * keep.to(X.device) / (1.0 - drop)


def _ties(X: Tensor, density: float) -> Tensor:
    """TIES on (G, T, a, b) → (G, a, b): :func:`worker.engine.methods.ties`'s own trim and
    election, which take leading dimensions, on one copy of the stack (``X`` itself is
    kept: the core matrices serve ``alpha: "auto"`` afterwards)."""
    G, T, a, b = X.shape
    stacked = X.reshape(G, T, a * b).clone()
    return _elect_and_mean(_trim_to_density(stacked, density)).reshape(G, a, b)


def _factored_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`worker.engine.linalg.factored_svd`, batched: SVD of B A from its thin factors."""
    Qb, Rb = torch.linalg.qr(B, mode="reduced")
    Qa, Ra = torch.linalg.qr(A.mT, mode="reduced")
    Us, S, Vhs = svd(Rb @ Ra.mT)
    return Qb @ Us, S, Vhs @ Qa.mT


def _polar(x: Tensor) -> Tensor:
    P, _, Qh = svd(x)
    return P @ Qh


def _tsv(core: _Core, K: int) -> Tensor:
    """TSV-M (:func:`worker.engine.methods.tsv` with factors), batched over modules.

    Each task's SVD comes from its thin factors (two batched QRs and an r_t × r_t SVD per
    task). The number kept, k_t = min(⌊K/T⌋, numerical rank) (K from
    :func:`worker.engine.methods.rank_base`), is decided per module; modules
    with the same k's share the batched polar factors (with random adapters: all of them).
    """
    G = core.UtB.shape[0]
    a, b = core.shape
    T = len(core.ranks)
    cap = K // T
    svds = [_factored_svd(*core.thin(t)) for t in range(T)]
    eps = torch.finfo(core.UtB.dtype).eps
    counts = torch.stack(
        [(s > s.amax(-1, keepdim=True) * max(a, b) * eps).sum(-1) for _, s, _ in svds], dim=1
    )
    kept = counts.clamp(max=cap).tolist()  # (G, T): numerical_rank capped at ⌊K/T⌋
    by_pattern: dict[tuple[int, ...], list[int]] = {}
    for g, ks in enumerate(kept):
        by_pattern.setdefault(tuple(ks), []).append(g)
    X = torch.zeros(G, a, b, dtype=core.UtB.dtype, device=core.UtB.device)
    for ks, members in by_pattern.items():
        if sum(ks) == 0:
            continue  # nothing kept: X = 0
        index = torch.tensor(members, device=X.device)
        pick = slice(None) if len(members) == G else index
        U_c = torch.cat([U[pick][:, :, :k] for (U, _, _), k in zip(svds, ks, strict=True)], -1)
        s_c = torch.cat([S[pick][:, :k] for (_, S, _), k in zip(svds, ks, strict=True)], -1)
        V_c = torch.cat([Vh[pick][:, :k] for (_, _, Vh), k in zip(svds, ks, strict=True)], -2)
        merged = (_polar(U_c) * s_c[:, None, :]) @ _polar(V_c)
        if len(members) == G:
            return merged
        X[index] = merged
    return X


def _cart(core: _Core, rank_fraction: float, lam: float, K: int) -> Tensor:
    """CART (:func:`worker.engine.methods.cart`): one batched SVD over all modules and tasks."""
    X = core.matrices
    avg = X.mean(1)
    U, S, Vh = svd(X - avg[:, None])
    k = _ceil_product(rank_fraction, K)
    return avg + lam * ((U[..., :k] * S[..., None, :k]) @ Vh[..., :k, :]).sum(1)


def _isotropize(x: Tensor) -> Tensor:
    """:func:`worker.engine.linalg.isotropize` on each matrix of a batch."""
    U, S, Vh = svd(x)
    return (U * S.mean(-1)[..., None, None]) @ Vh


#: The batched form of each method of :data:`METHOD_FUNCTIONS`: (core, params, generators)
#: → the merged core matrices (G, a, b).
_BATCHED = {
    "ta": lambda c, p, g: c.total,
    "ties": lambda c, p, g: _ties(c.matrices, p["density"]),
    "dare": lambda c, p, g: _drop_and_rescale(c.matrices, p["drop"], g).sum(1),
    "dare_ties": lambda c, p, g: _ties(_drop_and_rescale(c.matrices, p["drop"], g), p["density"]),
    "tsv": lambda c, p, g: _tsv(c, rank_base(c.shape, p["rank_of"], p)),
    "cart": lambda c, p, g: _cart(
        c, p["rank_fraction"], p["lam"], rank_base(c.shape, p["rank_of"], p)
    ),
    "iso_c": lambda c, p, g: _isotropize(c.total),
}


def _module_by_module(
    method: str, core: _Core, params: Mapping[str, Any], generators: Sequence[torch.Generator]
) -> Tensor:
    """A method without a batched form, through its unbatched function, module by module."""
    fn = METHOD_FUNCTIONS[method]
    out = []
    for g, generator in enumerate(generators):
        thin = [(core.UtB[g][:, sl], core.AV[g][sl]) for sl in core.slices]
        out.append(fn([left @ right for left, right in thin], params, generator, thin))
    return torch.stack(out)


def _merge(
    method: str, core: _Core, params: Mapping[str, Any], generators: Sequence[torch.Generator]
) -> tuple[Tensor, list[float]]:
    """:func:`worker.engine.spaces.merge_in_core_space`'s merge step for the group: the
    optional rotation onto aligned axes, method, isotropize, alpha; the merged core matrices
    (G, a, b) and each module's alpha."""
    rotation = _aligned_axes(core.matrices) if params.get("axes") == "aligned" else None
    if rotation is not None:
        P, Q = rotation
        core = _Core(P.mT @ core.UtB, core.AV @ Q, core.ranks)
    batched = _BATCHED.get(method)
    if batched is None:
        M = _module_by_module(method, core, params, generators)
    else:
        M = batched(core, params, generators)
    if params.get("isotropize", False):
        M = _isotropize(M)
    alphas = _alphas(params, core, M)
    M = M * torch.tensor(alphas, dtype=M.dtype, device=M.device)[:, None, None]
    if rotation is not None:
        M = P @ M @ Q.mT
    return M, alphas


def _aligned_axes(matrices: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`worker.engine.spaces.aligned_axes` of every module of (G, T, a, b): P (G, a, a)
    from [M_1 … M_T], Q (G, b, b) from [M_1; …; M_T]."""
    G, T, a, b = matrices.shape
    side = matrices.permute(0, 2, 1, 3).reshape(G, a, T * b)
    P = svd(side, full_matrices=True)[0]
    Q = svd(matrices.reshape(G, T * a, b), full_matrices=True)[2].mT
    return P, Q


def _alphas(params: Mapping[str, Any], core: _Core, M: Tensor) -> list[float]:
    """Each module's alpha: the number given, or :func:`worker.engine.methods.auto_alpha`."""
    alpha = params.get("alpha", 1.0)
    if alpha != AUTO:
        return [float(alpha)] * M.shape[0]
    tasks = core.matrices.square().sum((-2, -1)).tolist()  # (G, T)
    merged = M.square().sum((-2, -1)).tolist()
    return [auto_alpha(t, m) for t, m in zip(tasks, merged, strict=True)]


# ----------------------------------------------------------------------------- back out


def _lora_pairs(
    left: _Bases, right: _Bases, M: Tensor, rank: int | None
) -> tuple[Tensor, Tensor, list[float] | None]:
    """:func:`worker.engine.spaces._as_lora_pair` for the group: U M Vᵀ as (B, A), exactly
    when M is square, else (or with ``rank``) through the batched SVD of the small M."""
    a, b = M.shape[-2:]
    if rank is None and a == b:
        pair = through_the_stacks(left, right, M)
        if pair is not None:
            return *pair, None
        return left.apply(M), right.transposed(), None
    P, S, Qh = svd(M)
    if rank is None:
        return left.apply(P * S[:, None, :]), right.apply_t(Qh), None
    k = min(rank, S.shape[-1])
    energy = S.double() ** 2
    totals, kept = energy.sum(-1).tolist(), energy[:, :k].sum(-1).tolist()
    fractions = [kp / tot if tot > 0 else 1.0 for kp, tot in zip(kept, totals, strict=True)]
    return left.apply(P[..., :k] * S[:, None, :k]), right.apply_t(Qh[:, :k]), fractions


def _per_task(values: Tensor, ranks: tuple[int, ...]) -> Tensor:
    """Sums of (G, R) over each task's columns: (G, T)."""
    if len(set(ranks)) == 1:
        return values.reshape(values.shape[0], len(ranks), ranks[0]).sum(-1)
    return torch.stack([values[:, sl].sum(-1) for sl in _rank_slices(ranks)], dim=1)


def _residuals(
    left: _Bases, right: _Bases, UtB: Tensor, AV: Tensor, ranks: tuple[int, ...], sample: int = 256
) -> list[float]:
    """:func:`worker.engine.spaces.projection_residual` of every module, one host transfer."""
    B_stack, A_stack = left.x, right.x.mT  # (G, m, R), (G, R, n)
    rows = _spread(B_stack.shape[1], sample, B_stack.device)
    cols = _spread(A_stack.shape[2], sample, A_stack.device)
    B_s, A_s = B_stack[:, rows], A_stack[:, :, cols]
    rb = (B_s - left.rows(rows) @ UtB).norm(dim=-2) ** 2  # per column of each B_stack
    ra = (A_s - AV @ right.rows(cols).mT).norm(dim=-1) ** 2  # per row of each A_stack
    nb, na = B_s.norm(dim=-2) ** 2, A_s.norm(dim=-1) ** 2
    sums = torch.stack([_per_task(v, ranks) for v in (rb, nb, ra, na)], dim=-1)
    worst = []
    for module in sums.double().tolist():  # (T, 4) per module
        w = 0.0
        for res_b, norm_b, res_a, norm_a in module:
            for res, norm in ((res_b, norm_b), (res_a, norm_a)):
                if norm > 0:
                    w = max(w, (res / norm) ** 0.5)
        worst.append(w)
    return worst


# ----------------------------------------------------------------------------- entry points


def merge_group_in_core_space(
    modules: Sequence[FactorStack | Sequence[LoraFactors]],
    method: str,
    params: Mapping[str, Any],
    rank: int | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    *,
    eigh_device: torch.device | str | None = None,
) -> list[MergedModule]:
    """:func:`merge_in_core_space` for every module of a group that shares m, n and ranks.

    ``generators``: one per module, used exactly as the unbatched merge of that module uses
    it (DARE draws its masks from it on the CPU); None, or a None entry, means a fresh
    seed-0 generator, as there. ``eigh_device``: where the float64 R × R eigendecompositions
    of the Gram matrices run (default: beside the factors). Returns one ``MergedModule`` per
    module, in order, with its kept energy and self-check residual, whose B and A are views
    of the group's batched results. Raises ``ValueError`` when the modules do not share
    shapes, ranks, dtype and device.
    """
    stacks = [FactorStack.of(s) for s in modules]
    if not stacks:
        return []
    _check_group(stacks)
    gens = _generators(generators, len(stacks))
    if takes_stacked_sum(method, params, rank, stacks[0]):  # nothing to decompose
        return [stacked_sum(s, params) for s in stacks]
    device = None if eigh_device is None else torch.device(eigh_device)
    ranks = stacks[0].ranks
    left = _basis(_stacked([s.B for s in stacks]), device)
    right = _basis(_stacked([s.A for s in stacks]).mT, device)
    UtB, AV = left.coords, right.coords.mT
    params = {**params, LAYER_K: min(stacks[0].B.shape[0], stacks[0].A.shape[1])}
    M, alphas = _merge(method, _Core(UtB, AV, ranks), params, gens)
    B, A, kept = _lora_pairs(left, right, M, rank)
    residuals = _residuals(left, right, UtB, AV, ranks)
    return [
        MergedModule(
            B=B[g],
            A=A[g],
            kept_energy=None if kept is None else kept[g],
            residual=residuals[g],
            alpha=alphas[g],
        )
        for g in range(len(stacks))
    ]


def merge_stacks_in_core_space(
    modules: Sequence[FactorStack | Sequence[LoraFactors]],
    method: str,
    params: Mapping[str, Any],
    rank: int | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    *,
    max_group: int | None = None,
    eigh_device: torch.device | str | None = None,
) -> list[MergedModule]:
    """Merge modules of any shapes: grouped by :func:`shape_groups`, each group batched.

    The results come back in the order of ``modules``, each exactly what
    :func:`merge_in_core_space` gives for it (``generators``: one per module, as there).
    ``max_group`` caps a group's size: device memory holds a group's stacks, bases and results
    at once, about three times its factors.
    """
    stacks = [FactorStack.of(m) for m in modules]
    gens = _generators(generators, len(stacks))
    out: list[MergedModule | None] = [None] * len(stacks)
    for members in shape_groups(stacks, max_group):
        merged = merge_group_in_core_space(
            [stacks[i] for i in members],
            method,
            params,
            rank,
            [gens[i] for i in members],
            eigh_device=eigh_device,
        )
        for i, result in zip(members, merged, strict=True):
            out[i] = result
    return out  # type: ignore[return-value]
