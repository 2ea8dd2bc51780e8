"""Structured logs: one JSON object per line, with the job and tenant a line belongs to.

``coremerge serve`` and ``coremerge worker`` call :func:`configure_logging` once; every logger
(ours, uvicorn's, RQ's) then writes through one handler on stderr. A line is::

    {"time": "2026-11-23T12:30:05.123Z", "level": "INFO", "logger": "coremerge.worker",
     "message": "job 56db…: succeeded in 0.15 s → s3://merged/team-a/run-42/",
     "job_id": "56db21d82397845e1ef86b4e37abccd4", "tenant": "team-a"}

``job_id`` and ``tenant`` come from :func:`log_context` (the worker sets them for the duration
of a job), so every line logged meanwhile, by any module, carries them. An exception's
traceback goes in ``exception``. ``COREMERGE_LOG_FORMAT=text`` gives plain lines instead.

API keys are never logged: no code here or in the API logs a request's headers, and uvicorn's
access log line is the client address, the request line and the status
(``tests/service/test_logging.py`` holds both to that).

>>> import logging
>>> record = logging.LogRecord("coremerge.worker", logging.INFO, "", 0, "hi %s", ("there",), None)
>>> with log_context(job_id="j1", tenant="team-a"):
...     line = JsonFormatter().format(record)
>>> json.loads(line)["message"], json.loads(line)["job_id"]
('hi there', 'j1')
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["JsonFormatter", "bind_log_context", "configure_logging", "log_context"]

_CONTEXT: ContextVar[dict[str, str]] = ContextVar("coremerge_log_context", default={})  # noqa: B039
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextmanager
def log_context(**fields: str) -> Iterator[None]:
    """Add ``fields`` (``job_id``, ``tenant``) to every line logged inside the block."""
    token = _CONTEXT.set({**_CONTEXT.get(), **fields})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def bind_log_context(**fields: str) -> None:
    """Add ``fields`` to the current :func:`log_context` block, until it ends."""
    _CONTEXT.set({**_CONTEXT.get(), **fields})


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: time (UTC, ms), level, logger, message, the context."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_CONTEXT.get(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str = "json") -> None:
    """One handler on the root logger, on stderr, in ``log_format`` (``json`` or ``text``);
    replaces any handler set before (uvicorn and RQ add none of their own when the root has
    one: ``coremerge serve`` runs uvicorn with ``log_config=None``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
