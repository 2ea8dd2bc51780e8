"""The RQ job function: one merge job from its record to its published output.

    run_job(job_id): queued → running → claim the output (refused when it holds others'
    objects) → check inputs → run_merge (layer by layer, in a temp dir, S3 inputs read as
    it goes) → publish (report last) → succeeded | failed | canceled

Every outcome is written to the job record here, in one place: a ``MergeError`` becomes the
job's error with its code, RQ's timeout becomes ``timeout``, anything else ``internal`` (its
traceback goes to the worker's log, never to the client). The function then returns
normally, so RQ never retries a merge that failed: RQ's ``Retry`` re-runs only a job whose
worker died (``jobs.queue``). Nothing is visible at the output URI unless the job
succeeded. Runs in the forked work horse: this is where torch (and CUDA) is first used.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from redis import Redis
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from jobs.errors import (
    AccessDenied,
    Canceled,
    InternalError,
    JobTimeout,
    LimitExceeded,
    MergeError,
)
from jobs.logs import bind_log_context, log_context
from jobs.notify import Notifier
from jobs.records import JobRecord, JobStore
from jobs.settings import Settings
from jobs.spec import MergeSpec
from jobs.tenants import TenantsFileError, load_tenants, refusal
from jobs.uris import parse_uri
from worker.adapters.format import CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME
from worker.adapters.streamed import ReadAhead
from worker.limits import default_max_work_bytes
from worker.merge.runner import Progress, run_merge
from worker.storage import Owner, Storage, make_s3_client, make_transfer_config
from worker.storage.hub import pinned_spec
from worker.workdir import ATTEMPT_PREFIX, sweep_attempts

__all__ = ["preload", "run_job"]

log = logging.getLogger("coremerge.worker")

#: Seconds past its timeout after which a job stuck in one native call ends its process.
STUCK_GRACE_S = 10
#: Seconds between progress writes / cancel checks (a check at every module would be fine
#: for Redis, but a 10 000-module merge does not need 10 000 writes).
POLL_INTERVAL_S = 0.1


class _Tracker:
    """Publishes progress to the record and answers the runner's ``should_cancel``: stop when
    the job is canceled, or when this run no longer holds the record (it was given up for dead
    and re-queued: another run owns the job now)."""

    def __init__(self, store: JobStore, job_id: str, run: str | None = None) -> None:
        self.store, self.job_id, self.run = store, job_id, run
        self.stop = False
        self._stage = ""
        self._last = 0.0

    def publish(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage == self._stage and done < total and now - self._last < POLL_INTERVAL_S:
            return
        self._stage, self._last = stage, now
        progress = {"stage": stage, "modules_done": done, "modules_total": total}
        self.stop = self.store.report_progress(self.job_id, progress, run=self.run) or self.stop

    def on_progress(self, p: Progress) -> None:
        # The runner's "write" stage is the end of merging; the API's stages are
        # download, plan, merge, upload (docs/job-spec.md).
        self.publish("merge" if p.stage == "write" else p.stage, p.modules_done, p.modules_total)

    def commit(self) -> bool:
        """Right before the report: True to write it (a cancel is refused from now on)."""
        if self.run is None:
            return not self.should_cancel(now=True)
        self.stop = self.stop or not self.store.commit(self.job_id, run=self.run)
        return not self.stop

    def should_cancel(self, *, now: bool = False) -> bool:
        t = time.monotonic()
        if not self.stop and (now or t - self._last >= POLL_INTERVAL_S):
            self._last = t
            self.stop = self.store.should_stop(self.job_id, run=self.run)
        return self.stop


def preload(settings: Settings) -> None:
    """Warm the worker's parent before it forks: this module (and with it torch) is imported
    already; build one S3 client so boto3 and its service model are loaded and cached. No
    CUDA call, no connection: each forked job inherits the imports, not a context."""
    make_s3_client(settings)
    make_transfer_config(settings)


def run_job(job_id: str) -> dict[str, Any] | None:
    """Run the merge job ``job_id`` (RQ calls this). Returns the result, or None. Every line
    logged meanwhile carries the job id and its tenant (``jobs.logs``)."""
    current = get_current_job()
    timeout = current.timeout if current is not None else None
    with log_context(job_id=job_id), _hard_deadline(timeout):
        return _run_job(job_id, timeout)


@contextlib.contextmanager
def _hard_deadline(timeout: float | None) -> Iterator[None]:
    """End this work horse :data:`STUCK_GRACE_S` seconds after the job's timeout if it is
    still running then. RQ's timeout is a signal whose handler runs between two Python
    bytecodes, so a merge inside one long native call (an SVD) would not notice it before
    the call returns, and RQ's own last resort, 60 s later, looks like a dead worker and
    retries the job. faulthandler's watchdog is a native thread: it writes every thread's
    traceback to the worker's log and exits, and the worker then ends the job ``timeout``
    (``worker.rq_worker.on_work_horse_killed``)."""
    if not timeout or timeout <= 0:
        yield
        return
    faulthandler.dump_traceback_later(timeout + STUCK_GRACE_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _run_job(job_id: str, timeout: float | None = None) -> dict[str, Any] | None:
    settings = Settings()
    redis = Redis.from_url(settings.redis_url, **settings.redis_kwargs)
    # The final status is notified in line (jobs.notify): this work horse ends with the job.
    store = JobStore(
        redis, key_prefix=settings.key_prefix, result_ttl=settings.result_ttl,
        on_final=Notifier(settings),
    )  # fmt: skip
    record = store.get(job_id)
    if record is not None:
        bind_log_context(tenant=record.tenant)
    run = store.start(job_id) if record is not None else None
    if run is None:
        log.info("job %s: not started (%s)", job_id, record.status if record else "no record")
        return None
    started = time.perf_counter()
    try:
        result = _merge(record, settings, _Tracker(store, job_id, run), started, run)
    except JobTimeoutException:
        error: MergeError = JobTimeout(
            f"the merge ran over {timeout or settings.job_timeout} s (COREMERGE_JOB_TIMEOUT); "
            "nothing was published"
        )
    except MergeError as exc:
        error = exc
    except Exception as exc:
        log.exception("job %s: internal error", job_id)
        # The exception's text can carry paths or addresses: it goes to the log only.
        error = InternalError(
            f"an internal error ({type(exc).__name__}) ended the merge; nothing was published "
            "and the worker's log has the details"
        )
    else:
        if not store.succeed(job_id, result, run=run):
            log.warning("job %s: finished, but this run no longer held its record", job_id)
        log.info("job %s: succeeded in %.2f s → %s", job_id, result["seconds"], result["uri"])
        return result
    if not store.fail(job_id, error.code, error.message, run=run):
        # Replaced (its worker was given up for dead and the job re-queued): the run that
        # holds the record now decides how the job ends.
        log.warning("job %s: this run was replaced; %s not recorded", job_id, error.code)
    log.warning(
        "job %s: %s after %.2f s: %s", job_id, error.code, time.perf_counter() - started,
        error.message,
    )  # fmt: skip
    return None


def _merge(
    record: JobRecord, settings: Settings, tracker: _Tracker, started: float, run: str
) -> dict[str, Any]:
    spec = MergeSpec.model_validate(record.request)
    _check_request_limits(spec, settings)
    _check_access(record, spec, settings)
    storage = Storage(
        make_s3_client(settings) if _uses_s3(spec) else None,
        transfer_config=make_transfer_config(settings),
        max_job_bytes=settings.max_job_bytes,
        max_adapter_bytes=settings.max_adapter_bytes,
    )
    output_uri = spec.output.uri
    # An earlier attempt of this job killed on this machine (kill -9 runs no clean-up) left
    # its inputs and staged output behind: they would pile up on a long-lived worker.
    sweep_attempts(settings.work_dir, record.id)

    # Before any input is read: an output holding others' objects ends the job here.
    owner = _owner(record, tracker.store)
    publisher = storage.publisher(
        output_uri, owner=owner, run=run, claim_wait_s=2.0 * settings.worker_ttl
    )
    try:
        published = publisher.prepare()
        if published is not None:  # an earlier run of this job published it
            storage.drop_claim(output_uri, owner)  # …maybe before it dropped its claim
            return _result(spec, publisher.read_report(published), output_uri, started)
        with (
            tempfile.TemporaryDirectory(
                prefix=f"{ATTEMPT_PREFIX}{record.id}-", dir=settings.work_dir
            ) as tmp,
            _read_ahead(settings) as read_ahead,
        ):
            tmp_dir = Path(tmp)
            tracker.publish("download", 0, 0)
            # Checked (sizes, headers) now; S3 weights are read while the merge runs.
            inputs = storage.open_inputs([a.uri for a in spec.adapters], tmp_dir / "inputs")
            spec = pinned_spec(spec, storage.hub_inputs)  # the report records the commits
            if tracker.should_cancel():
                raise Canceled("canceled before merging; nothing was published")
            outcome = run_merge(
                spec, inputs, tmp_dir / "merged", device=settings.device,
                on_progress=tracker.on_progress, should_cancel=tracker.should_cancel,
                max_modules=settings.max_modules,
                max_work_bytes=settings.max_work_bytes or default_max_work_bytes(),
                max_output_rank=settings.max_output_rank,
                max_output_bytes=settings.max_output_bytes,
                weights_sink=publisher.weights_sink,  # S3: the weights go up as they are merged
                read_ahead=read_ahead,
            )  # fmt: skip
            tracker.publish("upload", outcome.modules, outcome.modules)
            # A cancel is honoured until the report is written: checked before every file.
            publisher.publish(
                outcome.out_dir,
                should_cancel=lambda: tracker.should_cancel(now=True),
                commit=tracker.commit,
            )
    finally:
        publisher.release()
    return _result(spec, outcome.report, output_uri, started)


def _owner(record: JobRecord, store: JobStore) -> Owner:
    """The job as the owner of its output's objects: its id and the secret nonce in its
    record (``worker.storage.ownership``)."""
    secret = store.output_secret(record.id)
    if secret is None:
        raise InternalError("the job's record vanished while it ran; nothing was published")
    return Owner(record.id, secret)


def _result(spec: MergeSpec, report: dict[str, Any], uri: str, started: float) -> dict[str, Any]:
    base = parse_uri(uri).normalized
    return {
        "uri": base,
        "rank": report["output"]["rank"],
        "modules": report["output"]["modules"],
        "bytes": report["output"]["bytes"],
        "report_uri": f"{base}{REPORT_NAME}",
        "seconds": round(time.perf_counter() - started, 3),
    }


def _read_ahead(settings: Settings) -> ReadAhead:
    """The job's streamed reads of S3 inputs: ``COREMERGE_S3_READ_AHEAD_BYTES`` of look-ahead,
    spans of the S3 part size, ``COREMERGE_S3_MAX_CONCURRENCY`` connections."""
    return ReadAhead(
        settings.s3_read_ahead_bytes,
        span_bytes=settings.s3_multipart_chunksize,
        connections=settings.s3_max_concurrency,
    )


def _uses_s3(spec: MergeSpec) -> bool:
    return any(u.startswith("s3://") for u in [spec.output.uri, *(a.uri for a in spec.adapters)])


def _check_request_limits(spec: MergeSpec, settings: Settings) -> None:
    """The API refused these at submission; the record may come from an older or another API
    (or straight from Redis), so this worker holds the job to its own limits too."""
    if len(spec.adapters) > settings.max_adapters:
        raise LimitExceeded(
            f"{len(spec.adapters)} adapters; this worker takes at most {settings.max_adapters} "
            "(COREMERGE_MAX_ADAPTERS)"
        )
    if isinstance(spec.output.rank, int) and spec.output.rank > settings.max_output_rank:
        raise LimitExceeded(
            f"output.rank {spec.output.rank}; this worker writes at most rank "
            f"{settings.max_output_rank} (COREMERGE_MAX_OUTPUT_RANK)"
        )


def _check_access(record: JobRecord, spec: MergeSpec, settings: Settings) -> None:
    """The API checked these locations at submission; check again with this worker's tenants
    file (it may have changed, and the queue is not a trust boundary)."""
    try:
        tenants = load_tenants(settings.tenants_file, warn_open=False)
    except TenantsFileError as exc:
        log.error("%s; refusing the job", exc)  # the path and the cause, for the operator only
        raise AccessDenied(
            "this worker cannot read its tenants file (COREMERGE_TENANTS_FILE); its log says why"
        ) from None
    tenant = tenants.get(record.tenant)
    if tenant is None:
        raise AccessDenied(f"tenant {record.tenant!r} is not in this worker's tenants file")
    for uri in [*(a.uri for a in spec.adapters), spec.output.uri]:
        output = uri == spec.output.uri
        refused = refusal(
            tenant, uri, allow_file_uris=settings.allow_file_uris, for_output=output,
            process="worker",
        )  # fmt: skip
        if refused is not None:
            raise AccessDenied(refused.message)
        for resolved in _resolved(uri, output):
            if refusal(tenant, resolved, allow_file_uris=True, for_output=output) is not None:
                raise AccessDenied(
                    f"{uri!r}: resolves (through a symbolic link) to a location tenant "
                    f"{record.tenant!r} may not use"
                )


def _resolved(uri: str, output: bool) -> list[str]:
    """Where a ``file://`` location really is: its folder with every symbolic link
    resolved, and an input's two files (a link in the folder could point anywhere); the
    allow-list is checked on these too. Nothing for ``s3://``."""
    loc = parse_uri(uri)
    if loc.scheme != "file":
        return []
    folder = Path(os.path.realpath(loc.path))
    paths = [folder] if output else [folder, *(folder / n for n in (CONFIG_NAME, WEIGHTS_NAME))]
    return [f"file://{os.path.realpath(p)}/" for p in paths]
