"""The one ``Settings`` of the service and the worker, read from ``COREMERGE_*`` variables.

``coremerge serve``, ``coremerge worker`` and the client commands all build their
configuration here; no other module reads the environment. S3 credentials and region are
not settings: boto3 finds them in its own chain (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, profiles, instance roles).

>>> Settings(redis_url="redis://127.0.0.1:6379/3").queue
'coremerge'
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobs.spec import MAX_ADAPTERS

__all__ = [
    "ConfigError",
    "Settings",
    "configuration_lines",
    "load_settings",
    "redacted_redis_url",
    "settings_table_markdown",
    "unknown_variables",
]

GiB = 1 << 30
MiB = 1 << 20
DAY = 86_400

Checksums = Literal["when_supported", "when_required"]


class Settings(BaseSettings):
    """Every knob of the service, the worker and the client (docs/configuration.md)."""

    model_config = SettingsConfigDict(env_prefix="COREMERGE_", extra="ignore", frozen=True)

    # -- where things are
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis for the queue and the job records"
    )
    redis_password: SecretStr | None = Field(
        None,
        description="Redis's password (its requirepass), kept out of the URL so no log shows it",
    )
    queue: str = Field(
        "coremerge", pattern=r"^[A-Za-z0-9_.:-]+$", description="the RQ queue's name"
    )
    key_prefix: str = Field(
        "coremerge",
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="prefix of the job records' Redis keys (RQ's own keys are rq:*)",
    )
    s3_endpoint_url: str | None = Field(
        None, description="an S3-compatible endpoint (MinIO, moto); unset means AWS"
    )
    tenants_file: Path | None = Field(
        None, description="the tenants file (keys and allowed prefixes); unset means open mode"
    )
    allow_file_uris: bool = Field(
        False, description="accept file:// URIs over HTTP (single-machine use)"
    )

    # -- limits (docs/job-spec.md)
    max_adapters: int = Field(
        MAX_ADAPTERS, ge=1, le=MAX_ADAPTERS, description="adapters per job (422 above)"
    )
    max_job_bytes: int = Field(
        20 * GiB, ge=1, description="sum of a job's input sizes, checked before any tensor is read"
    )
    max_adapter_bytes: int = Field(
        8 * GiB, ge=1, description="one adapter's size, checked before any tensor is read"
    )
    max_modules: int = Field(
        65_536, ge=1, description="modules in a merge, checked from the headers before reading"
    )
    max_output_rank: int = Field(
        512,
        ge=1,
        description="largest output rank: an explicit output.rank (422 above), the merged "
        "rank a job can reach without one (limit_exceeded before any tensor is read), and "
        'the cap of the rank output.rank "auto" chooses',
    )
    max_output_bytes: int = Field(
        40 * GiB,
        ge=1,
        description="largest merged adapter (its weights file), estimated from the plan before "
        "any tensor is read",
    )
    max_request_bytes: int = Field(1 * MiB, ge=1024, description="largest HTTP body (413 above)")
    max_work_bytes: int | None = Field(
        None,
        ge=1,
        description="a job's estimated peak working memory, checked before any tensor is read "
        "(unset: 80 % of the worker's memory limit, from its cgroup or RAM)",
    )
    max_active_jobs: int = Field(
        100, ge=1, description="per tenant, jobs queued or running at once (429 above)"
    )
    submits_per_minute: int = Field(
        600, ge=1, description="per tenant, submissions in any minute (429 above)"
    )
    max_stored_jobs: int = Field(
        1000,
        ge=1,
        description="per tenant, job records kept in Redis: beyond it a submission deletes the "
        "tenant's oldest finished records, whatever their TTL (at least MAX_ACTIVE_JOBS)",
    )

    # -- jobs (RQ's defaults lose or repeat work; set every one explicitly)
    job_timeout: int = Field(3600, ge=1, description="seconds before a running merge is stopped")
    result_ttl: int = Field(
        7 * DAY, ge=60, description="seconds a finished job stays readable (records and RQ)"
    )
    job_retries: int = Field(
        1, ge=0, description="re-runs of a job whose worker died (never of a failed merge)"
    )

    # -- worker
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:1…")
    work_dir: Path | None = Field(
        None,
        description="where inputs' configs (and VeRA weights) are copied and outputs staged "
        "(default: system temp); S3 LoRA weights never land here",
    )
    worker_ttl: int = Field(60, ge=15, description="seconds without a heartbeat = dead worker")
    maintenance_interval: int = Field(
        30, ge=1, description="seconds between RQ's clean-ups (abandoned jobs are re-queued)"
    )
    worker_preload: bool = Field(
        True,
        description="import torch in the worker's parent (never CUDA) so each forked job starts fast",
    )

    # -- S3 client (boto3 >= 1.36 sends CRC checksums by default; some S3-compatibles refuse them)
    s3_max_attempts: int = Field(5, ge=1, description="botocore 'standard' retry mode attempts")
    s3_checksum_calculation: Checksums = Field(
        "when_required", description="boto3 request_checksum_calculation (when_supported on AWS)"
    )
    s3_checksum_validation: Checksums = Field(
        "when_required", description="boto3 response_checksum_validation"
    )
    s3_multipart_threshold: int = Field(
        64 * MiB, ge=5 * MiB, description="bytes from which transfers are multipart"
    )
    s3_multipart_chunksize: int = Field(16 * MiB, ge=5 * MiB, description="bytes per part")
    s3_max_concurrency: int = Field(
        8, ge=1, description="parallel parts per transfer; connections reading a job's inputs"
    )
    s3_read_ahead_bytes: int = Field(
        256 * MiB,
        ge=1 * MiB,
        description="bytes of S3 inputs a job holds in memory ahead of the merge, all inputs "
        "together (they are read as the merge goes, never copied to disk)",
    )

    # -- completion notifications (notify.url in a job spec; docs/job-spec.md)
    notify_allow: str = Field(
        "",
        max_length=10_000,
        description="open mode only: comma-separated URL prefixes notify.url may start with "
        "(https://hooks.example.com/coremerge/); empty refuses notify.url (tenants list theirs "
        "in the tenants file)",
    )
    notify_allow_http: bool = Field(
        False, description="accept http:// notify URLs too (tests, local development)"
    )
    notify_secret: SecretStr | None = Field(
        None,
        description="open mode only: the HMAC-SHA256 key that signs notifications (tenants "
        "have their own notify_secret)",
    )
    notify_attempts: int = Field(
        3, ge=1, le=5, description="POSTs of one notification at most (backoff 0.5 s, 1 s, 2 s…)"
    )
    notify_timeout: float = Field(
        5.0, gt=0, le=30, description="seconds one notification POST may take (connect and answer)"
    )

    # -- the client commands (coremerge submit / status)
    api_url: str = Field("http://127.0.0.1:8000", description="the service, for the client")
    api_key: SecretStr | None = Field(None, description="bearer key sent by the client")
    api_wait: float = Field(
        15.0,
        ge=0,
        description="seconds the client commands wait for an API that refuses connections "
        "(one still starting) before saying it is unreachable",
    )

    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR")
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one object per line with job_id and tenant; text: plain lines"
    )

    @model_validator(mode="after")
    def _stored_covers_active(self) -> Settings:
        """Active jobs are never deleted to make room, so the stored-records cap must hold
        them all."""
        if self.max_stored_jobs < self.max_active_jobs:
            raise ValueError(
                f"COREMERGE_MAX_STORED_JOBS ({self.max_stored_jobs}) must be at least "
                f"COREMERGE_MAX_ACTIVE_JOBS ({self.max_active_jobs})"
            )
        return self

    @property
    def redis_kwargs(self) -> dict[str, object]:
        """Every Redis connection's options: timeouts (a dead Redis fails a request, not hangs
        it) and the password, when there is one (a password in the URL wins)."""
        kwargs: dict[str, object] = {
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
            "health_check_interval": 30,
        }
        if self.redis_password is not None:
            kwargs["password"] = self.redis_password.get_secret_value()
        return kwargs


class ConfigError(Exception):
    """A ``COREMERGE_*`` variable whose value is not acceptable; the message names it."""


#: Variables with the prefix that are not settings on purpose (the tests' own).
_NOT_SETTINGS = ("COREMERGE_TEST_",)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings from the environment, or :class:`ConfigError` naming the first bad
    variable, its value (never a secret's) and why: ``configuration error:
    COREMERGE_JOB_TIMEOUT='10m': Input should be a valid integer``."""
    environ = os.environ if environ is None else environ
    try:
        return Settings()
    except ValidationError as exc:
        error = exc.errors()[0]
        reason = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if not error.get("loc"):  # a rule between settings: its message names them
            raise ConfigError(f"configuration error: {reason}") from None
        field = str(error["loc"][0])
        name = f"COREMERGE_{field.upper()}"
        secret = Settings.model_fields.get(field) is not None and "Secret" in str(
            Settings.model_fields[field].annotation
        )
        value = "***" if secret else repr(environ.get(name, ""))
        raise ConfigError(f"configuration error: {name}={value}: {reason}") from None


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ``COREMERGE_*`` variable that is no setting (a typo silently
    leaves the default in force), with the closest setting's name when there is one."""
    environ = os.environ if environ is None else environ
    known = [f"COREMERGE_{name.upper()}" for name in Settings.model_fields]
    warnings = []
    for name in sorted(environ):
        if not name.startswith("COREMERGE_") or name in known or name.startswith(_NOT_SETTINGS):
            continue
        # compared without the common prefix, which would make any two names look alike
        suffixes = [k.removeprefix("COREMERGE_") for k in known]
        close = difflib.get_close_matches(
            name.removeprefix("COREMERGE_"), suffixes, n=1, cutoff=0.7
        )
        hint = f"; did you mean COREMERGE_{close[0]}?" if close else ""
        warnings.append(f"{name} is not a coremerge setting and is ignored{hint}")
    return warnings


