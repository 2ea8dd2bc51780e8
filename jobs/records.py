"""Job records in Redis: the job of docs/job-spec.md, its status machine, progress, result, error.

RQ carries the work; this record is what clients read. Keys (defined here only)::

    {prefix}:job:{id}             hash: status, tenant, request, progress, result, error, …
    {prefix}:tenant:{name}:jobs   sorted set of the tenant's job ids by creation time
    {prefix}:stats                hash: jobs entered per status, active counts, merge seconds

Every status change goes through :meth:`JobStore.transition`, one Lua script
(``jobs.scripts.TRANSITION``) that checks the current status and moves it atomically; the
statuses and the moves between them are drawn in ``jobs.status``.

Each run of a job holds a *run token* (``run``), set by :meth:`JobStore.start`: the worker's
progress and its final transition are fenced by it, so a run that was given up for dead (its
worker stopped heartbeating, RQ re-queued the job) but is in fact still alive can neither
overwrite the record of the run that replaced it nor end the job: it sees that it no longer
owns the record and stops at its next module boundary.

Terminal records expire ``result_ttl`` seconds after they finish. Cancelling a running job
only raises a flag; the worker sees it at the next module boundary and ends the job itself
(RQ's ``job.cancel()`` does not stop a running job).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jobs import scripts
from jobs.status import ACTIVE, STATUSES, TERMINAL, JobStatus

__all__ = [
    "ACTIVE",
    "MERGE_SECONDS_BUCKETS",
    "STATUSES",
    "TERMINAL",
    "JobRecord",
    "JobStatus",
    "JobStore",
    "fingerprint",
    "job_id_for",
]

#: Upper bounds (seconds) of the merge-time histogram exposed at /metrics.
MERGE_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: A record still marked "accepting" this long after creation was left by a crashed request.
ACCEPT_STALE_S = 30.0

_JSON_FIELDS = ("request", "progress", "result", "error")

# KEYS: job, stats. ARGV: to, allowed-from (",a,b,"), ttl (0: keep), run token ('' = any run),
# then field/value pairs. Returns {1, previous} when moved, {0, current or ""} when the record
# is not in an allowed state or is held by another run.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {0, ''} end
if not string.find(ARGV[2], ',' .. current .. ',', 1, true) then return {0, current} end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'run') ~= ARGV[4] then return {0, current} end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
for i = 5, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[1], ARGV[i])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
if current ~= ARGV[1] then
  redis.call('HINCRBY', KEYS[2], 'entered:' .. ARGV[1], 1)
  if current == 'queued' or current == 'running' then
    redis.call('HINCRBY', KEYS[2], 'active:' .. current, -1)
  end
  if ARGV[1] == 'queued' or ARGV[1] == 'running' then
    redis.call('HINCRBY', KEYS[2], 'active:' .. ARGV[1], 1)
  end
end
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return {1, current}
"""

# KEYS: job, tenant index, stats. ARGV: score, then field/value pairs. 1 = created, 0 = exists.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('ZADD', KEYS[2], ARGV[1], KEYS[1])
redis.call('HINCRBY', KEYS[3], 'entered:queued', 1)
redis.call('HINCRBY', KEYS[3], 'active:queued', 1)
return 1
"""

# KEYS: job. ARGV: progress JSON, run token ('' = any). Publishes progress of a running job;
# 1 = it should stop (canceled, no longer running, or this run was replaced by another).
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 1 end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'run') ~= ARGV[2] then return 1 end
redis.call('HSET', KEYS[1], 'progress', ARGV[1])
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 1 end
return 0
"""

