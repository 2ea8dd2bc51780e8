"""Completion notifications: a signed POST to a job's ``notify.url`` when it ends (docs/job-spec.md).

Who may be called: only URLs under a prefix of the tenant's ``notify`` list (tenants file),
or in open mode of ``COREMERGE_NOTIFY_ALLOW``; ``http://`` only where
``COREMERGE_NOTIFY_ALLOW_HTTP`` says so; never a user:password in the URL. The host is resolved
and every address must be a public one, so that an allow-listed name cannot be pointed at the
cluster's own services; a private, loopback or link-local address is called only when the URL
(and so the allow-list entry it matched) names that address itself (``http://127.0.0.1:9000/``).
The API checks at submission (422 naming ``notify.url``) and the sender again before sending.

How: on the job's final state (succeeded, failed, canceled; a timeout is a failure), the
process that recorded it POSTs :func:`payload` with ``X-Coremerge-Signature: t=<unix
seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``, keyed by the tenant's ``notify_secret``
(open mode: ``COREMERGE_NOTIFY_SECRET``). At most ``COREMERGE_NOTIFY_ATTEMPTS`` POSTs, each
bounded by ``COREMERGE_NOTIFY_TIMEOUT`` seconds, 0.5 s, 1 s, 2 s… apart; a 2xx ends it, a 5xx,
408, 429 or a transport error is retried, anything else (a redirect included: none is
followed) ends it. The outcome is written to the job record's ``notification``; the job's
status never changes. The worker sends in line (its work horse ends with the job, so a thread
would die with it): at most attempts × timeout + the backoff, 16.5 s with the defaults. The
API (a queued job canceled) sends from a daemon thread, so the DELETE answers at once.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from jobs.notify_urls import Target, parse_prefix, parse_target

__all__ = [
    "SIGNATURE_HEADER",
    "Notifier",
    "payload",
    "refusal",
    "signature",
]

log = logging.getLogger("coremerge.notify")

SIGNATURE_HEADER = "X-Coremerge-Signature"
BACKOFF_S = 0.5
#: Answers worth another attempt; any other non-2xx ends the delivery.
RETRIED = frozenset({408, 429})

Resolver = Callable[..., list]


def _prefixes(tenant: Any, settings: Any) -> tuple[str, ...]:
    if tenant.allow is None:  # open mode: the operator's list
        entries = [e.strip() for e in settings.notify_allow.split(",") if e.strip()]
        return tuple(parse_prefix(e) for e in entries)
    return tenant.notify


def secret_for(tenant: Any, settings: Any) -> str | None:
    """The key that signs the tenant's notifications (open mode: COREMERGE_NOTIFY_SECRET)."""
    if tenant.allow is None:
        return settings.notify_secret.get_secret_value() if settings.notify_secret else None
    return tenant.notify_secret


def refusal(
    url: str, tenant: Any, settings: Any, *, resolve: Resolver = socket.getaddrinfo
) -> str | None:
    """``None`` when ``tenant`` may be notified at ``url``; otherwise why not."""
    try:
        target = parse_target(url)
        prefixes = _prefixes(tenant, settings)
    except ValueError as exc:
        return str(exc)
    if target.scheme == "http" and not settings.notify_allow_http:
        return f"{url!r}: http:// is refused here, use https:// (COREMERGE_NOTIFY_ALLOW_HTTP)"
    where = "COREMERGE_NOTIFY_ALLOW" if tenant.allow is None else "the tenants file's 'notify'"
    if not prefixes:
        return f"tenant {tenant.name!r} may not be notified anywhere (no URL prefix in {where})"
    if not any(target.prefix().startswith(p) for p in prefixes):
        return f"{url!r} is not under a notify prefix of tenant {tenant.name!r} ({where})"
    if secret_for(tenant, settings) is None:
        return f"tenant {tenant.name!r} has no key to sign notifications with (notify_secret)"
    return _address_refusal(target, resolve)