def configuration_lines(settings: Settings, process: str) -> list[str]:
    """What ``process`` (``api`` or ``worker``) logs at start-up: where it connects and how it
    is set up, with no password or key in it."""
    tenants = (
        f"tenants file {settings.tenants_file}"
        if settings.tenants_file is not None
        else "OPEN (no tenants file)"
    )
    lines = [
        f"{process} configuration: redis {redacted_redis_url(settings.redis_url)} "
        f"(password {'set' if settings.redis_password else 'unset'}), queue {settings.queue!r}, "
        f"key prefix {settings.key_prefix!r}, {tenants}, file:// URIs "
        f"{'allowed' if settings.allow_file_uris else 'refused'}",
    ]
    if process == "worker":
        lines.append(
            f"worker configuration: S3 endpoint {settings.s3_endpoint_url or 'AWS'}, device "
            f"{settings.device}, work dir {settings.work_dir or 'system temp'}, job timeout "
            f"{settings.job_timeout} s, worker TTL {settings.worker_ttl} s"
        )
    else:
        lines.append(
            f"api configuration: job timeout {settings.job_timeout} s, retries "
            f"{settings.job_retries}, per tenant {settings.max_active_jobs} active jobs, "
            f"{settings.submits_per_minute} submissions a minute, {settings.max_stored_jobs} "
            "stored records"
        )
    return lines


def redacted_redis_url(url: str) -> str:
    """``redis_url`` without a password (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username + ':' if parts.username else ':'}***@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _default_text(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and value >= MiB and value % MiB == 0:
        return f"{value // GiB} GiB" if value % GiB == 0 else f"{value // MiB} MiB"
    return f"`{value}`"


def settings_table_markdown() -> str:
    """The configuration table of docs/service.md, generated from :class:`Settings`."""
    rows = ["| variable | meaning | default |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        env = f"COREMERGE_{name.upper()}"
        rows.append(f"| `{env}` | {field.description or ''} | {_default_text(field.default)} |")
    return "\n".join(rows)
