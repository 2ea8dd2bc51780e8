"""Make glibc's malloc give large freed buffers back to the system (the worker calls this once).

A streamed job allocates and frees buffers of a part's size (16 MiB by default) all the time:
look-ahead spans from ranged GETs, upload parts, merged factors. glibc serves a request above
its mmap threshold with a mapping of its own, returned to the system on free, but it raises
that threshold to the size of every such block freed (up to 32 MiB), after which blocks of
that size come from the heaps of its per-thread arenas, and a heap gives memory back only
from its top. With a dozen threads (S3 connections, upload parts, the writer, the merge),
the arenas hold on to freed spans. Measured on the streamed service benchmark
(``bench/service.py --profile stream``, 1.25 GiB of inputs), the work horse's peak RSS was
549 MiB above the worker's by default and 291 MiB with the threshold held at 1 MiB and two
arenas: about what the job's own buffers account for (the 256 MiB look-ahead window and the
upload's parts in flight).

So the worker fixes the threshold (which also turns off the raising) and caps the arenas,
as ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_ARENA_MAX`` in its environment would. A setting
given in the environment wins; on another C library this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["ARENA_MAX", "MMAP_THRESHOLD_BYTES", "return_freed_memory"]

#: Allocations from this size up get their own mapping, unmapped when freed.
MMAP_THRESHOLD_BYTES = 1 << 20
#: malloc arenas for all threads together.
ARENA_MAX = 2

# mallopt's parameter numbers, from glibc's malloc.h.
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def return_freed_memory() -> bool:
    """Apply the settings above to this process (and the children it forks); True when
    glibc took both."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl has no mallopt)
        return False
    taken = True
    for variable, param, value in (
        ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        ("MALLOC_ARENA_MAX", _M_ARENA_MAX, ARENA_MAX),
    ):
        if variable not in os.environ:
            taken = bool(mallopt(param, value)) and taken
    return taken
