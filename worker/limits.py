"""How much memory this process may use: its cgroup's limit, or the machine's memory.

The worker refuses a job whose estimated peak working memory (``worker.merge.memory``) is over
``COREMERGE_MAX_WORK_BYTES``, by default :func:`default_max_work_bytes` of what the kernel
lets this process have, so that a job refused here is one the kernel's OOM killer would
otherwise have ended midway. Torch-free: ``worker.job`` reads the limit before importing
anything heavy.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["DEFAULT_LIMIT_SHARE", "default_max_work_bytes", "memory_limit"]

#: Share of the process's memory limit that the default work limit allows: the rest is for
#: the interpreter, torch and the libraries (about 250 MiB), and the page cache.
DEFAULT_LIMIT_SHARE = 0.8
#: A cgroup v1 limit of this or more means "no limit" (the kernel's value is 2**63 − 4096).
_NO_LIMIT = 1 << 60


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
