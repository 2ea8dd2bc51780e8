"""``coremerge worker``: an RQ worker that runs merges (and its container health check).

    coremerge worker [--burst] [--max-jobs N]            an RQ worker running merges
    coremerge worker --healthcheck                       is this host's worker registered?

Configuration comes from ``COREMERGE_*`` variables (``jobs.settings.Settings``). Heavy
imports (rq, boto3, torch) happen inside the command, so ``coremerge merge`` does not pay for
them.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]

EXIT_FAILED = 1


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
    import os

    from jobs.logs import configure_logging  # JSON lines (or text), job_id and tenant
    from jobs.settings import Settings

    settings = Settings()
    if args.healthcheck:
        return _worker_health(settings)
    configure_logging(settings.log_level, settings.log_format)
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
    if settings.worker_preload:
        from worker.job import preload  # imports torch; CUDA stays uninitialised

        preload(settings)

    from redis import Redis
    from rq.serializers import JSONSerializer

    from jobs.queue import make_queue
    from worker.rq_worker import MergeWorker, heartbeat_interval, on_work_horse_killed

    redis = Redis.from_url(settings.redis_url, **settings.redis_kwargs)
    rq_worker = MergeWorker(
        [make_queue(redis, settings)],
        name=args.name,
        connection=redis,
        serializer=JSONSerializer,
        worker_ttl=settings.worker_ttl,
        job_monitoring_interval=heartbeat_interval(settings),
        maintenance_interval=settings.maintenance_interval,
        work_horse_killed_handler=on_work_horse_killed,
    )
    rq_worker.work(burst=args.burst, max_jobs=args.max_jobs, logging_level=settings.log_level)
    return 0


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
