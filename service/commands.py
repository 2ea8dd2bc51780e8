"""The service's ``coremerge`` subcommands; ``worker.cli`` calls :func:`register`.

    coremerge serve [--host 127.0.0.1] [--port 8000] [--allow-open-non-loopback]
                                                         the HTTP API (uvicorn)
    coremerge submit SPEC.json [--wait [--timeout S]] [--idempotency-key K]
    coremerge submit --config merge.yml --output s3://bucket/prefix/ [--wait] …
                                                         a mergekit-style configuration
    coremerge status ID | cancel ID | list [--status S] [--limit N] | fetch ID DIR
    coremerge hash-key < key                             the sha256 for the tenants file

Without a tenants file the API is open (no keys), so ``serve`` then refuses any address but
a loopback one unless ``--allow-open-non-loopback`` says that is meant.

Configuration comes from ``COREMERGE_*`` variables (``jobs.settings.Settings``). Heavy
imports (fastapi, uvicorn, httpx) happen inside the commands, so
``coremerge merge`` does not pay for them.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.status import ACTIVE, STATUSES, JobStatus

__all__ = ["register"]

EXIT_FAILED = 1
EXIT_USAGE = 2
#: ``submit --wait --timeout``: the job had not ended when the time was up (as timeout(1)).
EXIT_WAIT_TIMEOUT = 124
#: Seconds a job may wait queued under ``submit --wait`` before the CLI looks for workers.
NO_WORKER_HINT_AFTER_S = 10.0


def register(subparsers: Any) -> None:
    """Add ``serve``, ``submit``, the job commands and ``hash-key`` to ``subparsers``."""
    _add_serve(subparsers)
    _add_submit(subparsers)
    _add_job_commands(subparsers)
    hash_key = subparsers.add_parser(
        "hash-key", help="read an API key on stdin, print its sha256 for the tenants file"
    )
    hash_key.set_defaults(func=cmd_hash_key)


def _add_serve(subparsers: Any) -> None:
    """``serve``: the HTTP API, bound to loopback unless told otherwise."""
    serve = subparsers.add_parser("serve", help="run the HTTP API (uvicorn)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default loopback: 127.0.0.1)"
    )
    serve.add_argument(
        "--port",
        type=int,
        help="port (default: the port of COREMERGE_API_URL, 8000 unless set, where the client "
        "commands look for the API)",
    )
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument(
        "--allow-open-non-loopback",
        action="store_true",
        help="without a tenants file (open mode: no keys), bind a non-loopback --host anyway",
    )
    serve.set_defaults(func=_configured(cmd_serve))


def _add_submit(subparsers: Any) -> None:
    """``submit``: a job spec (or a mergekit configuration) to the service."""
    submit = subparsers.add_parser("submit", help="submit a job spec to the service")
    submit.add_argument(
        "spec", nargs="?", metavar="SPEC.json", help="a job spec (docs/job-spec.md)"
    )
    submit.add_argument(
        "--config",
        metavar="MERGE_YML",
        help="a mergekit-style merge configuration instead of SPEC.json (docs/mergekit.md)",
    )
    submit.add_argument(
        "-o", "--output", metavar="URI", help="with --config: where the merged adapter goes"
    )
    submit.add_argument("--wait", action="store_true", help="show progress until it ends")
    submit.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help=f"with --wait: give up waiting after this long (exit {EXIT_WAIT_TIMEOUT}; the job "
        "goes on)",
    )
    submit.add_argument("--idempotency-key", help="a retried submit returns the same job")
    submit.add_argument("--url", help="the service (default COREMERGE_API_URL)")
    submit.set_defaults(func=_configured(cmd_submit))


def _add_job_commands(subparsers: Any) -> None:
    """``status``, ``cancel``, ``list`` and ``fetch``: one job, or your jobs, by ID."""
    status = subparsers.add_parser("status", help="show a job")
    status.add_argument("job_id", metavar="ID")
    status.add_argument("--url", help="the service (default COREMERGE_API_URL)")
    status.set_defaults(func=_configured(cmd_status))

    cancel = subparsers.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id", metavar="ID")
    cancel.add_argument("--url", help="the service (default COREMERGE_API_URL)")
    cancel.set_defaults(func=_configured(cmd_cancel))

    listing = subparsers.add_parser("list", help="list your jobs, newest first (summaries)")
    listing.add_argument("--status", choices=STATUSES)
    listing.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    listing.add_argument("--url", help="the service (default COREMERGE_API_URL)")
    listing.set_defaults(func=_configured(cmd_list))

    fetch = subparsers.add_parser("fetch", help="download a succeeded job's merged adapter")
    fetch.add_argument("job_id", metavar="ID")
    fetch.add_argument("dest", metavar="DIR", help="a folder that does not exist yet (or is empty)")
    fetch.add_argument("--url", help="the service (default COREMERGE_API_URL)")
    fetch.set_defaults(func=_configured(cmd_fetch))


def _settings() -> Any:
    """The settings; a bad ``COREMERGE_*`` value raises ``ConfigError`` naming it, which
    :func:`_configured` turns into one line and exit status 2."""
    from jobs.settings import load_settings

    return load_settings()


def _configured(command: Any) -> Any:
    """``command``, with a configuration error reported as one line and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        from jobs.settings import ConfigError

        try:
            return command(args)
        except ConfigError as exc:
            print(f"coremerge: {exc}", file=sys.stderr)
            return EXIT_USAGE

    return run


