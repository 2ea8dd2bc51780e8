"""A tenant's jobs, newest first, a page at a time: summaries read from the tenant's indexes.

A listing reads the index of the tenant's jobs (or of those in one status; ``jobs.records``)
and, for each entry, only a record's small fields (:data:`SUMMARY_FIELDS`), never its request
or result: a page of 100 summaries is a few tens of KiB whatever the records hold, so no
client can make an API process hold hundreds of MiB by listing. The full job is
``GET /merges/{id}``.

Pages are cut by an opaque cursor naming the last entry shown (its creation score and key):
the next page starts strictly after it, so jobs created meanwhile (newer, hence before the
cursor) neither shift nor repeat what follows. Entries whose record expired are dropped from
the index on the way; a page reads at most :data:`SCAN_BUDGET` entries, and hands back a
cursor where it stopped.

>>> decode_cursor(encode_cursor(1733.25, "cm:job:ab"))
(1733.25, 'cm:job:ab')
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass
from typing import Any

from jobs.records import JobStore

__all__ = [
    "MAX_PAGE",
    "SCAN_BUDGET",
    "SUMMARY_FIELDS",
    "InvalidCursor",
    "JobSummary",
    "Page",
    "decode_cursor",
    "encode_cursor",
    "list_jobs",
]

#: The most summaries one page holds (``limit`` above it is refused).
MAX_PAGE = 100
#: Index entries one page may read (expired or moved entries included) before it stops.
SCAN_BUDGET = 1000
#: The record fields a summary is made of: a few hundred bytes, whatever the request holds.
SUMMARY_FIELDS = (
    "id", "status", "created_at", "started_at", "finished_at", "updated_at", "attempts",
    "progress", "error", "error_z", "method", "space", "adapters", "output_uri",
)  # fmt: skip


class InvalidCursor(ValueError):
    """A cursor this service did not hand out."""


def encode_cursor(score: float, member: str) -> str:
    """An opaque cursor for the index entry (``score``, ``member``)."""
    raw = json.dumps([score, member], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        score, member = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidCursor("not a cursor of this listing") from None
    if not isinstance(score, int | float) or not isinstance(member, str):
        raise InvalidCursor("not a cursor of this listing")
    return float(score), member


@dataclass(frozen=True)
class JobSummary:
    """One job of a listing: where it stands, what it merges and where to, no request."""

    id: str
    status: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    updated_at: str | None
    attempts: int
    method: str | None
    space: str | None
    adapters: int | None
    output_uri: str | None
    progress: dict[str, Any] | None
    error_code: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Page:
    jobs: list[JobSummary]
    next_cursor: str | None


def _summary(store: JobStore, key: str, values: list[bytes | None]) -> JobSummary:
    raw = {f: v.decode() if v is not None and f != "error_z" else v
           for f, v in zip(SUMMARY_FIELDS, values, strict=True)}  # fmt: skip
    error = raw["error"] or (zlib.decompress(raw["error_z"]).decode() if raw["error_z"] else None)
    if raw["method"] is None:  # a record written before summaries had their own fields
        record = store.get(raw["id"])
        spec = record.request if record is not None else {}
        raw["method"], raw["space"] = spec.get("method"), spec.get("space")
        raw["adapters"] = str(len(spec.get("adapters", [])))
        raw["output_uri"] = (spec.get("output") or {}).get("uri")
    return JobSummary(
        id=raw["id"],
        status=raw["status"],
        created_at=raw["created_at"],
        started_at=raw["started_at"],
        finished_at=raw["finished_at"],
        updated_at=raw["updated_at"],
        attempts=int(raw["attempts"] or 0),
        method=raw["method"],
        space=raw["space"],
        adapters=int(raw["adapters"]) if raw["adapters"] else None,
        output_uri=raw["output_uri"],
        progress=json.loads(raw["progress"]) if raw["progress"] else None,
        error_code=json.loads(error)["code"] if error else None,
    )


def _entries_after(
    store: JobStore, index: str, after: tuple[float, str] | None, count: int
) -> list[tuple[str, float]]:
    """Up to ``count`` index entries, newest first, strictly after ``after``."""
    if after is None:
        rows = store.redis.zrevrangebyscore(index, "+inf", "-inf", start=0, num=count,
                                            withscores=True)  # fmt: skip
        return [(k.decode(), s) for k, s in rows]
    score, member = after
    # Entries of one score come in reverse order of their keys: the cursor's own score's
    # entries after it first (a tie is rare: scores are creation times in µs), then older ones.
    ties = store.redis.zrangebyscore(index, score, score, withscores=True)
    entries = sorted(((k.decode(), s) for k, s in ties if k.decode() < member), reverse=True)
    if len(entries) < count:
        rows = store.redis.zrevrangebyscore(index, f"({score!r}", "-inf", start=0,
                                            num=count - len(entries), withscores=True)  # fmt: skip
        entries += [(k.decode(), s) for k, s in rows]
    return entries[:count]


def list_jobs(
    store: JobStore,
    tenant: str,
    *,
    status: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page:
    """The tenant's jobs (in ``status``, if given), newest first, after ``cursor``: at most
    ``limit`` summaries and the cursor of the next page (``None`` at the end). Raises
    :class:`InvalidCursor` for a cursor not handed out here."""
    limit = max(1, min(limit, MAX_PAGE))
    index = store.tenant_key(tenant) if status is None else store.status_key(tenant, status)
    after = decode_cursor(cursor) if cursor else None
    found: list[JobSummary] = []
    scanned = 0
    while len(found) < limit and scanned < SCAN_BUDGET:
        entries = _entries_after(store, index, after, limit - len(found))
        if not entries:
            return Page(found, None)
        with store.redis.pipeline(transaction=False) as pipe:
            for key, _ in entries:
                pipe.hmget(key, SUMMARY_FIELDS)
            rows = pipe.execute()
        expired = [key for (key, _), row in zip(entries, rows, strict=True) if row[1] is None]
        if expired:  # the record expired: drop it from the index too
            store.redis.zrem(index, *expired)
        for (key, _), row in zip(entries, rows, strict=True):
            # A record that moved on between the two reads is in its new index now.
            if row[1] is not None and (status is None or row[1].decode() == status):
                found.append(_summary(store, key, row))
        scanned += len(entries)
        after = entries[-1][1], entries[-1][0]
    more = bool(_entries_after(store, index, after, 1))
    return Page(found, encode_cursor(*after) if more else None)
