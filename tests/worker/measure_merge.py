"""Run one merge and print its estimated and measured peak working memory (a child process of
``tests/worker/test_memory_estimate.py``; not a test module).

    python -m tests.worker.measure_merge '{"spec": {...}, "dirs": [...], "out": "...", "vera": false}'

The measure is the process's peak resident memory during ``run_merge`` (VmHWM) less its
resident memory right before it, after the imports: the kernel's peak counter is reset first
(``/proc/self/clear_refs``), so an import's transient peak does not count.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path


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


def main() -> None:
    job = json.loads(sys.argv[1])
    import torch  # noqa: F401  (the imports are not the merge's memory)

    from jobs.spec import MergeSpec
    from worker.runner import run_merge

    if job.get("vera"):  # the regenerating reader imports PEFT's initialisation
        import peft.tuners.vera.model  # noqa: F401
    spec = MergeSpec.model_validate(job["spec"])
    gc.collect()
    reset = reset_peak()
    before = status_bytes("VmRSS")
    outcome = run_merge(spec, [Path(d) for d in job["dirs"]], Path(job["out"]), device="cpu")
    measured = status_bytes("VmHWM") - before
    estimate = outcome.report["memory"]["estimated_peak_bytes"]
    print(json.dumps({"estimate": estimate, "measured": measured, "reset": reset}))


if __name__ == "__main__":
    main()