def _configure_logging(settings: Any, process: str = "api") -> None:
    """JSON lines (or text) with job_id and tenant; then the effective configuration and a
    warning for each ``COREMERGE_*`` variable that is no setting."""
    import logging

    from jobs.logs import configure_logging
    from jobs.settings import configuration_lines, unknown_variables

    configure_logging(settings.log_level, settings.log_format)
    log = logging.getLogger(f"coremerge.{process}")
    for line in configuration_lines(settings, process):
        log.info("%s", line)
    for warning in unknown_variables():
        log.warning("%s", warning)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the API on this machine: ``localhost`` or a loopback
    address (127.0.0.0/8, ::1). Anything else, ``0.0.0.0`` and host names included, may be
    reachable from elsewhere."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings()
    if (
        settings.tenants_file is None
        and not is_loopback(args.host)
        and not args.allow_open_non_loopback
    ):
        print(
            f"coremerge: error: refusing to serve without a tenants file on {args.host!r}, "
            "a non-loopback address: anyone reaching it could run merges. Set "
            "COREMERGE_TENANTS_FILE, bind 127.0.0.1, or pass --allow-open-non-loopback",
            file=sys.stderr,
        )
        return EXIT_USAGE

    import uvicorn

    from service.app import create_app

    _configure_logging(settings)
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port if args.port is not None else _api_port(settings.api_url),
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's loggers go through the root handler of jobs.logs
        access_log=args.access_log,
    )
    return 0


