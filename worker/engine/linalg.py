"""Small linear-algebra building blocks of the engine, on thin factors, for G modules at once.

Every SVD the engine needs is of a matrix that is either tall and skinny (a stacked factor,
m × R with R ≪ m) or a product of two thin factors (B A with inner size k). Both reduce to
a QR of the thin factors, or an eigendecomposition of their Gram matrix, and the SVD of a
small square matrix: the same singular values and vectors as a generic SVD (up to the sign
of each pair), at a fraction of the cost.

Every function takes a leading batch dimension (G modules of one shape: torch's SVD, QR,
eigh and ``@`` broadcast over it), so one module is the batch of one and the GPU merges a
layer's modules of one kind in one call per step (``worker.engine.batched``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .ledger import F32, F64, Ledger

__all__ = [
    "MAX_F32_GRAM_CONDITION",
    "MAX_GRAM_CONDITION",
    "Basis",
    "NonFiniteError",
    "factored_svd",
    "flat_spectrum",
    "isotropize",
    "left_singular_basis",
    "numerical_ranks",
    "polar",
    "svd",
    "truncate",
]

# Each step's cost (``worker.engine.ledger``) follows it, named ``<step>_cost``: it replays the
# step's allocations for G matrices of the given shape, float32 unless it says otherwise.


#: The Gram route to a basis (below) is taken only for stacks at most this ill-conditioned,
#: with the Gram matrix in float64: U = x V S⁻¹ is then orthonormal to about 4e-6.
MAX_GRAM_CONDITION = 32.0
#: Up to this condition number the Gram matrix is formed in float32 (three times faster on a
#: CPU): its rounding error grows as cond², and at 4 U is still orthonormal to about 4e-6,
#: as good as the float64 Gram at 32 or a float32 Householder QR (tests/engine/test_bases.py).
MAX_F32_GRAM_CONDITION = 4.0


class NonFiniteError(ArithmeticError):
    """A matrix to decompose holds NaN or ±inf: the merge's own arithmetic overflowed float32
    (huge weights, alpha or scalings), since the inputs are checked finite as they are read."""


def svd(x: Tensor, full_matrices: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Economy SVD ``torch.linalg.svd(x, full_matrices=False)`` (or the full one), refusing NaN
    and ±inf first; for a batch, when any of its matrices has them.

    LAPACK given a non-finite matrix either fails ("failed to converge", after printing its
    own error lines) or returns garbage; :class:`NonFiniteError` says what happened instead.
    The check is one pass over x (an SVD costs min(m, n) passes): its sum, and the exact
    test only when the sum is not finite (finite values near float32's limit can overflow it).
    """
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"a {tuple(x.shape)} matrix to decompose has NaN or infinite values")
    return torch.linalg.svd(x, full_matrices=full_matrices)


def svd_cost(L: Ledger, G: int, p: int, q: int) -> int:
    """:func:`svd` of G p × q matrices, economy: U, S and Vh stay allocated (returned).
    LAPACK works on a copy of x; gesdd's workspace measures 3.5–7 k² for a square matrix and
    about 2 p q for a tall one (k = min(p, q)), hence max(4 k², 2 p q), one matrix at a time."""
    k = min(p, q)
    out = L.alloc(F32 * G * (p * k + k + k * q))
    L.spike(F32 * (G * p * q + max(4 * k * k, 2 * p * q)))
    return out


