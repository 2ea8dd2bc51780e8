"""How much memory a merge will need, from shapes alone, before any tensor is read.

A merge's memory is set by shapes the adapters declare, not by their size on disk: a 320 KB
VeRA adapter saved without its projections can declare a rank that makes the worker
regenerate gigabytes of them, and a 200 KB LoRA adapter on wide layers makes a full-space
merge form dense m × n matrices of gigabytes. So the plan (``worker.merge.plan``) estimates the
job's PEAK working memory from the configs and headers, and refuses the job above a limit
(``COREMERGE_MAX_WORK_BYTES``, by default ``worker.limits.default_max_work_bytes``) instead of
letting the kernel's OOM killer end it, or its neighbours, midway.

How: the engine declares the cost of each of its steps beside the step (``worker.engine``:
each space's and each method's ``cost``, LAPACK's copies and workspaces beside the
decompositions), as allocations and frees on a ``Ledger``. A module's peak is those costs run
on the module's shapes, plus what the runner and the writer add around the merge: the
stacked inputs, the largest copy one input makes as it is read, the merged factors padded and
cast for the output. Where the engine picks a route from the values (the Gram or the QR route
to a basis), the costlier is assumed. The job's peak is then that of its largest modules
merged side by side (``worker.merge.pipeline``), plus finished modules waiting to be written, plus
what the inputs hold for the whole merge (mapped file pages, regenerated VeRA projections,
parsed headers, the look-ahead window of an S3 input read as the merge goes:
``AdapterSource.held_bytes``), plus a fixed overhead. ``tests/worker/test_memory_grid.py``
runs every method × space × work-changing parameter in a fresh process and holds the estimate
between the measured peak and 1.5 times it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jobs.errors import LimitExceeded
from worker.engine import SPACES
from worker.engine.ledger import F32, Ledger

__all__ = [
    "DTYPE_BYTES",
    "ModuleShape",
    "WorkEstimate",
    "check_work",
    "estimate_work",
    "format_bytes",
    "merged_rank_bound",
    "module_work",
]

#: Bytes per value of each ``output.dtype``.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: What a merge costs besides its tensors: threads and their stacks, allocator arenas, the
#: safetensors handles, the writer's queue (a tiny merge in a freshly forked work horse
#: measures 0–1 MiB of anonymous memory). Library pages a work horse touches for the first
#: time raise its RSS by up to ~90 MiB but are page cache the parent already holds (charged
#: once to the pod, and reclaimable), so they are not counted here.
FIXED_OVERHEAD = 4 << 20
#: The tensors' bytes are counted with this much more: glibc keeps freed blocks below its
#: mmap threshold in its heaps (fragmented), pages round allocations up, and the same merge
#: measures a few percent apart from run to run (tests/worker/test_memory_grid.py).
ALLOCATOR_SLACK = 0.10
#: Merged modules held besides those being merged: the one being written and those whose
#: bytes are still in the writer's queue (``worker.adapters.writer.MAX_IN_FLIGHT`` tensors).
WAITING_MODULES = 2


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units, e.g. ``3.2 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


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
    output_rank_mode: str = "auto",
) -> tuple[int, int]:
    """(peak bytes while ``shape`` is read, merged and written; bytes of its merged factors,
    held until written). ``rank`` is ``output.rank``; ``output_rank`` the written rank (None:
    known after the merge, bounded by min(m, n)); ``dtype_bytes`` the output dtype's size."""
    m, n, ranks = shape.out_features, shape.in_features, shape.ranks
    L = Ledger()
    stack = L.alloc(F32 * (m + n) * sum(ranks))  # worker.merge.runner._ModuleMerger._read
    L.spike(shape.read_bytes)
    extra = SPACES[space].cost(
        L, m, n, ranks, method, params, rank, output_rank_mode=output_rank_mode
    )
    # The merged pair is held until written; it may be (part of) the stacks themselves.
    bound = merged_rank_bound(space, params, m, n, sum(ranks), rank) or min(m, n)
    held = max(extra, F32 * (m + n) * bound)
    L.free(stack, extra)
    L.alloc(held)
    # worker.merge.output: zero-padded to the output's one rank, then cast to its dtype
    rho = min(m, n) if output_rank is None else output_rank
    padded = F32 * (m + n) * rho if rho > bound else 0
    L.spike(padded + (dtype_bytes * (m + n) * rho if dtype_bytes != F32 else 0))
    return L.peak, held


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
    output_rank_mode: str = "auto",
) -> WorkEstimate:
    """The job's peak: the ``threads`` costliest modules at their peaks at once, the
    :data:`WAITING_MODULES` largest merged results besides them, ``held_bytes`` and
    :data:`FIXED_OVERHEAD`, the tensors counted with :data:`ALLOCATOR_SLACK`. Modules of
    equal shapes are estimated once."""
    cache: dict[tuple, tuple[int, int]] = {}
    costs = []
    for shape in modules:
        key = (shape.out_features, shape.in_features, shape.ranks, shape.read_bytes)
        if key not in cache:
            cache[key] = module_work(
                shape, space=space, method=method, params=params, rank=rank,
                output_rank=output_rank, dtype_bytes=dtype_bytes,
                output_rank_mode=output_rank_mode,
            )  # fmt: skip
        costs.append((cache[key], shape.module))
    if not costs:
        total = FIXED_OVERHEAD + math.ceil((1 + ALLOCATOR_SLACK) * held_bytes)
        return WorkEstimate(total, None, 0, held_bytes, threads)
    by_peak = sorted(costs, key=lambda c: c[0][0], reverse=True)
    side_by_side = sum(peak for (peak, _), _ in by_peak[:threads])
    waiting = 0
    if len(costs) > threads:
        waiting = sum(sorted((out for (_, out), _ in costs), reverse=True)[:WAITING_MODULES])
    (top_peak, _), top_module = by_peak[0]
    tensors = held_bytes + side_by_side + waiting
    total = FIXED_OVERHEAD + math.ceil((1 + ALLOCATOR_SLACK) * tensors)
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
