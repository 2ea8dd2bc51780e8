"""How much memory a merge will need, from shapes alone, and how much this process may use.

A merge's memory is set by shapes the adapters declare, not by their size on disk: a 320 KB
VeRA adapter saved without its projections can declare a rank that makes the worker
regenerate gigabytes of them, and a 200 KB LoRA adapter on wide layers makes a full-space
merge form dense m × n matrices of gigabytes. So the plan (``worker.plan``) estimates the
job's PEAK working memory from the configs and headers, before any tensor is read, and
refuses the job above a limit (``COREMERGE_MAX_WORK_BYTES``, by default
:func:`default_max_work_bytes`) instead of letting the kernel's OOM killer end it, or its
neighbours, midway.

How: each module's merge is replayed on a ledger of allocations (:class:`_Ledger`), step by
step as ``worker.runner`` and ``worker.engine`` run it: every tensor a step creates is
allocated, every one it drops is freed, and LAPACK's copies and workspaces are added as
measured for torch's CPU build (``_svd``, ``_qr``, ``_eigh``). Where the engine picks a
route from the values (the Gram or the QR route to a basis), the costlier is assumed. The
job's peak is then that of its largest modules merged side by side (``worker.pipeline``),
plus finished modules waiting to be written, plus what the inputs hold for the whole merge
(mapped file pages, regenerated VeRA projections, the look-ahead window of an S3 input read
as the merge goes: ``AdapterSource.held_bytes``), plus a fixed overhead.
``tests/worker/test_memory_estimate.py`` holds the estimate within 2× of the peak RSS
measured in a subprocess, in every space. The numbers are bytes on the merge device; the
default limit is taken from host memory.

Torch-free: the estimate needs only shapes, and ``worker.job`` reads the limit before
importing anything heavy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.errors import LimitExceeded

__all__ = [
    "DTYPE_BYTES",
    "ModuleShape",
    "WorkEstimate",
    "check_work",
    "default_max_work_bytes",
    "estimate_work",
    "format_bytes",
    "memory_limit",
    "merged_rank_bound",
    "module_work",
]

F32 = 4
F64 = 8
#: Bytes per value of each ``output.dtype``.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: What a merge costs besides its tensors: threads and their stacks, allocator arenas, the
#: safetensors handles and the writer's queue (a tiny merge measures about 14 MiB).
FIXED_OVERHEAD = 16 << 20
#: Merged modules held besides those being merged: the one being written and those whose
#: bytes are still in the writer's queue (``worker.adapters.writer.MAX_IN_FLIGHT`` tensors).
WAITING_MODULES = 2
#: Share of the process's memory limit that the default work limit allows: the rest is for
#: the interpreter, torch and the libraries (about 250 MiB), and the page cache.
DEFAULT_LIMIT_SHARE = 0.8
#: A cgroup v1 limit of this or more means "no limit" (the kernel's value is 2**63 − 4096).
_NO_LIMIT = 1 << 60


# -- the process's memory limit


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _read_limit(path: Path) -> int | None:
    """A cgroup memory limit file's value in bytes; None when absent, unreadable or unlimited."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < _NO_LIMIT else None