def qr_cost(L: Ledger, G: int, p: int, q: int) -> int:
    """``torch.linalg.qr`` of G p × q matrices, reduced: Q and R stay allocated (returned).
    The Householder factorisation works in Q's buffer; its workspace measures about 0.6 p q."""
    c = min(p, q)
    out = L.alloc(F32 * G * (p * c + c * q))
    L.spike(F32 * (3 * p * q) // 5)
    return out


def eigh_cost(L: Ledger, G: int, N: int) -> int:
    """``torch.linalg.eigh`` of G N × N float64 matrices: eigenvectors and eigenvalues stay
    allocated (returned); the divide-and-conquer workspace measures about 3 N² doubles."""
    out = L.alloc(F64 * G * (N * N + N))
    L.spike(F64 * 3 * N * N)
    return out


@dataclass(frozen=True)
class Basis:
    """Orthonormal columns U (G × m × k) spanning tall stacked factors (G × m × R), and the
    coordinates Uᵀ x of the stacks (G × k × R).

    U is kept as ``base @ K`` with a small K (G × c × k), or as ``base`` itself (K None):

    - the Gram route: ``base`` is the stack, untouched (``on_the_stack``), and K = V S⁻¹; U @ M
      is then stack @ (K M), one product with the tall factor, and U is never formed;
    - the QR route: ``base`` is the QR's Q and K the small Ur, or, when the stack could be
      overwritten, U itself, formed in the stack's own memory.

    ``owned``: ``base`` may be overwritten (a Q of our own, or a stack the caller gave up),
    which :meth:`consume` and :meth:`transposed` use to write the merged factor over it
    instead of allocating another tall matrix. ``routes`` says, per module, how it was found:
    ``"gram32"``, ``"gram64"`` or ``"qr"`` (:func:`left_singular_basis`).
    """

    base: Tensor
    coords: Tensor
    K: Tensor | None = None
    on_the_stack: bool = False
    owned: bool = False
    routes: tuple[str, ...] = ()

    def apply(self, M: Tensor) -> Tensor:
        """U @ M."""
        return self.base @ (M if self.K is None else self.K @ M)

    def apply_t(self, M: Tensor) -> Tensor:
        """M @ Uᵀ."""
        return (M if self.K is None else M @ self.K.mT) @ self.base.mT

    def rows(self, index: Tensor) -> Tensor:
        """U[:, index]: the rows ``index`` of every module's U."""
        rows = self.base[:, index]
        return rows if self.K is None else rows @ self.K

    @property
    def matrix(self) -> Tensor:
        return self.base if self.K is None else self.base @ self.K

    def consume(self, M: Tensor) -> Tensor:
        """U @ M for a square M (G × k × k), written over ``base`` when the basis owns it (a
        block of rows at a time: no second tall matrix), which spends the basis."""
        if not self.owned:
            return self.apply(M)
        return times_in_place(self.base, M if self.K is None else self.K @ M)

    def transposed(self) -> Tensor:
        """Uᵀ (G × k × m), contiguous: the merged adapter's A when U is V_ref. An owned base
        is column-major (a Q, or a stack of rows Aᵀ), so U formed over it is Uᵀ row-major as
        it lies; this spends the basis."""
        if not self.owned:
            return self.base.mT.contiguous() if self.K is None else self.K.mT @ self.base.mT
        U = self.base if self.K is None else times_in_place(self.base, self.K)
        return U.mT.contiguous()


def times_in_place(base: Tensor, K: Tensor) -> Tensor:
    """base ← base @ K (K square, G × c × c), a block of rows at a time; returns base. The
    product of a tall matrix without a second one: the temporaries are one block's size."""
    for start in range(0, base.shape[-2], BLOCK_ROWS):
        block = base[:, start : start + BLOCK_ROWS]
        block.copy_(block @ K)
    return base


def times_in_place_cost(L: Ledger, G: int, c: int) -> None:
    L.spike(F32 * G * BLOCK_ROWS * c)


#: Rows of a tall matrix handled at a time by the in-place products and the blocked QR.
BLOCK_ROWS = 4096


def _qr_in_place(x: Tensor) -> Tensor:
    """The Q of x's QR (G × m × R, m ≥ R) written over x, a block of rows at a time; returns R.

    A tall-skinny QR (TSQR): each block of rows x_i = Q_i R_i, then the stacked R_i = Q' R,
    and Q's block i is Q_i Q'_i. Only one block's Q_i and the stacked R_i are allocated
    besides x. Householder throughout, so as stable as one QR of the whole.
    """
    m, R = x.shape[-2:]
    starts = list(range(0, m, max(BLOCK_ROWS, R)))
    if len(starts) == 1:  # one block: LAPACK's own QR, copied back
        Q, Rx = torch.linalg.qr(x, mode="reduced")
        x.copy_(Q)
        return Rx
    tops = []
    for start in starts:
        block = x[:, start : start + max(BLOCK_ROWS, R)]
        Q_i, R_i = torch.linalg.qr(block, mode="reduced")
        block[:, :, : Q_i.shape[-1]].copy_(Q_i)
        tops.append(R_i)
        del Q_i
    Q_top, Rx = torch.linalg.qr(torch.cat(tops, dim=-2), mode="reduced")
    row = 0
    for start, R_i in zip(starts, tops, strict=True):
        block = x[:, start : start + max(BLOCK_ROWS, R)]
        k = R_i.shape[-2]
        block.copy_(block[:, :, :k] @ Q_top[:, row : row + k])
        row += k
    return Rx


def _take(t: Tensor, index: Sequence[int]) -> Tensor:
    """``t[index]`` along the batch dimension, without a copy when ``index`` is everything."""
    if list(index) == list(range(t.shape[0])):
        return t
    return t[torch.tensor(list(index), device=t.device)]


def _descending_eigh(gram: Tensor, device: torch.device | None) -> tuple[Tensor, Tensor]:
    """Float64 eigendecomposition of each Gram matrix, largest eigenvalue first (as an SVD
    orders them). ``device`` moves the small matrices first: cuSOLVER decomposes R > 32
    matrices one call at a time, so on some GPUs the host's LAPACK is as fast and saves the
    separate round trip that the conditioning test needs anyway."""
    gram = gram.double()
    if device is not None:
        gram = gram.to(device)
    eigenvalues, V = torch.linalg.eigh(gram)
    return eigenvalues.flip(-1), V.flip(-1)


def _conditioned(eigenvalues: Tensor, condition: float) -> list[bool]:
    """Per module: cond(x)² = λ_max / λ_min of its Gram matrix is ≤ condition², all finite,
    λ_min > 0."""
    top, bottom = eigenvalues[:, 0], eigenvalues[:, -1]
    return (torch.isfinite(top) & (bottom > 0) & (top <= bottom * condition**2)).tolist()


def _gram_routes(x: Tensor, device: torch.device | None) -> tuple[list[str], dict]:
    """Each module's route and, for the Gram routes, its Gram matrix's eigenpairs (by module,
    or under ``"all"`` as the batched tensors when every module took the float32 route).

    The Gram matrix costs accuracy in proportion to cond(x)² and U = x V S⁻¹ about
    cond(x)·eps, so it is formed in float32 when cond(x) ≤ ``MAX_F32_GRAM_CONDITION``, again
    in float64 when cond(x) ≤ ``MAX_GRAM_CONDITION`` (or the float32 one overflowed), and the
    module takes the QR route otherwise (the float32 Gram's eigenvalues are good enough to
    tell which: their error is ~1e-7 of the largest). Whatever the Gram's rounding,
    x = U (S Vᵀ) holds to float32 accuracy; only U's orthonormality depends on it.
    """
    G = x.shape[0]
    routes, eig = ["qr"] * G, {}
    if x.shape[-2] < x.shape[-1]:  # wide: no full column rank, so no Gram route
        return routes, eig
    gram = x.mT @ x
    finite = torch.isfinite(gram).flatten(1).all(1).tolist()
    first = [g for g in range(G) if finite[g]]
    retry = [g for g in range(G) if not finite[g]]
    if first:
        values, vectors = _descending_eigh(_take(gram, first), device)
        good = _conditioned(values, MAX_F32_GRAM_CONDITION)
        if len(first) == G and all(good):  # the common case: every module, one batch
            return ["gram32"] * G, {"all": (values, vectors)}
        near = _conditioned(values, 1.01 * MAX_GRAM_CONDITION)  # 1%: the estimate's margin
        for i, g in enumerate(first):
            if good[i]:
                routes[g], eig[g] = "gram32", (values[i], vectors[i])
            elif near[i]:
                retry.append(g)
    del gram
    if retry:
        retry.sort()
        values, vectors = _descending_eigh(_gram64(_take(x, retry)), device)
        good = _conditioned(values, MAX_GRAM_CONDITION)
        for i, g in enumerate(retry):
            if good[i]:
                routes[g], eig[g] = "gram64", (values[i], vectors[i])
    return routes, eig


def _gram64(x: Tensor) -> Tensor:
    """xᵀx in float64, a block of rows at a time: no float64 copy of the tall x."""
    gram = torch.zeros(x.shape[0], x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[-2], BLOCK_ROWS):
        block = x[:, start : start + BLOCK_ROWS].double()
        gram += block.mT @ block
    return gram


def left_singular_basis(
    x: Tensor, eigh_device: torch.device | None = None, *, overwrite: bool = False
) -> Basis:
    """Left singular vectors U of each x (G × m × R) and the coordinates Uᵀ x.

    Two routes, chosen per module by :func:`_gram_routes`: from the eigendecomposition of the
    Gram matrix xᵀx = V S² Vᵀ, U = x V S⁻¹ (kept as x K, K = V S⁻¹) and Uᵀ x = S Vᵀ; or
    from x's QR and the SVD of its R factor, x = Q R, R = Ur S Vh, U = Q Ur and Uᵀ x = Urᵀ R.
    The Gram route is several times faster on a tall factor (and batches well on CUDA, where
    a Householder QR runs one matrix per call); rank-deficient, ill-conditioned and wide
    stacks take the QR, whose coordinates Urᵀ R are accurate column by column in float32
    (a zero column of x gives an exactly zero column). ``overwrite``: the caller gives x up,
    and the QR route forms U in x's own memory (a blocked QR) instead of allocating Q.
    """
    routes, eig = _gram_routes(x, eigh_device)
    by_gram = [g for g, route in enumerate(routes) if route != "qr"]
    by_qr = [g for g, route in enumerate(routes) if route == "qr"]
    if by_gram:
        if "all" in eig:  # every module's eigenpairs from one batched call, in order
            S, V = eig["all"]
            S = S.sqrt()
        else:
            S = torch.stack([eig[g][0] for g in by_gram]).sqrt()
            V = torch.stack([eig[g][1] for g in by_gram])
        K_gram = (V / S[:, None, :]).to(device=x.device, dtype=x.dtype)
        gram_coords = (S[:, :, None] * V.mT).to(device=x.device, dtype=x.dtype)
        del S, V
        if not by_qr:
            return Basis(x, gram_coords, K_gram, on_the_stack=True, owned=overwrite,
                         routes=tuple(routes))  # fmt: skip
    m, R = x.shape[-2:]
    if overwrite and m >= R:
        return _qr_basis_in_place(x, by_gram, by_qr, routes, None if not by_gram else K_gram,
                                  None if not by_gram else gram_coords)  # fmt: skip
    Q, Rx = torch.linalg.qr(_take(x, by_qr), mode="reduced")
    Ur = svd(Rx)[0]
    qr_coords = Ur.mT @ Rx
    if not by_gram:
        return Basis(Q, qr_coords, Ur, owned=True, routes=tuple(routes))
    # Both routes in one group (rare: the stacks' conditioning straddles a threshold). Only
    # possible when R ≤ m (a Gram route needs full column rank), so every K is R × R: one
    # base holds each module's stack or Q.
    gram_index = torch.tensor(by_gram, device=x.device)
    qr_index = torch.tensor(by_qr, device=x.device)
    base, K = torch.empty_like(x), torch.empty_like(x[:, :R])
    base[gram_index], base[qr_index] = x[gram_index], Q
    K[gram_index], K[qr_index] = K_gram, Ur
    coords = torch.empty_like(K)
    coords[gram_index], coords[qr_index] = gram_coords, qr_coords
    return Basis(base, coords, K, owned=True, routes=tuple(routes))


def _qr_basis_in_place(
    x: Tensor,
    by_gram: list[int],
    by_qr: list[int],
    routes: list[str],
    K_gram: Tensor | None,
    gram_coords: Tensor | None,
) -> Basis:
    """The QR route with U formed over the stacks of ``by_qr`` (x = Q R in place, then
    U = Q Ur in place); a Gram module of the same group keeps its stack and K (its K for the
    others is the identity)."""
    qr_x = _take(x, by_qr)
    Rx = _qr_in_place(qr_x)
    Ur = svd(Rx)[0]
    times_in_place(qr_x, Ur)
    qr_coords = Ur.mT @ Rx
    if not by_gram:
        return Basis(x, qr_coords, None, owned=True, routes=tuple(routes))
    R = x.shape[-1]
    qr_index = torch.tensor(by_qr, device=x.device)
    gram_index = torch.tensor(by_gram, device=x.device)
    x[qr_index] = qr_x  # _take copied them: put U back in place
    K = torch.eye(R, dtype=x.dtype, device=x.device).repeat(x.shape[0], 1, 1)
    K[gram_index] = K_gram
    coords = torch.empty_like(K)
    coords[gram_index], coords[qr_index] = gram_coords, qr_coords
    return Basis(x, coords, K, owned=True, routes=tuple(routes))


def left_singular_basis_cost(L: Ledger, G: int, m: int, R: int, *, overwrite: bool) -> int:
    """:func:`left_singular_basis` of G m × R stacks: leaves the basis and the coordinates
    allocated (returned). The route depends on the values, so the costliest is assumed."""
    c = min(m, R)

    def gram_f32(fork: Ledger) -> None:  # the float32 Gram, eigendecomposed in float64
        gram = fork.alloc(F32 * G * R * R)
        double = fork.alloc(F64 * G * R * R)
        vectors = eigh_cost(fork, G, R)
        flipped = fork.alloc(F64 * G * (R * R + R))
        fork.free(vectors, double, gram)
        stacked = fork.alloc(F64 * G * (R * R + R))  # the eigenpairs stacked by module
        fork.spike(F64 * G * R * R)  # V / S and S Vᵀ, each before its float32 copy
        fork.alloc(F32 * 2 * G * R * R)  # K and the coordinates S Vᵀ, kept
        fork.free(flipped, stacked)

    def gram_f64(fork: Ledger) -> None:  # the float32 Gram's route failed: again in float64
        gram = fork.alloc(F32 * G * R * R)
        first = eigh_cost(fork, G, R) + fork.alloc(F64 * G * R * R)  # and its double copy
        fork.free(first, gram)
        gram64 = fork.alloc(F64 * G * R * R)
        fork.spike(F64 * G * min(m, BLOCK_ROWS) * R * 2)  # a block in float64, its product
        vectors = eigh_cost(fork, G, R)
        flipped = fork.alloc(F64 * G * (R * R + R))
        fork.free(vectors, gram64)
        stacked = fork.alloc(F64 * G * (R * R + R))
        fork.spike(F64 * G * R * R)
        fork.alloc(F32 * 2 * G * R * R)
        fork.free(flipped, stacked)

    def qr(fork: Ledger) -> None:  # the Householder QR, then the SVD of its R factor
        if overwrite and m >= R:  # blocked, over the stack: one block's Q and the R's
            blocks = -(-m // max(BLOCK_ROWS, R))
            tops = fork.alloc(F32 * G * blocks * R * R)
            qr_cost(fork, G, min(m, max(BLOCK_ROWS, R)), R)
            fork.free(F32 * G * (min(m, max(BLOCK_ROWS, R)) * R + R * R))
            fork.alloc(F32 * G * R * R)  # the R of the stacked R's, kept
            qr_cost(fork, G, blocks * R, R)
            fork.free(tops)
        else:
            qr_cost(fork, G, m, R)  # Q is kept as the base, R until the basis dies
        svd_cost(fork, G, c, R)  # Ur kept as K
        times_in_place_cost(fork, G, c)
        fork.alloc(F32 * G * c * R)  # the coordinates Urᵀ Rx, kept

    before = L.now
    if m < R:
        qr(L)
    else:
        L.worst(gram_f32, gram_f64, qr)
    return L.now - before


def factored_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Economy SVD of the products ``B @ A`` (… × m × k times … × k × n) without forming them.

    B = Qb Rb, Aᵀ = Qa Ra, so B A = Qb (Rb Raᵀ) Qaᵀ and only the k × k middle is decomposed.
    Returns U (… × m × k'), S (… × k'), Vh (… × k' × n), k' = min(m, n, k).
    """
    Qb, Rb = torch.linalg.qr(B, mode="reduced")
    Qa, Ra = torch.linalg.qr(A.mT, mode="reduced")
    Us, S, Vhs = svd(Rb @ Ra.mT)
    return Qb @ Us, S, Vhs @ Qa.mT


def factored_svd_cost(L: Ledger, G: int, m: int, k: int, n: int) -> int:
    """:func:`factored_svd` of G products (m × k)(k × n): U, S and Vh stay allocated."""
    c = min(m, k, n)
    qb, qa = qr_cost(L, G, m, k), qr_cost(L, G, n, k)
    middle = L.alloc(F32 * G * min(m, k) * min(n, k))
    small = svd_cost(L, G, min(m, k), min(n, k))
    out = L.alloc(F32 * G * (m * c + c + c * n))
    L.free(qb, qa, middle, small)
    return out


def numerical_ranks(S: Tensor, shape: tuple[int, int]) -> Tensor:
    """Per matrix, the number of singular values S (…, k) above ``max(S) · max(shape) · eps``
    (LAPACK's usual tolerance); ``shape`` is one matrix's."""
    if S.shape[-1] == 0:
        return torch.zeros(S.shape[:-1], dtype=torch.long, device=S.device)
    tol = S.amax(-1, keepdim=True) * max(shape) * torch.finfo(S.dtype).eps
    return (tol < S).sum(-1)


def truncate(
    U: Tensor, S: Tensor, Vh: Tensor, k: int, *, flatten: bool = False
) -> tuple[Tensor, Tensor, list[float]]:
    """Best rank-k approximation of each ``U diag(S) Vh`` as a LoRA pair (B, A) and its kept
    energy Σ_{i<k} S_i² / Σ S_i² per matrix (1.0 for an all-zero matrix). ``flatten``: the k
    kept singular values are then made their mean, over those that are not zero (an
    isotropic cut: ``methods.rank_mode``)."""
    k = min(k, S.shape[-1])
    energy = S.double() ** 2
    totals, kept = energy.sum(-1).flatten().tolist(), energy[..., :k].sum(-1).flatten().tolist()
    fractions = [
        part / whole if whole > 0 else 1.0 for part, whole in zip(kept, totals, strict=True)
    ]
    S_k = S[..., :k]
    if flatten:
        S_k = flat_spectrum(S_k, (U.shape[-2], Vh.shape[-1]))
    return U[..., :k] * S_k[..., None, :], Vh[..., :k, :], fractions


def flat_spectrum(S: Tensor, shape: tuple[int, int]) -> Tensor:
    """Singular values S (…, k) made their mean over the nonzero ones (above the numerical
    rank's tolerance); zero ones stay zero, so a merge of rank below k keeps its rank."""
    tol = S.amax(-1, keepdim=True) * max(shape) * torch.finfo(S.dtype).eps
    nonzero = tol < S
    mean = (S * nonzero).sum(-1, keepdim=True) / nonzero.sum(-1, keepdim=True).clamp(min=1)
    return mean * nonzero


def polar(x: Tensor) -> Tensor:
    """Orthogonal polar factor of each x: with x = P Σ Qᵀ, P Qᵀ (the nearest semi-orthogonal)."""
    P, _, Qh = svd(x)
    return P @ Qh


def polar_cost(L: Ledger, G: int, p: int, q: int) -> int:
    factors = svd_cost(L, G, p, q)
    out = L.alloc(F32 * G * p * q)
    L.free(factors)
    return out


def isotropize(x: Tensor) -> Tensor:
    """Replace every singular value of each x (all min(m, n) of them) by their mean (Iso-C)."""
    U, S, Vh = svd(x)
    return (U * S.mean(-1)[..., None, None]) @ Vh


def isotropize_cost(L: Ledger, G: int, p: int, q: int) -> int:
    """U · mean(S) · Vh of G p × q matrices: their SVDs, U scaled, the product (returned)."""
    factors = svd_cost(L, G, p, q)
    scaled = L.alloc(F32 * G * p * min(p, q))
    out = L.alloc(F32 * G * p * q)
    L.free(factors, scaled)
    return out
