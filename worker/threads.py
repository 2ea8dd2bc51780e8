"""OpenMP settings for torch's CPU threads, made before torch is first imported.

Two defaults of torch's CPU build cost a merge dearly on a machine it does not have to itself:

- Its OpenMP threads (GNU libgomp, which MKL uses too) spin for up to 300 000 rounds waiting
  for work between parallel regions. A merge runs thousands of small products; when another
  process holds a core, the spinning thread burns the time slice the working one needs.
  Measured on 2 cores shared with a training job, a 4-layer core ``ta`` merge
  (``coremerge merge``, in-process seconds): 2.5–16 with the default spin, 2.9–3.3 with
  ``GOMP_SPINCOUNT=3000``; and 12–26 s against 4.4–4.6 s wall with no spin at all
  (``OMP_WAIT_POLICY=PASSIVE``). On the same machine left quiet: 0.77–0.93 default,
  0.84–0.86 at 3000, 1.05–1.46 passive (sleeping threads wake slowly). So: a short spin.
- It starts one thread per core of the machine, not per core the process may use: a worker
  pod limited to 4 CPUs on a 64-core node would run 64 threads against a 4-CPU quota.

So, unless the user set them: ``GOMP_SPINCOUNT=3000``, and ``OMP_NUM_THREADS`` = the CPUs
this process may use (its affinity, capped by a cgroup v2 ``cpu.max`` quota) when that is
fewer than the machine has. Environment variables, because OpenMP reads them once, when
torch loads it; :func:`tune_openmp` runs on ``import worker``, before any torch import.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from pathlib import Path

__all__ = ["cgroup_cpu_limit", "tune_openmp", "usable_cpus"]

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
#: Rounds an idle OpenMP thread spins before it sleeps (libgomp's default: 300 000).
SPIN_COUNT = 3000


def cgroup_cpu_limit(cpu_max: Path = CGROUP_CPU_MAX) -> float | None:
    """CPUs allowed by the cgroup v2 quota (``"<quota> <period>"``), or None when unlimited."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may run on, capped by its cgroup quota (at least 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    limit = cgroup_cpu_limit(cpu_max)
    if limit is not None:
        cpus = min(cpus or 1, math.floor(limit))
    return max(1, cpus or 1)


def tune_openmp(
    environ: MutableMapping[str, str] = os.environ, cpu_max: Path = CGROUP_CPU_MAX
) -> None:
    """Set the OpenMP defaults described above, leaving any the user has set alone."""
    if "OMP_WAIT_POLICY" not in environ:  # the user's policy decides the spin
        environ.setdefault("GOMP_SPINCOUNT", str(SPIN_COUNT))
    cpus = usable_cpus(cpu_max)
    if cpus < (os.cpu_count() or cpus):
        environ.setdefault("OMP_NUM_THREADS", str(cpus))