def _address_refusal(target: Target, resolve: Resolver) -> str | None:
    """Every address the host resolves to must be public, unless the URL names the address."""
    try:
        infos = resolve(target.host, target.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        return f"{target.host!r}: cannot be resolved ({exc})"
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if (address.is_global and not address.is_multicast) or target.is_ip_literal:
            continue
        return (
            f"{target.host!r} resolves to {address}, a private, loopback or link-local address: "
            "only a notify prefix naming that address itself may reach it"
        )
    return None


def payload(record: Any) -> dict[str, Any]:
    """What a notification says: the job, how it ended, and where its result is."""
    result = record.result or None
    if result is not None:
        keep = ("uri", "report_uri", "rank", "modules", "bytes", "seconds")
        result = {k: result[k] for k in keep if k in result}
    return {
        "job_id": record.id,
        "status": str(record.status),
        "finished_at": record.finished_at,
        "result": result,
        "error": record.error,
    }


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: ``t=<timestamp>,v1=<hex HMAC-SHA256(secret, "t.body")>``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


class Notifier:
    """The ``on_final`` hook of a :class:`jobs.records.JobStore`: notifies a job that asked
    for it, in line (``background=False``, the worker) or from a daemon thread (the API)."""

    def __init__(self, settings: Any, *, background: bool = False) -> None:
        self.settings = settings
        self.background = background

    def __call__(self, store: Any, job_id: str) -> None:
        record = store.get(job_id)
        if record is None or not (record.request or {}).get("notify"):
            return
        if self.background:
            threading.Thread(
                target=self._deliver, args=(store, record), name=f"notify-{job_id}", daemon=True
            ).start()
        else:
            self._deliver(store, record)

    def _deliver(self, store: Any, record: Any) -> None:
        from jobs.records import now_iso

        url = record.request["notify"]["url"]
        outcome = {"url": url, "attempts": 0, "last_status": None, "last_error": None,
                   "delivered_at": None, "outcome": "failed"}  # fmt: skip
        try:
            tenant, secret = self._tenant(record.tenant)
            refused = refusal(url, tenant, self.settings) if tenant is not None else "no tenant"
            if refused is not None:
                outcome.update(outcome="refused", last_error=refused)
            else:
                body = json.dumps(payload(record), separators=(",", ":")).encode()
                outcome.update(_post(url, body, secret, self.settings))
                if outcome["outcome"] == "delivered":
                    outcome["delivered_at"] = now_iso()
        except Exception as exc:  # a notification never fails the job, nor the worker
            log.exception("job %s: notification failed", record.id)
            outcome["last_error"] = f"internal error ({type(exc).__name__})"
        level = logging.INFO if outcome["outcome"] == "delivered" else logging.WARNING
        log.log(level, "job %s: notification %s after %d attempt(s): %s", record.id,
                outcome["outcome"], outcome["attempts"], outcome["last_error"] or "ok")  # fmt: skip
        store.record_notification(record.id, outcome)

    def _tenant(self, name: str) -> tuple[Any, str | None]:
        """The job's tenant as this process's tenants file has it now, and its key."""
        from jobs.tenants import load_tenants

        tenant = load_tenants(self.settings.tenants_file, warn_open=False).get(name)
        return tenant, secret_for(tenant, self.settings) if tenant is not None else None


def _post(url: str, body: bytes, secret: str | None, settings: Any) -> dict[str, Any]:
    """POST ``body`` up to ``notify_attempts`` times; the outcome fields of the record."""
    import httpx

    done: dict[str, Any] = {"attempts": 0, "outcome": "failed"}
    with httpx.Client(
        follow_redirects=False, timeout=settings.notify_timeout, trust_env=False
    ) as client:
        for attempt in range(settings.notify_attempts):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            stamp = int(time.time())
            headers = {"Content-Type": "application/json", "User-Agent": "coremerge-notify/1",
                       SIGNATURE_HEADER: signature(secret or "", stamp, body)}  # fmt: skip
            done["attempts"] = attempt + 1
            try:
                with client.stream("POST", url, content=body, headers=headers) as answer:
                    status = answer.status_code  # the body is never read
            except httpx.HTTPError as exc:
                done.update(last_status=None, last_error=f"{type(exc).__name__}: {exc}"[:300])
                continue
            done.update(last_status=status, last_error=None if status < 300 else f"HTTP {status}")
            if 200 <= status < 300:
                done["outcome"] = "delivered"
                break
            if 300 <= status < 400:
                done["last_error"] = f"HTTP {status}: redirects are not followed"
            if status < 500 and status not in RETRIED:
                break
    return done
