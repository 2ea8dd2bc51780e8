"""Job records in Redis: the job of docs/job-spec.md, its status machine, progress, result, error.

RQ carries the work; this record is what clients read. Keys (defined here only)::

    {prefix}:job:{id}                     hash: status, tenant, request, progress, result, …
    {prefix}:tenant:{name}:jobs           sorted set: the tenant's job keys by creation time
    {prefix}:tenant:{name}:status:{s}     sorted set: the same, only those in status s
    {prefix}:tenant:{name}:submits        sorted set: job ids by submission time, last minute
    {prefix}:accepting                    sorted set: keyed jobs created but not yet queued
    {prefix}:stats                        hash: jobs entered per status, active counts, merge seconds

The indexes change in the same Lua script as the record (``jobs.scripts``), so a listing by
status reads only that status's index, and a tenant's active jobs (its ``queued`` and
``running`` index sizes) are what the quota in :meth:`JobStore.create` counts.

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
import logging
import secrets
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jobs import scripts
from jobs.errors import Canceled
from jobs.status import ACTIVE, STATUSES, TERMINAL, JobStatus

log = logging.getLogger("coremerge.records")

__all__ = [
    "ACTIVE",
    "MERGE_SECONDS_BUCKETS",
    "STATUSES",
    "TERMINAL",
    "JobRecord",
    "JobStatus",
    "JobStore",
    "QuotaExceeded",
    "fingerprint",
    "job_id_for",
]

#: Upper bounds (seconds) of the merge-time histogram exposed at /metrics.
MERGE_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: A record still marked "accepting" this long after creation was left by a crashed request.
ACCEPT_STALE_S = 30.0

_JSON_FIELDS = ("request", "progress", "result", "error", "notification")
#: A JSON field (request, result, error) longer than this is stored zlib-compressed, as
#: ``<name>_z``: a spec of 64 adapters with long URIs is most of a record's bytes, and URIs
#: compress well (a maximal record: docs/service.md, "Redis").
COMPRESS_OVER = 1024
#: A job error's message is cut to this many characters (a record's size stays bounded
#: whatever a worker or an exception had to say).
MAX_ERROR_MESSAGE = 2000
#: Seconds over which ``submits_per_minute`` counts submissions (a sliding window).
SUBMIT_WINDOW_S = 60
#: Retry-After (seconds) of a submission refused because the tenant has too many active jobs:
#: a slot frees when any of them ends, which cannot be predicted.
ACTIVE_RETRY_AFTER_S = 5


class QuotaExceeded(Exception):
    """A submission refused by a per-tenant quota (HTTP 429): ``limit`` is
    ``max_active_jobs`` or ``submits_per_minute``, ``retry_after`` whole seconds."""

    def __init__(self, limit: str, retry_after: int, message: str) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after = retry_after
        self.message = message


def _json_field(name: str, value: dict[str, Any]) -> tuple[str, str | bytes]:
    """How a JSON field is stored: ``(name, json)``, or ``(name_z, zlib(json))`` when long."""
    text = json.dumps(value, separators=(",", ":"))
    if len(text) > COMPRESS_OVER:
        return f"{name}_z", zlib.compress(text.encode(), 6)
    return name, text


def _summary_fields(request: dict[str, Any]) -> dict[str, str]:
    """What a listing shows of the request (``jobs.listing``), kept beside it so a listing
    never reads the request itself: method, space, adapter count and output location."""
    return {
        "method": str(request.get("method", "")),
        "space": str(request.get("space", "")),
        "adapters": str(len(request.get("adapters", []))),
        "output_uri": str((request.get("output") or {}).get("uri", "")),
    }


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
    updated_at: str | None = None
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    accepting_since: float | None = None
    attempts: int = 0
    run: str | None = None
    # The job's secret nonce, which tags the objects it writes at its output (made by the
    # worker on the first run: worker.storage.ownership); never shown by the API.
    output_secret: str | None = None
    # How the completion notification went (``jobs.notify``), once it was tried.
    notification: dict[str, Any] | None = None

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> JobRecord:
        raw = dict(raw)
        packed = {name: raw.pop(f"{name}_z".encode(), None) for name in _JSON_FIELDS}
        d = {k.decode(): v.decode() for k, v in raw.items()}
        for name, value in packed.items():
            if value is not None:
                d[name] = zlib.decompress(value).decode()
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
            updated_at=d.get("updated_at"),
            progress=d["progress"],
            result=d["result"],
            error=d["error"],
            cancel_requested=d.get("cancel_requested") == "1",
            accepting_since=float(d["accepting"]) if "accepting" in d else None,
            attempts=int(d.get("attempts", 0)),
            run=d.get("run"),
            output_secret=d.get("output_secret"),
            notification=d["notification"],
        )


class JobStore:
    """Job records of one deployment (``key_prefix``) in one Redis.

    ``max_active_jobs`` and ``submits_per_minute`` are the per-tenant quotas that
    :meth:`create` enforces (``None``: no limit; the worker's store creates nothing), and
    ``max_stored_jobs`` the records a tenant keeps: beyond it, :meth:`create` deletes the
    tenant's oldest finished records, so submitting and cancelling cannot fill Redis."""

    def __init__(
        self,
        redis: Any,
        *,
        key_prefix: str = "coremerge",
        result_ttl: int = 604_800,
        max_active_jobs: int | None = None,
        submits_per_minute: int | None = None,
        max_stored_jobs: int | None = None,
        on_final: Callable[[JobStore, str], None] | None = None,
    ) -> None:
        self.redis = redis
        #: Called with (store, job id) after a transition into a final status
        #: (``jobs.notify.Notifier``); what it raises is logged, never the caller's problem.
        self.on_final = on_final
        self.prefix = key_prefix
        self.result_ttl = result_ttl
        self.max_active_jobs = max_active_jobs
        self.submits_per_minute = submits_per_minute
        self.max_stored_jobs = max_stored_jobs
        self._transition = redis.register_script(scripts.TRANSITION)
        self._create = redis.register_script(scripts.CREATE)
        self._quota = redis.register_script(scripts.QUOTA)
        self._discard = redis.register_script(scripts.DISCARD)
        self._commit = redis.register_script(scripts.COMMIT)
        self._request_cancel = redis.register_script(scripts.REQUEST_CANCEL)
        self._progress = redis.register_script(scripts.PROGRESS)
        self._claim_stale = redis.register_script(scripts.CLAIM_STALE)

    # -- keys
    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def tenant_key(self, tenant: str) -> str:
        """The index of all the tenant's jobs."""
        return f"{self.prefix}:tenant:{tenant}:jobs"

    def status_key(self, tenant: str, status: str) -> str:
        """The index of the tenant's jobs in ``status``."""
        return f"{self.prefix}:tenant:{tenant}:status:{status}"

    def submits_key(self, tenant: str) -> str:
        """The tenant's submissions of the last minute (for ``submits_per_minute``)."""
        return f"{self.prefix}:tenant:{tenant}:submits"

    @property
    def accepting_key(self) -> str:
        """Keyed jobs whose record exists but whose enqueueing was not confirmed yet."""
        return f"{self.prefix}:accepting"

    @property
    def stats_key(self) -> str:
        return f"{self.prefix}:stats"

    def _indexes(self, tenant: str) -> list[str]:
        """The tenant's six indexes, in the order ``jobs.scripts`` expects them."""
        return [self.tenant_key(tenant), *(self.status_key(tenant, s) for s in STATUSES)]

    # -- reading
    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(self.job_key(job_id))
        return JobRecord.from_hash(raw) if raw else None

    def stats(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.redis.hgetall(self.stats_key).items()}

    # -- quotas
    def _quota_args(self) -> list[Any]:
        return [
            self.max_active_jobs or 0,
            self.submits_per_minute or 0,
            SUBMIT_WINDOW_S * 1000,
            ACTIVE_RETRY_AFTER_S,
        ]

    def _refused(self, code: int, retry_after: int) -> QuotaExceeded:
        if code == -1:
            return QuotaExceeded(
                "max_active_jobs",
                retry_after,
                f"this tenant already has {self.max_active_jobs} jobs queued or running, its "
                "limit (COREMERGE_MAX_ACTIVE_JOBS); retry when one has ended",
            )
        return QuotaExceeded(
            "submits_per_minute",
            retry_after,
            f"this tenant submitted {self.submits_per_minute} jobs in the last minute, its "
            f"limit (COREMERGE_SUBMITS_PER_MINUTE); retry in {retry_after} s",
        )

    def quota_refusal(self, tenant: str) -> QuotaExceeded | None:
        """Whether a submission by ``tenant`` would be refused now (it creates nothing). A
        cheap look before a transaction that would queue the job; :meth:`create` decides."""
        if not (self.max_active_jobs or self.submits_per_minute):
            return None
        keys = [
            self.status_key(tenant, JobStatus.QUEUED),
            self.status_key(tenant, JobStatus.RUNNING),
            self.submits_key(tenant),
        ]
        code, retry_after = self._quota(keys=keys, args=self._quota_args())
        return None if code == 1 else self._refused(int(code), int(retry_after))

    # -- creating
    def create(
        self, job_id: str, tenant: str, request: dict[str, Any], *, pipeline: Any = None
    ) -> JobRecord | None:
        """Create a queued record; ``None`` when the id exists already (whatever the quotas
        say: a repeat gets its job back). Raises :class:`QuotaExceeded` when the tenant is at
        one of its limits; the check and the creation are one script, so concurrent
        submissions cannot overshoot.

        Without ``pipeline`` the record is marked *accepting* until :meth:`mark_accepted`
        (the caller queues the job in between; :meth:`claim_stale_accepting` finds it should
        the caller die there). With one, the creation is only added to that transaction,
        which must also queue the job: for ids that cannot collide (random ones), record and
        queue entry then appear together or not at all. The script's answer is then among
        the transaction's results: pass it to :meth:`created`, which raises
        :class:`QuotaExceeded` if the record was refused (the caller must then take the job
        back out of the queue).
        """
        created_at = now_iso()
        digest = fingerprint(request)
        fields: dict[str, str | bytes] = {
            "id": job_id,
            "tenant": tenant,
            "status": JobStatus.QUEUED,
            "created_at": created_at,
            "updated_at": created_at,
            "fingerprint": digest,
        }
        stored, payload = _json_field("request", request)
        fields[stored] = payload
        fields.update(_summary_fields(request))
        accepting = None
        if pipeline is None:
            accepting = time.time()
            fields["accepting"] = repr(accepting)
        args = [
            repr(time.time()),
            *self._quota_args(),
            self.max_stored_jobs or 0,
            fields.get("accepting", ""),
            *(x for kv in fields.items() for x in kv),
        ]
        keys = [
            self.job_key(job_id),
            self.stats_key,
            *self._indexes(tenant),
            self.submits_key(tenant),
            self.accepting_key,
        ]
        record = JobRecord(job_id, tenant, JobStatus.QUEUED, created_at, request, digest,
                           updated_at=created_at, accepting_since=accepting)  # fmt: skip
        if pipeline is not None:
            self._create(keys=keys, args=args, client=pipeline)
            return record
        return record if self.created(self._create(keys=keys, args=args)) else None

    def created(self, answer: Any) -> bool:
        """The create script's ``answer``: True created, False the id existed; raises
        :class:`QuotaExceeded` when a quota refused it."""
        code, retry_after = (int(x) for x in answer)
        if code < 0:
            raise self._refused(code, retry_after)
        return code == 1

    def mark_accepted(self, job_id: str) -> None:
        """The job is in the queue: a repeat of its request now gets it back (not 409)."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.job_key(job_id), "accepting")
            pipe.zrem(self.accepting_key, self.job_key(job_id))
            pipe.execute()

    def discard(self, job_id: str, tenant: str) -> None:
        """Undo :meth:`create` when the job could not be queued."""
        keys = [
            self.job_key(job_id),
            self.stats_key,
            *self._indexes(tenant),
            self.submits_key(tenant),
            self.accepting_key,
        ]
        self._discard(keys=keys, args=[job_id])

    def claim_stale_accepting(self, older_than: float, *, limit: int = 100) -> list[str]:
        """Ids of keyed jobs marked *accepting* for over ``older_than`` seconds: their API
        request died between creating the record and queueing the job. Each is handed to one
        caller only (its mark is moved to now; it comes back after ``older_than`` again if
        that caller dies too). The caller queues it and calls :meth:`mark_accepted`."""
        now = time.time()
        keys = self._claim_stale(
            keys=[self.accepting_key], args=[repr(now - older_than), repr(now), limit]
        )
        marker = f"{self.prefix}:job:"
        return [k.decode().removeprefix(marker) for k in keys]

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
        fields.setdefault("updated_at", now_iso())
        ttl = self.result_ttl if to in TERMINAL else 0
        args: list[Any] = [to, "," + ",".join(allowed_from) + ",", ttl, fence or ""]
        for name, value in fields.items():
            if value is None:
                args += [name, ""]
            elif isinstance(value, dict):
                stored, payload = _json_field(name, value)
                other = f"{name}_z" if stored == name else name
                args += [stored, payload, other, ""]  # and never both spellings at once
            else:
                args += [name, str(value)]
        # The tenant names the indexes the script moves the job between; a job's tenant never
        # changes, so reading it first cannot race with anything.
        tenant = self.redis.hget(self.job_key(job_id), "tenant")
        if tenant is None:
            return False, None
        keys = [self.job_key(job_id), self.stats_key, *self._indexes(tenant.decode())]
        moved, status = self._transition(keys=keys, args=args)
        status = status.decode() if isinstance(status, bytes) else status
        if moved and to in TERMINAL and self.on_final is not None:
            try:
                self.on_final(self, job_id)
            except Exception:
                log.exception("job %s: the final-status hook failed", job_id)
        return bool(moved), (status or None)

    def record_notification(self, job_id: str, outcome: dict[str, Any]) -> None:
        """Keep how the completion notification went on the job's record (never recreating a
        record that expired or was deleted meanwhile); the status does not change."""
        key = self.job_key(job_id)
        if self.redis.exists(key):
            self.redis.hset(key, "notification", json.dumps(outcome))

    def start(self, job_id: str) -> str | None:
        """queued → running, by the worker: returns this run's token (pass it to the calls
        below), or ``None`` when the job was canceled (or vanished) meanwhile."""
        record = self.get(job_id)
        attempts = (record.attempts if record else 0) + 1
        token = uuid.uuid4().hex
        moved, _ = self.transition(
            job_id, JobStatus.RUNNING, allowed_from=(JobStatus.QUEUED,),
            started_at=now_iso(), attempts=attempts, run=token,
            progress={"stage": "download", "modules_done": 0, "modules_total": 0},
        )  # fmt: skip
        return token if moved else None

    def output_secret(self, job_id: str) -> str | None:
        """The job's secret nonce for tagging its output objects: made on first use and
        kept with the record for every later run (None when the record is gone). Called by
        the worker while its run holds the ``running`` record, which has no expiry, so the
        field never outlives the record."""
        key = self.job_key(job_id)
        if not self.redis.exists(key):
            return None
        self.redis.hsetnx(key, "output_secret", secrets.token_hex(32))
        value = self.redis.hget(key, "output_secret")
        return value.decode() if value is not None else None

    def requeue(self, job_id: str, reason: str) -> bool:
        """running → queued: the worker died and RQ runs the job again. The run token goes, so
        the old run (should it still be alive somewhere) can no longer touch the record."""
        moved, _ = self.transition(
            job_id, JobStatus.QUEUED, allowed_from=(JobStatus.RUNNING,), progress=None,
            requeued_because=reason,
            run=None,
        )  # fmt: skip
        if moved:
            self.redis.hincrby(self.stats_key, "requeued", 1)
        return moved

    def succeed(self, job_id: str, result: dict[str, Any], *, run: str | None = None) -> bool:
        """running → succeeded; with ``run``, only while that run holds the record."""
        moved, _ = self.transition(
            job_id, JobStatus.SUCCEEDED, allowed_from=(JobStatus.RUNNING,), fence=run,
            result=result,
            finished_at=now_iso(),
        )  # fmt: skip
        if moved:
            self._observe_merge_seconds(float(result.get("seconds", 0.0)))
        return moved

    def fail(self, job_id: str, code: str, message: str, *, run: str | None = None) -> bool:
        """running (or queued) → failed, or → canceled when ``code`` is ``canceled``; with
        ``run``, only while that run holds the record (a replaced run ends nothing)."""
        to = JobStatus.CANCELED if code == Canceled.code else JobStatus.FAILED
        if len(message) > MAX_ERROR_MESSAGE:
            message = message[: MAX_ERROR_MESSAGE - 1] + "…"
        moved, _ = self.transition(
            job_id, to, allowed_from=(JobStatus.RUNNING,) if run else ACTIVE, fence=run,
            finished_at=now_iso(), error={"code": code, "message": message},
        )  # fmt: skip
        if moved:
            self.redis.hincrby(self.stats_key, f"error:{code}", 1)
        return moved

    def cancel(self, job_id: str) -> str | None:
        """DELETE: a queued job is canceled at once ("canceled"); a running one gets the flag
        its worker checks between modules ("requested"). Otherwise the current status."""
        moved, status = self.transition(
            job_id, JobStatus.CANCELED, allowed_from=(JobStatus.QUEUED,), finished_at=now_iso(),
            error={"code": Canceled.code, "message": "canceled before it started"},
        )  # fmt: skip
        if moved:
            self.redis.hincrby(self.stats_key, f"error:{Canceled.code}", 1)
            return JobStatus.CANCELED
        if status != JobStatus.RUNNING:
            return status
        # One script, so that it and the worker's commit (before the report) cannot cross:
        # either the flag is set first and the worker stops, or the report is being written
        # and the cancel is refused ("committing").
        outcome = self._request_cancel(keys=[self.job_key(job_id)])
        outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
        return outcome or None

    def commit(self, job_id: str, *, run: str) -> bool:
        """The worker is about to write the report: True when it may (from now on a cancel is
        refused), False when it must stop (canceled first, or this run was replaced)."""
        return bool(self._commit(keys=[self.job_key(job_id)], args=[run]))

    # -- the running job
    def report_progress(
        self, job_id: str, progress: dict[str, Any], *, run: str | None = None
    ) -> bool:
        """Publish progress; returns True when the job should stop (cancel requested, the
        record is no longer running, or no longer held by ``run``). One round trip, so it can
        run at every module."""
        payload = json.dumps(progress, separators=(",", ":"))
        args = [payload, run or "", now_iso()]
        return bool(self._progress(keys=[self.job_key(job_id)], args=args))

    def should_stop(self, job_id: str, *, run: str | None = None) -> bool:
        status, flag, holder = self.redis.hmget(
            self.job_key(job_id), "status", "cancel_requested", "run"
        )
        replaced = run is not None and holder != run.encode()
        return flag == b"1" or status != JobStatus.RUNNING.encode() or replaced

    def _observe_merge_seconds(self, seconds: float) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            for bound in MERGE_SECONDS_BUCKETS:
                if seconds <= bound:
                    pipe.hincrby(self.stats_key, f"merge_seconds_le:{bound}", 1)
            pipe.hincrbyfloat(self.stats_key, "merge_seconds_sum", seconds)
            pipe.hincrby(self.stats_key, "merge_seconds_count", 1)
            pipe.execute()