def _api_port(api_url: str) -> int:
    """The port ``serve`` listens on by default: COREMERGE_API_URL's, so that ``serve`` and
    the client commands of one machine agree through one variable."""
    from urllib.parse import urlsplit

    parts = urlsplit(api_url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return port or (443 if parts.scheme == "https" else 8000)


class Unreachable(Exception):
    """The API did not answer at its URL (a refused connection, a timeout, a bad name)."""


def _client(args: argparse.Namespace) -> Any:
    """A client for ``--url`` or COREMERGE_API_URL, once the API answers there: a refused
    connection is retried for COREMERGE_API_WAIT seconds (an API started a moment ago, as in
    the quickstart, is still importing), saying so on stderr; then :class:`Unreachable`
    names the URL and where it came from."""
    import httpx

    from service.client import ApiError, CoremergeClient

    settings = _settings()
    key = settings.api_key.get_secret_value() if settings.api_key else None
    url = args.url or settings.api_url
    source = "--url" if args.url else "COREMERGE_API_URL"
    client = CoremergeClient(url, key)
    deadline = time.monotonic() + settings.api_wait
    said = False
    while True:
        try:
            client.health()
            return client
        except ApiError:  # something answers there: the command's own call will say what
            return client
        except httpx.TransportError as exc:
            if not isinstance(exc, httpx.ConnectError) or time.monotonic() > deadline:
                client.close()
                raise Unreachable(
                    f"cannot reach the API at {url} (from {source}): "
                    f"{type(exc).__name__}; is `coremerge serve` running there?"
                ) from None
            if not said:
                print(f"coremerge: waiting for the API at {url} ({source})…", file=sys.stderr)
                said = True
            time.sleep(0.2)


def _print_progress(job: dict[str, Any]) -> None:
    progress = job.get("progress") or {}
    stage = progress.get("stage", "")
    done, total = progress.get("modules_done", 0), progress.get("modules_total", 0)
    counts = f" {done}/{total} modules" if total else ""
    print(f"{job['id']}: {job['status']} {stage}{counts}", file=sys.stderr, flush=True)


def _print_busy(problem: dict[str, Any], retry_after: float) -> None:
    print(
        f"coremerge: busy: {problem.get('detail', 'quota reached')}; retrying in {retry_after:g} s",
        file=sys.stderr,
        flush=True,
    )


def _outcome(job: dict[str, Any]) -> int:
    """The job on stdout; a failure's code and message on stderr too, where a person looks."""
    print(json.dumps(job, indent=2))
    if job["status"] in (JobStatus.SUCCEEDED, *ACTIVE):
        return 0
    error = job.get("error") or {}
    print(
        f"coremerge: job {job['id']} {job['status']}: {error.get('code', '?')}: "
        f"{error.get('message', '')}",
        file=sys.stderr,
    )
    return EXIT_FAILED


def cmd_submit(args: argparse.Namespace) -> int:
    from service.client import ApiError

    try:
        spec = _config_spec(args) if args.config else _json_spec(args)
    except ValueError as exc:
        print(f"coremerge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        client = _client(args)
    except Unreachable as exc:
        print(f"coremerge: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    with client:
        try:
            job = client.submit(spec, idempotency_key=args.idempotency_key, on_busy=_print_busy)
            if args.wait:
                job = _wait(client, job, args.timeout)
        except ApiError as exc:
            print(f"coremerge: error: {exc}", file=sys.stderr)
            return EXIT_USAGE if exc.status in (400, 413, 422) else EXIT_FAILED
        except TimeoutError as exc:
            print(f"coremerge: {exc}; it goes on (coremerge status ID)", file=sys.stderr)
            return EXIT_WAIT_TIMEOUT
    return _outcome(job)


def _json_spec(args: argparse.Namespace) -> Any:
    if args.spec is None or args.output is not None:
        raise ValueError("give SPEC.json, or --config merge.yml with --output URI")
    try:
        return json.loads(Path(args.spec).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{args.spec}: {exc}") from None


def _config_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The job spec of a mergekit configuration (``jobs.mergekit``), for the service: a
    model that is a Hub id (``org/name[@rev]``) is ``hf://org/name[@rev]``; a location must
    be a URI (the service reads no local path)."""
    from jobs.hub import reference_uri
    from jobs.mergekit import MergekitConfigError, read_mergekit_config, spec_from_mergekit

    if args.spec is not None:
        raise ValueError("give SPEC.json or --config, not both")
    try:
        spec = spec_from_mergekit(read_mergekit_config(args.config))
    except MergekitConfigError as exc:
        raise ValueError(f"--config {args.config}: {exc}") from None
    for adapter in spec["adapters"]:
        uri = reference_uri(adapter["uri"], exists=lambda _: False)
        if "://" not in uri:
            raise ValueError(
                f"{args.config}: model {uri!r} is a local path; the service reads s3:// and "
                "hf:// locations (file:// where enabled)"
            )
        adapter["uri"] = uri
    if args.output is not None:
        spec["output"]["uri"] = args.output
    if "uri" not in spec["output"]:
        raise ValueError("--config needs --output URI (or coremerge: {output: {uri: ...}})")
    return spec


def _wait(client: Any, job: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Poll the job to its end, printing progress; say once if it has waited queued for
    :data:`NO_WORKER_HINT_AFTER_S` seconds while no worker listens (``/readyz``)."""
    hinted = False
    started = time.monotonic()

    def progress(seen: dict[str, Any]) -> None:
        nonlocal hinted
        _print_progress(seen)
        waited = time.monotonic() - started
        if seen["status"] == JobStatus.QUEUED and not hinted and waited >= NO_WORKER_HINT_AFTER_S:
            hinted = True
            ready = client.ready()
            if ready.get("hint"):
                print(f"coremerge: hint: {ready['hint']}", file=sys.stderr, flush=True)

    return client.wait(job["id"], on_progress=progress, timeout=timeout, notify_every=5.0)


def _one_call(
    args: argparse.Namespace, call: Callable[[Any], Any], *, usage: tuple[int, ...] = ()
) -> tuple[Any, int]:
    """``call(client)`` on a client for ``args``: (its answer, 0); or, said on stderr, (None,
    the exit status) when the API cannot be reached or answers an error, whose HTTP status
    in ``usage`` means the command line was wrong (exit 2)."""
    from service.client import ApiError

    try:
        client = _client(args)
    except Unreachable as exc:
        print(f"coremerge: error: {exc}", file=sys.stderr)
        return None, EXIT_FAILED
    with client:
        try:
            return call(client), 0
        except ApiError as exc:
            print(f"coremerge: error: {exc}", file=sys.stderr)
            return None, EXIT_USAGE if exc.status in usage else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    job, code = _one_call(args, lambda client: client.get(args.job_id))
    return code or _outcome(job)


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel the job: at once when queued, at its next module boundary when running."""
    job, code = _one_call(args, lambda client: client.cancel(args.job_id))
    if code:
        return code
    print(json.dumps(job, indent=2))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """One line per job, newest first: id, status, method/space, adapters, output, error."""
    jobs, code = _one_call(
        args, lambda client: client.list(status=args.status, limit=max(1, args.limit)), usage=(422,)
    )
    if code:
        return code
    for job in jobs:
        error = f"  {job['error_code']}" if job.get("error_code") else ""
        print(f"{job['id']}  {job['status']:<9}  {job['created_at']}  {job['method']}/"
              f"{job['space']}  {job['adapters']} adapters  {job['output_uri']}{error}")  # fmt: skip
    return 0


#: What a published output holds that a user wants (the service's own markers stay behind).
FETCHED = ("adapter_config.json", "adapter_model.safetensors", "README.md", "merge_report.json")


def cmd_fetch(args: argparse.Namespace) -> int:
    """Download the merged adapter of a succeeded job into DIR: from S3 with boto3's own
    credentials chain (and COREMERGE_S3_ENDPOINT_URL), or copied from a ``file://`` output.
    The files go to a staging folder beside DIR, renamed into place when all have arrived."""
    dest = Path(args.dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        print(f"coremerge: error: {dest} exists and is not an empty folder", file=sys.stderr)
        return EXIT_USAGE
    job, code = _one_call(args, lambda client: client.get(args.job_id))
    if code:
        return code
    if job["status"] != JobStatus.SUCCEEDED:
        print(f"coremerge: error: job {job['id']} is {job['status']}, nothing to fetch",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    staging = dest.with_name(f".{dest.name}.fetching")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _download(job["result"]["uri"], staging, _settings())
        if dest.exists():
            dest.rmdir()
        staging.rename(dest)
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"coremerge: error: fetching {job['result']['uri']}: {type(exc).__name__}: {exc}",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    print(f"fetched {len(FETCHED)} files of job {job['id']} into {dest}")
    return 0


def _download(uri: str, into: Path, settings: Any) -> None:
    """The :data:`FETCHED` files of the output ``uri`` into the folder ``into``."""
    from jobs.uris import parse_uri

    location = parse_uri(uri)
    if location.scheme == "file":
        for name in FETCHED:
            shutil.copyfile(Path(location.path) / name, into / name)
        return
    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        config=Config(retries={"mode": "standard", "total_max_attempts": settings.s3_max_attempts}),
    )
    for name in FETCHED:
        s3.download_file(location.bucket, location.child(name), str(into / name))


def cmd_hash_key(args: argparse.Namespace) -> int:
    from jobs.tenants import hash_key

    key = sys.stdin.readline().rstrip("\r\n")
    if not key:
        print("coremerge: error: no key on stdin", file=sys.stderr)
        return EXIT_USAGE
    print(hash_key(key))
    return 0
