"""A ledger of allocations: how the engine's steps declare what they cost in memory.

Each step of a merge (a decomposition, a method, a space's map back) has a cost function
written beside it, which replays the step's allocations on a :class:`Ledger` from shapes
alone: every tensor the step creates is allocated, every one it drops is freed, and LAPACK's
copies and workspaces are spikes. The estimate of a job's peak working memory
(``worker.merge.memory``) is these declarations added up, so it follows the code it sits beside;
``tests/worker/test_memory_grid.py`` runs every method, space and work-changing parameter in a
fresh process and holds the estimate between the measured peak and 1.5 times it.

Torch-free: costs are arithmetic on shapes. Sizes are bytes.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["F32", "F64", "Ledger"]

F32 = 4
F64 = 8


class Ledger:
    """Bytes allocated now and the most ever allocated at once."""

    def __init__(self, now: int = 0) -> None:
        self.now = now
        self.peak = now

    def alloc(self, nbytes: int) -> int:
        """Allocate ``nbytes`` (kept until freed); returns them, to free later."""
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        return nbytes

    def free(self, *nbytes: int) -> None:
        self.now -= sum(nbytes)

    def spike(self, nbytes: int) -> None:
        """A temporary: allocated and freed within one step."""
        self.peak = max(self.peak, self.now + nbytes)

    def worst(self, *routes: Callable[[Ledger], None]) -> None:
        """Run alternative routes from the present state and keep the costliest of each:
        the highest peak and the most left allocated (which route runs depends on values)."""
        forks = [Ledger(self.now) for _ in routes]
        for route, fork in zip(routes, forks, strict=True):
            route(fork)
        self.peak = max(self.peak, *(f.peak for f in forks))
        self.now = max(f.now for f in forks)
        self.peak = max(self.peak, self.now)
