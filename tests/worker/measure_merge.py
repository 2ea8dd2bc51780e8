"""Run one merge and measure its peak working memory against the plan's estimate: the child
side of ``tests/worker/test_memory_grid.py`` (not a test module). A forkserver preloads this
module (torch and the worker imported once, as a worker with ``COREMERGE_WORKER_PRELOAD``
does) and runs :func:`measure` in a fresh forked process per merge. The measure is the process's peak
resident memory during ``run_merge`` (VmHWM) less its resident memory right before it: the
kernel's peak counter is reset first (``/proc/self/clear_refs``), so the imports' transient
peaks do not count. A forked child starts with none of its shared libraries' pages mapped (the
kernel fills them at first touch), so the code a merge runs would count as ~90 MiB of work;
every file mapping is populated before the measure starts (:func:`map_file_pages`). glibc's malloc is set as the worker sets it (``worker.allocator``): large
freed buffers go back to the system, so the resident memory follows what is allocated.
"""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path

import torch

from jobs.spec import MergeSpec
from worker.allocator import return_freed_memory
from worker.merge.runner import run_merge

__all__ = ["map_file_pages", "measure", "reset_peak", "status_bytes"]

MADV_POPULATE_READ = 22  # Linux ≥ 5.14


def map_file_pages() -> None:
    """Map every page of the process's file mappings (shared libraries, mapped files) now, so
    that touching them during the merge does not count as the merge's memory. Best effort:
    a kernel without MADV_POPULATE_READ leaves them as they are."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) < 6 or not fields[5].startswith("/") or not fields[1].startswith("r"):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        libc.madvise(start, end - start, MADV_POPULATE_READ)


def status_bytes(field: str) -> int:
    """A ``VmRSS``-style field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the present RSS (Linux ≥ 4.0); False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(job: dict) -> dict:
    """Merge ``job`` (spec, input dirs, output dir) in this process; its estimate and peak."""
    return_freed_memory()
    if job.get("vera"):  # the regenerating reader imports PEFT's initialisation
        import peft.tuners.vera.model  # noqa: F401
    torch.set_num_threads(job.get("threads", torch.get_num_threads()))
    spec = MergeSpec.model_validate(job["spec"])
    gc.collect()
    map_file_pages()
    reset = reset_peak()
    before = status_bytes("VmRSS")
    outcome = run_merge(spec, [Path(d) for d in job["dirs"]], Path(job["out"]), device="cpu")
    measured = status_bytes("VmHWM") - before
    estimate = outcome.report["memory"]["estimated_peak_bytes"]
    return {"estimate": estimate, "measured": measured, "reset": reset}
