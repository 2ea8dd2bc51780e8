"""A ``merge_report.json`` found at an output, read back within bounds: the report a run
succeeds from when an earlier run of its job published already (``worker.job``)."""

from __future__ import annotations

import json
from typing import Any

from jobs.errors import OutputExists
from worker.adapters.format import REPORT_NAME

from .objects import ObjectInfo, ObjectStore

__all__ = ["MAX_REPORT_BYTES", "read_report"]

#: The largest ``merge_report.json`` read back from an output (a job's own is well under it:
#: about 300 bytes per module, and COREMERGE_MAX_MODULES is 65,536 by default).
MAX_REPORT_BYTES = 64 << 20
#: What a job's result takes from the report: whole numbers under ``output``.
_RESULT_FIELDS = ("rank", "modules", "bytes")


def _usable(report: object) -> bool:
    """Whether ``report`` has the shape a job's result needs."""
    output = report.get("output") if isinstance(report, dict) else None
    return isinstance(output, dict) and all(
        type(output.get(k)) is int and output[k] >= 0 for k in _RESULT_FIELDS
    )


def read_report(store: ObjectStore, info: ObjectInfo, uri: str) -> dict[str, Any]:
    """The report ``info`` describes, read (pinned to its ETag) only when it is at most
    :data:`MAX_REPORT_BYTES`, and used only in the shape of a report; otherwise it is not a
    report a job can have written: ``OutputExists``, naming why."""
    why, report = None, None
    if info.size > MAX_REPORT_BYTES:
        why = f"{info.size} bytes, over the {MAX_REPORT_BYTES} a report can be"
    else:
        try:
            report = json.loads(store.read(info.key, etag=info.etag))
        except (UnicodeDecodeError, ValueError, RecursionError):
            why = "not JSON"
        else:
            why = None if _usable(report) else "not the shape of a merge report"
    if why is not None:
        raise OutputExists(
            f"{uri}: holds a {REPORT_NAME} that this job cannot use ({why}); nothing there "
            "was touched (give each job its own output.uri)"
        )
    return report  # type: ignore[return-value]