# KEYS: job, tenant index, stats. Undo a create whose enqueue failed.
_DISCARD = """
if redis.call('HGET', KEYS[1], 'status') == 'queued' then
  redis.call('HINCRBY', KEYS[3], 'entered:queued', -1)
  redis.call('HINCRBY', KEYS[3], 'active:queued', -1)
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], KEYS[1])
return 1
"""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def fingerprint(request: dict[str, Any]) -> str:
    """A digest of a (validated, defaults filled in) request: same job or another one."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def job_id_for(tenant: str, idempotency_key: str | None) -> str:
    """The job id: derived from the tenant and the Idempotency-Key when there is one (so a
    repeat finds the same job), random otherwise. 32 hex digits, valid as an RQ job id."""
    if idempotency_key is None:
        return uuid.uuid4().hex
    return hashlib.sha256(f"{tenant}\0{idempotency_key}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant: str
    status: JobStatus
    created_at: str
    request: dict[str, Any]
    fingerprint: str
    started_at: str | None = None
    finished_at: str | None = None
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    accepting_since: float | None = None
    attempts: int = 0
    run: str | None = None

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> JobRecord:
        d = {k.decode(): v.decode() for k, v in raw.items()}
        for name in _JSON_FIELDS:
            d[name] = json.loads(d[name]) if name in d else None
        return cls(
            id=d["id"],
            tenant=d["tenant"],
            status=JobStatus(d["status"]),
            created_at=d["created_at"],
            request=d["request"],
            fingerprint=d["fingerprint"],
            started_at=d.get("started_at"),
            finished_at=d.get("finished_at"),
            progress=d["progress"],
            result=d["result"],
            error=d["error"],
            cancel_requested=d.get("cancel_requested") == "1",
            accepting_since=float(d["accepting"]) if "accepting" in d else None,
            attempts=int(d.get("attempts", 0)),
            run=d.get("run"),
        )


class JobStore:
    """Job records of one deployment (``key_prefix``) in one Redis."""

    def __init__(self, redis: Any, *, key_prefix: str = "coremerge", result_ttl: int = 604_800):
        self.redis = redis
        self.prefix = key_prefix
        self.result_ttl = result_ttl
        self._transition = redis.register_script(scripts.TRANSITION)
        self._create = redis.register_script(scripts.CREATE)
        self._discard = redis.register_script(scripts.DISCARD)
        self._progress = redis.register_script(scripts.PROGRESS)

    # -- keys
    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def tenant_key(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:jobs"

    @property
    def stats_key(self) -> str:
        return f"{self.prefix}:stats"

    # -- reading
    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(self.job_key(job_id))
        return JobRecord.from_hash(raw) if raw else None

    def list(self, tenant: str, *, status: str | None = None, limit: int = 50) -> list[JobRecord]:
        """The tenant's jobs, newest first, optionally only those with ``status``."""
        index = self.tenant_key(tenant)
        found: list[JobRecord] = []
        start, batch = 0, max(limit, 50)
        while len(found) < limit and start < 20_000:
            keys = self.redis.zrevrange(index, start, start + batch - 1)
            if not keys:
                break
            with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                rows = pipe.execute()
            expired = [key for key, raw in zip(keys, rows, strict=True) if not raw]
            if expired:  # the record expired: drop it from the index too
                self.redis.zrem(index, *expired)
                start -= len(expired)
            for raw in rows:
                if raw and (record := JobRecord.from_hash(raw)).status == (status or record.status):
                    found.append(record)
            start += batch
        return found[:limit]

    def stats(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.redis.hgetall(self.stats_key).items()}

    # -- creating
    def create(
        self, job_id: str, tenant: str, request: dict[str, Any], *, pipeline: Any = None
    ) -> JobRecord | None:
        """Create a queued record; ``None`` when the id exists already.

        Without ``pipeline`` the record is marked *accepting* until :meth:`mark_accepted`
        (the caller queues the job in between). With one, the creation is only added to that
        transaction, which must also queue the job: for ids that cannot collide (random ones),
        record and queue entry then appear together or not at all.
        """
        created_at = now_iso()
        fields = {
            "id": job_id,
            "tenant": tenant,
            "status": "queued",
            "created_at": created_at,
            "request": json.dumps(request, separators=(",", ":")),
            "fingerprint": fingerprint(request),
        }
        accepting = None
        if pipeline is None:
            accepting = time.time()
            fields["accepting"] = repr(accepting)
        args = [repr(time.time())] + [x for kv in fields.items() for x in kv]
        keys = [self.job_key(job_id), self.tenant_key(tenant), self.stats_key]
        if pipeline is not None:
            self._create(keys=keys, args=args, client=pipeline)
        elif not self._create(keys=keys, args=args):
            return None
        return JobRecord(job_id, tenant, JobStatus.QUEUED, created_at, request, fields["fingerprint"],
                         accepting_since=accepting)  # fmt: skip

    def mark_accepted(self, job_id: str) -> None:
        """The job is in the queue: a repeat of its request now gets it back (not 409)."""
        self.redis.hdel(self.job_key(job_id), "accepting")

    def discard(self, job_id: str, tenant: str) -> None:
        """Undo :meth:`create` when the job could not be queued."""
        keys = [self.job_key(job_id), self.tenant_key(tenant), self.stats_key]
        self._discard(keys=keys, args=[])

    # -- the status machine
    def transition(
        self,
        job_id: str,
        to: str,
        *,
        allowed_from: tuple[str, ...],
        fence: str | None = None,
        **fields: Any,
    ) -> tuple[bool, str | None]:
        """Move the job to ``to`` if its status is one of ``allowed_from`` (and, given
        ``fence``, the record is held by that run token), setting ``fields`` (dicts are stored
        as JSON; ``None`` deletes the field). Returns (moved, previous or current status; ``None`` if there is
        no such job)."""
        assert to in STATUSES and set(allowed_from) <= set(STATUSES)
        ttl = self.result_ttl if to in TERMINAL else 0
        args: list[Any] = [to, "," + ",".join(allowed_from) + ",", ttl, fence or ""]
        for name, value in fields.items():
            if value is None:
                args += [name, ""]
            elif isinstance(value, dict):
                args += [name, json.dumps(value, separators=(",", ":"))]
            else:
                args += [name, str(value)]
        moved, status = self._transition(keys=[self.job_key(job_id), self.stats_key], args=args)
        status = status.decode() if isinstance(status, bytes) else status
        return bool(moved), (status or None)

    def start(self, job_id: str) -> str | None:
        """queued → running, by the worker: returns this run's token (pass it to the calls
        below), or ``None`` when the job was canceled (or vanished) meanwhile."""
        record = self.get(job_id)
        attempts = (record.attempts if record else 0) + 1
        token = uuid.uuid4().hex
        moved, _ = self.transition(
            job_id, "running", allowed_from=("queued",),
            started_at=now_iso(), attempts=attempts, run=token,
            progress={"stage": "download", "modules_done": 0, "modules_total": 0},
        )  # fmt: skip
        return token if moved else None

    def requeue(self, job_id: str, reason: str) -> bool:
        """running → queued: the worker died and RQ runs the job again. The run token goes, so
        the old run (should it still be alive somewhere) can no longer touch the record."""
        moved, _ = self.transition(
            job_id, "queued", allowed_from=("running",), progress=None, requeued_because=reason,
            run=None,
        )  # fmt: skip
        if moved:
            self.redis.hincrby(self.stats_key, "requeued", 1)
        return moved

    def succeed(self, job_id: str, result: dict[str, Any], *, run: str | None = None) -> bool:
        """running → succeeded; with ``run``, only while that run holds the record."""
        moved, _ = self.transition(
            job_id, "succeeded", allowed_from=("running",), fence=run, result=result,
            finished_at=now_iso(),
        )  # fmt: skip
        if moved:
            self._observe_merge_seconds(float(result.get("seconds", 0.0)))
        return moved

    def fail(self, job_id: str, code: str, message: str, *, run: str | None = None) -> bool:
        """running (or queued) → failed, or → canceled when ``code`` is ``canceled``; with
        ``run``, only while that run holds the record (a replaced run ends nothing)."""
        to = "canceled" if code == "canceled" else "failed"
        moved, _ = self.transition(
            job_id, to, allowed_from=("running",) if run else ACTIVE, fence=run,
            finished_at=now_iso(), error={"code": code, "message": message},
        )  # fmt: skip
        return moved

    def cancel(self, job_id: str) -> str | None:
        """DELETE: a queued job is canceled at once ("canceled"); a running one gets the flag
        its worker checks between modules ("requested"). Otherwise the current status."""
        moved, status = self.transition(
            job_id, "canceled", allowed_from=("queued",), finished_at=now_iso(),
            error={"code": "canceled", "message": "canceled before it started"},
        )  # fmt: skip
        if moved:
            return "canceled"
        if status == "running":
            # Racing a finishing worker is harmless: the flag on a finished job is never read.
            self.redis.hset(self.job_key(job_id), "cancel_requested", "1")
            return "requested"
        return status

    # -- the running job
    def report_progress(
        self, job_id: str, progress: dict[str, Any], *, run: str | None = None
    ) -> bool:
        """Publish progress; returns True when the job should stop (cancel requested, the
        record is no longer running, or no longer held by ``run``). One round trip, so it can
        run at every module."""
        payload = json.dumps(progress, separators=(",", ":"))
        return bool(self._progress(keys=[self.job_key(job_id)], args=[payload, run or ""]))

    def should_stop(self, job_id: str, *, run: str | None = None) -> bool:
        status, flag, holder = self.redis.hmget(
            self.job_key(job_id), "status", "cancel_requested", "run"
        )
        replaced = run is not None and holder != run.encode()
        return flag == b"1" or status != b"running" or replaced

    def _observe_merge_seconds(self, seconds: float) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            for bound in MERGE_SECONDS_BUCKETS:
                if seconds <= bound:
                    pipe.hincrby(self.stats_key, f"merge_seconds_le:{bound}", 1)
            pipe.hincrbyfloat(self.stats_key, "merge_seconds_sum", seconds)
            pipe.hincrby(self.stats_key, "merge_seconds_count", 1)
            pipe.execute()
