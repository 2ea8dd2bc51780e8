"""``coremerge worker``: an RQ worker that runs merges (and its container health check).

    coremerge worker [--burst] [--max-jobs N]            an RQ worker running merges
    coremerge worker --healthcheck                       is this host's worker registered?

Configuration comes from ``COREMERGE_*`` variables (``jobs.settings.Settings``). Heavy
imports (rq, boto3, torch) happen inside the command, so ``coremerge merge`` does not pay for
them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register"]

EXIT_FAILED = 1
EXIT_USAGE = 2


def register(subparsers: Any) -> None:
    """Add ``worker`` to ``subparsers``."""
    worker = subparsers.add_parser("worker", help="run an RQ worker that performs merges")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.add_argument(
        "--max-jobs", type=int, help="exit after this many jobs (a supervisor restarts it)"
    )
    worker.add_argument("--name", help="the worker's name in RQ (default: random)")
    worker.add_argument(
        "--healthcheck",
        action="store_true",
        help="exit 0 if a worker of this host is registered in Redis (container health check)",
    )
    worker.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    """Load the settings, prepare this process for forking work horses, refuse an unsafe
    store, then serve the queue until told to stop (or, with ``--burst``, until it is empty)."""
    from jobs.settings import ConfigError, load_settings

    try:
        settings = load_settings()
    except ConfigError as exc:  # one line naming the variable, exit 2
        print(f"coremerge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.healthcheck:
        return _worker_health(settings)
    _prepare_parent(settings)
    refused = _unsafe_store(settings)
    if refused is not None:
        print(f"coremerge worker: {refused}", file=sys.stderr)
        return EXIT_FAILED
    _serve(settings, args)
    return 0


def _prepare_parent(settings: Any) -> None:
    """Logging, the configuration in the log, and the parent process set up so that each
    forked work horse starts fast and owns its CUDA context alone."""
    import logging
    import os

    from jobs.logs import configure_logging  # JSON lines (or text), job_id and tenant
    from jobs.settings import configuration_lines, unknown_variables

    configure_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("coremerge.worker")
    for line in configuration_lines(settings, "worker"):
        log.info("%s", line)
    for warning in unknown_variables():
        log.warning("%s", warning)
    # CUDA and fork: RQ's forking ``Worker`` runs each job in a fresh child (the "work horse"),
    # and CUDA cannot be used in a child forked from a process that initialised it. So this
    # parent never initialises CUDA: it may *import* torch (settings.worker_preload: each job
    # then starts without paying for the import), which touches no GPU, and the NVML-based
    # check below keeps even torch.cuda.is_available() from creating a context. Each horse
    # initialises CUDA for itself and frees it all when it exits, so a leak or a poisoned
    # context cannot outlive one job. Not ``SimpleWorker`` (jobs in this process: one CUDA
    # context for its whole life, no heartbeat during a job, stop commands ignored), and not
    # ``SpawnWorker`` (a fresh interpreter per job, which would import torch for every job).
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    # Freed look-ahead spans and upload parts go back to the system, not into malloc's
    # arenas (worker/allocator.py); the work horses inherit it.
    from worker.allocator import return_freed_memory

    return_freed_memory()
    if settings.worker_preload:
        from worker.job import preload  # imports torch; CUDA stays uninitialised

        preload(settings)


def _serve(settings: Any, args: argparse.Namespace) -> None:
    """The RQ worker on the fair queue, after the scratch left by killed attempts is swept."""
    from redis import Redis
    from rq.serializers import JSONSerializer

    from jobs.queue import MergeQueue, make_queue
    from worker.rq_worker import MergeWorker, heartbeat_interval, on_work_horse_killed

    redis = Redis.from_url(settings.redis_url, **settings.redis_kwargs)
    _sweep_dead_attempts(settings, redis)
    rq_worker = MergeWorker(
        [make_queue(redis, settings)],
        name=args.name,
        connection=redis,
        serializer=JSONSerializer,
        queue_class=MergeQueue,  # a retried job goes back to its fair place too
        worker_ttl=settings.worker_ttl,
        job_monitoring_interval=heartbeat_interval(settings),
        maintenance_interval=settings.maintenance_interval,
        work_horse_killed_handler=on_work_horse_killed,
    )
    rq_worker.work(burst=args.burst, max_jobs=args.max_jobs, logging_level=settings.log_level)


def _unsafe_store(settings: Any) -> str | None:
    """Why this worker must not start: a bucket it would publish to (a tenant's ``allow``
    prefix) that ignores conditional writes, so publishing could overwrite data. A bucket
    that cannot be probed now is logged and left to the check every job makes."""
    import logging
    import uuid

    from jobs.errors import MergeError
    from jobs.tenants import load_tenants
    from jobs.uris import parse_uri
    from worker.storage import S3Store, conditional_writes_honoured, make_s3_client

    log = logging.getLogger("coremerge.worker")
    prefixes = {}
    for tenant in load_tenants(settings.tenants_file, warn_open=False).all():
        for prefix in tenant.allow or ():
            loc = parse_uri(prefix)
            if loc.scheme == "s3":
                prefixes.setdefault(loc.bucket, loc.key)
    if not prefixes:
        log.info("no S3 output prefix configured: conditional writes are checked by each job")
        return None
    client = make_s3_client(settings)
    for bucket, key in sorted(prefixes.items()):
        probe = f"{key}.coremerge-probe-{uuid.uuid4().hex}"
        try:
            honoured = conditional_writes_honoured(S3Store(client, bucket), probe)
        except MergeError as exc:
            log.warning("could not probe s3://%s/ for conditional writes (%s)", bucket, exc.code)
            continue
        if not honoured:
            return (
                f"s3://{bucket}/ ignores conditional writes (If-None-Match: *): publishing there "
                "could overwrite data; use a store that honours them (see docs/deploy.md)"
            )
    return None


def _sweep_dead_attempts(settings: Any, redis: Any) -> None:
    """Remove the scratch folders that attempts killed on this machine left behind."""
    from jobs.records import JobStore
    from jobs.status import JobStatus
    from worker.workdir import sweep_dead_attempts

    store = JobStore(redis, key_prefix=settings.key_prefix, result_ttl=settings.result_ttl)

    def running(job_id: str) -> bool:
        record = store.get(job_id)
        return record is not None and record.status == JobStatus.RUNNING

    sweep_dead_attempts(settings.work_dir, running)


def _worker_health(settings: Any) -> int:
    """0 when an RQ worker of this host is registered (its registration expires when its
    heartbeats stop), 1 otherwise."""
    import socket

    from redis import Redis
    from rq import Worker

    redis = Redis.from_url(settings.redis_url, **settings.redis_kwargs)
    host = socket.gethostname()
    alive = [w.name for w in Worker.all(connection=redis) if w.hostname == host]
    print(f"workers on {host}: {', '.join(alive) or 'none'}")
    return 0 if alive else EXIT_FAILED