def _cgroup_paths(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and cgroup v1 memory controller path, from /proc."""
    v2 = v1 = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _limits_up(base: Path, path: str | None, name: str) -> Iterable[int]:
    """The limits in ``name`` from this cgroup's folder up to ``base``: the tightest counts.
    Inside a container with its own cgroup namespace the folder is ``base`` itself."""
    folder = base / (path or "/").lstrip("/")
    seen = set()
    while True:
        if folder not in seen:
            seen.add(folder)
            limit = _read_limit(folder / name)
            if limit is not None:
                yield limit
        if folder == base or base not in folder.parents:
            break
        folder = folder.parent
    if base not in seen:
        limit = _read_limit(base / name)
        if limit is not None:
            yield limit


def memory_limit(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int:
    """The memory this process may use: its cgroup's limit (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``) when one is set, else the machine's physical memory."""
    v2, v1 = _cgroup_paths(proc_cgroup)
    limits = [
        *_limits_up(cgroup_root, v2, "memory.max"),
        *_limits_up(cgroup_root / "memory", v1, "memory.limit_in_bytes"),
    ]
    physical = _physical_memory()
    return min([physical, *limits])


def default_max_work_bytes(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int:
    """The work limit used when ``COREMERGE_MAX_WORK_BYTES`` is unset: 80 % of
    :func:`memory_limit`, so that a job refused here is one the kernel would have killed."""
    return int(DEFAULT_LIMIT_SHARE * memory_limit(cgroup_root, proc_cgroup))


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units, e.g. ``3.2 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# -- the ledger and LAPACK's costs


class _Ledger:
    """Bytes allocated now and the most ever allocated at once."""

    def __init__(self, now: int = 0) -> None:
        self.now = now
        self.peak = now

    def alloc(self, nbytes: int) -> int:
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        return nbytes

    def free(self, *nbytes: int) -> None:
        self.now -= sum(nbytes)

    def spike(self, nbytes: int) -> None:
        """A temporary: allocated and freed within one step."""
        self.peak = max(self.peak, self.now + nbytes)

    def worst(self, *routes: Callable[[_Ledger], None]) -> None:
        """Run alternative routes from the present state and keep the costliest of each:
        the highest peak and the most left allocated (which route runs depends on values)."""
        forks = [_Ledger(self.now) for _ in routes]
        for route, fork in zip(routes, forks, strict=True):
            route(fork)
        self.peak = max(self.peak, *(f.peak for f in forks))
        self.now = max(f.now for f in forks)
        self.peak = max(self.peak, self.now)


def _svd(L: _Ledger, p: int, q: int) -> int:
    """``svd(x)`` of a p × q float32 matrix, economy: U, S and Vh stay allocated (returned).
    LAPACK works on a copy of x; gesdd's workspace measures 3.5–7 k² for a square matrix and
    about 2 p q for a tall one (k = min(p, q)), hence max(4 k², 2 p q)."""
    k = min(p, q)
    out = L.alloc(F32 * (p * k + k + k * q))
    L.spike(F32 * (p * q + max(4 * k * k, 2 * p * q)))
    return out


def _qr(L: _Ledger, p: int, q: int) -> int:
    """``qr(x)`` of a p × q float32 matrix, reduced: Q and R stay allocated (returned). The
    Householder factorisation works in Q's buffer; its workspace measures about 0.6 p q."""
    c = min(p, q)
    out = L.alloc(F32 * (p * c + c * q))
    L.spike(F32 * (3 * p * q) // 5)
    return out


def _eigh(L: _Ledger, N: int) -> int:
    """``eigh`` of an N × N float64 matrix: eigenvectors and eigenvalues stay allocated
    (returned); the divide-and-conquer workspace measures about 3 N² doubles."""
    out = L.alloc(F64 * (N * N + N))
    L.spike(F64 * 3 * N * N)
    return out


# -- the merge methods (worker.engine.methods.apply_method) on T inputs of p × q


def _sum(L: _Ledger, T: int, X: int) -> int:
    """``torch.stack(xs).sum(0)``: the stacked copy, then the sum."""
    stacked = L.alloc(T * X)
    out = L.alloc(X)
    L.free(stacked)
    return out


def _ties(L: _Ledger, T: int, X: int, density: float) -> int:
    """TIES: the stacked inputs, trimmed in place a task at a time (one task's magnitudes,
    kthvalue's copy with its int64 indices and the mask), then the election: the column
    sums and elected sign, the running total and count, and one task's sign, mask and
    product at a time."""
    stacked = L.alloc(T * X)
    if density < 1:
        L.spike(X + 3 * X + X // 4)
    sign = L.alloc(2 * X)  # the column sums and the elected sign
    running = L.alloc(2 * X)  # total and count
    L.spike(X + X // 4 + X)  # sign(row), agree, row * agree
    out = L.alloc(X)
    L.free(sign, running, stacked)
    return out


def _drop(L: _Ledger, T: int, X: int, drop: float) -> int:
    """DARE's drop and rescale: one new matrix per task (none when ``drop`` is 0)."""
    if drop == 0:
        return 0
    dropped = 0
    for _ in range(T):
        L.spike(X + X // 4 + X)  # the uniform draws (freed once compared), the mask, x * keep
        dropped += L.alloc(X)
    return dropped


def _isotropize(L: _Ledger, p: int, q: int) -> int:
    """U · mean(S) · Vh of a p × q matrix: its SVD, U scaled, the product."""
    k = min(p, q)
    factors = _svd(L, p, q)
    scaled = L.alloc(F32 * p * k)
    out = L.alloc(F32 * p * q)
    L.free(factors, scaled)
    return out


def _polar(L: _Ledger, p: int, q: int) -> int:
    factors = _svd(L, p, q)
    out = L.alloc(F32 * p * q)
    L.free(factors)
    return out


def _tsv(L: _Ledger, T: int, p: int, q: int, ranks: Sequence[int] | None) -> int:
    """TSV-M. With ``ranks`` (core space) each task's SVD comes from its thin factors and the
    kept singular vectors are slices of a × r_t and r_t × b matrices; without them each task
    has a dense SVD whose full U and Vh stay alive behind the kept slices."""
    K = min(p, q)
    held = 0
    if ranks is None:
        for _ in range(T):
            held += _svd(L, p, q)
    else:
        for r in ranks:
            c = min(r, p, q)
            qb, qa = _qr(L, p, r), _qr(L, q, r)
            small = _svd(L, r, r)
            held += L.alloc(F32 * (p * c + c * q))  # Qb @ Us and Vhs @ Qaᵀ
            L.free(qb, qa, small)
    kept = min(K, sum(ranks) if ranks is not None else K)
    cat = L.alloc(F32 * (p * kept + kept * q))
    pu = _polar(L, p, kept)
    pv = _polar(L, kept, q)
    scaled = L.alloc(F32 * p * kept)
    out = L.alloc(F32 * p * q)
    L.free(held, cat, pu, pv, scaled)
    return out


def _cart(L: _Ledger, T: int, p: int, q: int, rank_fraction: float) -> int:
    X = F32 * p * q
    k = min(min(p, q), math.ceil(rank_fraction * min(p, q)))
    avg = _sum(L, T, X)
    total = L.alloc(X)
    previous = 0
    for _ in range(T):
        diff = L.alloc(X)
        factors = _svd(L, p, q)  # the previous task's factors are dropped only now
        L.free(diff, previous)
        previous = factors
        L.spike(F32 * p * k + X)  # U_k S_k and its product with Vh_k, added in place
    L.free(previous)
    scaled = L.alloc(X)
    out = L.alloc(X)
    L.free(avg, total, scaled)
    return out


def _method(
    L: _Ledger,
    method: str,
    params: Mapping[str, Any],
    T: int,
    p: int,
    q: int,
    ranks: Sequence[int] | None = None,
) -> int:
    """``apply_method`` on T inputs of p × q (allocated by the caller); returns the bytes of
    the merged X, left allocated. ``ranks``: the inputs' thin factors' ranks, in core space."""
    X = F32 * p * q
    if method == "ta":
        x = _sum(L, T, X)
    elif method == "ties":
        x = _ties(L, T, X, params.get("density", 1.0))
    elif method in ("dare", "dare_ties"):
        dropped = _drop(L, T, X, params.get("drop", 0.0))
        density = params.get("density", 1.0)
        x = _sum(L, T, X) if method == "dare" else _ties(L, T, X, density)
        L.free(dropped)
    elif method == "tsv":
        x = _tsv(L, T, p, q, ranks)
    elif method == "cart":
        x = _cart(L, T, p, q, params.get("rank_fraction", 1.0))
    elif method == "iso_c":
        summed = _sum(L, T, X)
        x = _isotropize(L, p, q)
        L.free(summed)
    else:
        raise ValueError(f"no memory model for method {method!r}")
    if params.get("isotropize", False):
        iso = _isotropize(L, p, q)
        L.free(x)
        x = iso
    scaled = L.alloc(X)  # alpha · X
    L.free(x)
    return scaled


# -- the spaces (worker.engine.spaces), on top of the stacked factors


def _basis(L: _Ledger, p: int, R: int) -> None:
    """``left_singular_basis`` of a p × R stack; leaves the basis and the coordinates
    allocated. The route depends on the values, so the costliest is assumed."""
    c = min(p, R)

    def gram_f32(fork: _Ledger) -> None:  # the float32 Gram, eigendecomposed in float64
        gram = fork.alloc(F32 * R * R)
        double = fork.alloc(F64 * R * R)
        vectors = _eigh(fork, R)
        fork.free(double)
        flipped = fork.alloc(F64 * (R * R + R))
        fork.free(vectors)
        fork.spike(F64 * R * R)  # V / S, before its float32 copy
        fork.alloc(F32 * 2 * R * R)  # K and the coordinates S Vᵀ, kept
        fork.free(gram, flipped)

    def gram_f64(fork: _Ledger) -> None:  # the float32 Gram's result kept while in float64
        gram = fork.alloc(F32 * R * R)
        first = fork.alloc(F64 * (R * R + R))
        double = fork.alloc(F64 * p * R)
        gram64 = fork.alloc(F64 * R * R)
        vectors = _eigh(fork, R)
        flipped = fork.alloc(F64 * (R * R + R))
        fork.free(vectors, gram64, double, first)
        fork.spike(F64 * R * R)
        fork.alloc(F32 * 2 * R * R)
        fork.free(gram, flipped)

    def qr(fork: _Ledger) -> None:  # the Householder QR, then the SVD of its R factor
        factors = _qr(fork, p, R)
        small = _svd(fork, c, R)
        fork.alloc(F32 * (p * c + c * R))  # U = Q Ur and Urᵀ Rx, kept
        fork.free(factors, small)

    L.worst(gram_f32, gram_f64, qr)


def _core(
    L: _Ledger, m: int, n: int, ranks: Sequence[int], method: str, params: Mapping[str, Any],
    rank: int | None,
) -> int:  # fmt: skip
    """``merge_in_core_space``; returns the merged factors' bytes, left allocated."""
    T, R = len(ranks), sum(ranks)
    a, b = min(m, R), min(n, R)
    before = L.now
    _basis(L, m, R)
    _basis(L, n, R)
    bases = L.now - before
    cores = L.alloc(F32 * T * a * b)  # the core matrices M_t, the method's inputs
    M = _method(L, method, params, T, a, b, ranks)
    L.free(cores)
    if rank is None and a == b:
        out = L.alloc(F32 * (m * b + b * n))  # B = U M, A = Vᵀ
    else:
        k = min(a, b) if rank is None else min(rank, a, b)
        small = _svd(L, a, b)
        thin = L.alloc(F32 * (a * k + k * b))
        out = L.alloc(F32 * (m * k + k * n))
        L.free(small, thin)
    L.spike(F32 * 4 * 256 * R)  # the self-check's samples of the stacks and their residuals
    L.free(M, bases)
    return out


def _dense_to_lora(L: _Ledger, m: int, n: int, rank: int | None) -> int:
    """SVD of a dense m × n update and its truncation: B = U_k S_k is new, A = Vh[:k] is a
    view that keeps the whole Vh alive; returns what stays allocated."""
    K = min(m, n)
    k = K if rank is None else min(rank, K)
    factors = _svd(L, m, n)
    B = L.alloc(F32 * m * k)
    L.free(factors)
    A = L.alloc(F32 * (K * n))
    return B + A


def _full(
    L: _Ledger, m: int, n: int, ranks: Sequence[int], method: str, params: Mapping[str, Any],
    rank: int | None,
) -> int:  # fmt: skip
    """``merge_in_full_space``: T dense updates, the method, the SVD of the result."""
    T = len(ranks)
    dense = L.alloc(F32 * T * m * n)
    dW = _method(L, method, params, T, m, n)
    L.free(dense)
    out = _dense_to_lora(L, m, n, rank)
    L.free(dW)
    return out


def _knots(
    L: _Ledger, m: int, n: int, ranks: Sequence[int], method: str, params: Mapping[str, Any],
    rank: int | None,
) -> int:  # fmt: skip
    """``merge_in_knots_space``: the factored SVD of [ΔW_1 … ΔW_T], the method on the T
    blocks V_t (k × n), then ΔW = U S X, dense only with ``isotropize``."""
    T, R = len(ranks), sum(ranks)
    c = min(m, R)
    k = min(c, sum(min(n, r) for r in ranks))  # singular values kept
    # knots_components
    qb = _qr(L, m, R)
    qa = sum(_qr(L, n, r) for r in ranks)
    middle = L.alloc(F32 * (R * R + c * R))  # block_diag of the R_tᵀ, and Rb times it
    small = _svd(L, c, R)
    kept = L.alloc(F32 * (c * k + k * R))
    blocks = L.alloc(F32 * T * k * n)
    U = L.alloc(F32 * m * k)
    L.free(qb, qa, middle, small, kept)
    # the method on the blocks, without isotropize
    X = _method(L, method, {**params, "isotropize": False}, T, k, n)
    B = L.alloc(F32 * m * k)  # U S
    if params.get("isotropize", False):
        dense = L.alloc(F32 * m * n)
        iso = _isotropize(L, m, n)
        L.free(dense)
        out = _dense_to_lora(L, m, n, rank)
        L.free(iso)
    else:  # factored_svd(B, X) and the truncation
        factors = _qr(L, m, k) + _qr(L, n, k)
        small = _svd(L, k, k)
        Uf, Vhf = L.alloc(F32 * m * k), L.alloc(F32 * k * n)
        L.free(factors, small)
        B_k = L.alloc(F32 * m * (k if rank is None else min(rank, k)))
        L.free(Uf)
        out = B_k + Vhf  # A = Vhf[:k] is a view
    L.free(blocks, U, X, B)
    return out


_SPACES = {"core": _core, "full": _full, "knots": _knots}


# -- one module, then the job


@dataclass(frozen=True)
class ModuleShape:
    """What the estimate needs of one planned module, all from the headers."""

    module: str
    out_features: int  # m
    in_features: int  # n
    ranks: tuple[int, ...]  # r_t of each adapter that has the module
    read_bytes: int  # the largest copy one input makes as it is read, before the stack


@dataclass(frozen=True)
class WorkEstimate:
    """A job's estimated peak working memory and where it comes from."""

    peak_bytes: int
    module: str | None  # the module whose merge needs the most
    module_bytes: int  # that module's own peak
    held_bytes: int  # kept for the whole merge by the inputs (mapped pages, VeRA projections,
    # streamed inputs' look-ahead windows)
    threads: int  # modules merged side by side


def module_work(
    shape: ModuleShape,
    *,
    space: str,
    method: str,
    params: Mapping[str, Any],
    rank: int | None,
    output_rank: int | None,
    dtype_bytes: int,
) -> tuple[int, int]:
    """(peak bytes while ``shape`` is read, merged and written; bytes of its merged factors,
    held until written). ``rank`` is ``output.rank``; ``output_rank`` the written rank (None:
    known after the merge, bounded by min(m, n)); ``dtype_bytes`` the output dtype's size."""
    m, n, ranks = shape.out_features, shape.in_features, shape.ranks
    L = _Ledger()
    stack = L.alloc(F32 * (m + n) * sum(ranks))  # worker.runner._ModuleMerger._read
    L.spike(shape.read_bytes)
    out = _SPACES[space](L, m, n, ranks, method, params, rank)
    L.free(stack)
    # worker.output: zero-padded to the output's one rank, then cast to its dtype
    rho = min(m, n) if output_rank is None else output_rank
    bound = merged_rank_bound(space, params, m, n, sum(ranks), rank) or min(m, n)
    padded = F32 * (m + n) * rho if rho > bound else 0
    L.spike(padded + (dtype_bytes * (m + n) * rho if dtype_bytes != F32 else 0))
    return L.peak, out


def merged_rank_bound(
    space: str, params: Mapping[str, Any], m: int, n: int, total_rank: int, rank: int | None
) -> int | None:
    """An upper bound of a module's merged rank, or None when only the merge will know it.

    Core space and KnOTS give at most min(R, m, n); full space and isotropized KnOTS give a
    dense ΔW of any rank up to min(m, n), known only once it is factored. ``rank`` (the
    job's ``output.rank``) caps either.
    """
    exact: int | None = min(total_rank, m, n)
    if space == "full" or (space == "knots" and params.get("isotropize", False)):
        exact = None if rank is None else min(m, n)
    return exact if rank is None or exact is None else min(rank, exact)


def estimate_work(
    modules: Sequence[ModuleShape],
    *,
    space: str,
    method: str,
    params: Mapping[str, Any],
    rank: int | None,
    output_rank: int | None,
    dtype_bytes: int,
    threads: int,
    held_bytes: int,
) -> WorkEstimate:
    """The job's peak: the ``threads`` costliest modules at their peaks at once, the
    :data:`WAITING_MODULES` largest merged results besides them, ``held_bytes`` and
    :data:`FIXED_OVERHEAD`. Modules of equal shapes are estimated once."""
    cache: dict[tuple, tuple[int, int]] = {}
    costs = []
    for shape in modules:
        key = (shape.out_features, shape.in_features, shape.ranks, shape.read_bytes)
        if key not in cache:
            cache[key] = module_work(
                shape, space=space, method=method, params=params, rank=rank,
                output_rank=output_rank, dtype_bytes=dtype_bytes,
            )  # fmt: skip
        costs.append((cache[key], shape.module))
    if not costs:
        return WorkEstimate(FIXED_OVERHEAD + held_bytes, None, 0, held_bytes, threads)
    by_peak = sorted(costs, key=lambda c: c[0][0], reverse=True)
    side_by_side = sum(peak for (peak, _), _ in by_peak[:threads])
    waiting = 0
    if len(costs) > threads:
        waiting = sum(sorted((out for (_, out), _ in costs), reverse=True)[:WAITING_MODULES])
    (top_peak, _), top_module = by_peak[0]
    total = FIXED_OVERHEAD + held_bytes + side_by_side + waiting
    return WorkEstimate(total, top_module, top_peak, held_bytes, min(threads, len(costs)))


def check_work(estimate: WorkEstimate, limit: int | None, *, space: str, method: str) -> None:
    """Raise ``LimitExceeded`` when ``estimate`` is over ``limit`` (None: no limit)."""
    if limit is None or estimate.peak_bytes <= limit:
        return
    held = (
        f", {format_bytes(estimate.held_bytes)} of it held by the inputs for the whole merge "
        "(mapped files, regenerated VeRA projections, S3 look-ahead)"
        if estimate.held_bytes > estimate.peak_bytes // 10
        else ""
    )
    side = f", {estimate.threads} modules side by side" if estimate.threads > 1 else ""
    raise LimitExceeded(
        f"module {estimate.module!r}: merging it with {method} in {space} space needs about "
        f"{format_bytes(estimate.module_bytes)} of working memory; the job's estimated peak "
        f"is {format_bytes(estimate.peak_bytes)}{side}{held}, over this worker's limit of "
        f"{format_bytes(limit)} (COREMERGE_MAX_WORK_BYTES, or the CLI's --max-memory)"
    )
