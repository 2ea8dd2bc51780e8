"""Merging several modules at once, one CPU thread each, with the results kept in plan order.

A module's merge is a chain of small steps: copying its factors out of the inputs, two tall
products, two 128 × 128 eigendecompositions, the method, two more products. Split over the
cores inside each step (torch's intra-op threads), the sequential steps leave all but one core
idle and the short parallel ones pay a fork and join each; merging whole modules side by
side, each on one thread, keeps every core busy instead (measured on the engine benchmark's inputs, 2
cores: see README.md). It also makes a core-space merge's floating-point results independent
of the machine's core count: every module is merged on one thread, whatever the machine
(on one CPU, torch runs one thread anyway).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["MAX_MERGE_THREADS", "merge_threads", "ordered_map"]

T = TypeVar("T")
R = TypeVar("R")

#: Each merging thread holds one module's stacked inputs and its results: the cap keeps peak
#: memory at a few modules whatever the size of the machine.
MAX_MERGE_THREADS = 4


def merge_threads(device: torch.device, space: str) -> int:
    """How many modules to merge at once: one per usable CPU (as torch counts them), capped
    at ``MAX_MERGE_THREADS``, in core and knots space, whose per-module work is small. One
    in full space, whose dense m × n products and SVDs use every core on their own and
    whose memory per module is large, and one on a GPU, whose kernels run one after another.
    """
    if device.type != "cpu" or space == "full":
        return 1
    return max(1, min(torch.get_num_threads(), MAX_MERGE_THREADS))


@contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """torch's (and MKL's) thread count set to 1 for the duration, then put back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """``map(fn, items)`` on ``threads`` threads of one intra-op thread each, in order.

    At most ``threads + 1`` items are taken ahead of the one being consumed, so memory holds
    that many results at most. When the consumer stops (an exception, a cancel, the
    generator closed), items not started are dropped and running ones finish before this
    returns; an exception in ``fn`` is raised to the consumer at that item's turn. With
    ``threads`` ≤ 1 it is plain ``map`` in the calling thread, torch's threads untouched.
    """
    if threads <= 1:
        yield from map(fn, items)
        return
    pending: deque[Future[R]] = deque()
    # OpenMP's thread count is per calling thread: each worker sets its own.
    with (
        _one_intra_op_thread(),
        ThreadPoolExecutor(
            threads, thread_name_prefix="merge", initializer=torch.set_num_threads, initargs=(1,)
        ) as pool,
    ):
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
