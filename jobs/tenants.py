"""Tenants: who a bearer key belongs to, and which locations that tenant may read and write.

The tenants file (``COREMERGE_TENANTS_FILE``, docs/job-spec.md)::

    {"tenants": {"team-a": {"keys_sha256": ["9f86d0…"],
                            "allow": ["s3://adapters-a/", "s3://merged/team-a/"],
                            "read_only": ["s3://shared-catalogue/"]},
                 "ops": {"keys_sha256": ["60303a…"], "role": "admin"}}}

Keys are stored only as their sha256 (``coremerge hash-key`` prints it). A presented key is
hashed and compared with every stored hash in constant time, without stopping at a match, so
the time taken says nothing about which key (or how much of one) matched. A location is
allowed when its normal form (:mod:`jobs.uris`) starts with one of the tenant's ``allow``
prefixes, inputs and output alike; a ``read_only`` prefix allows inputs only (an output under
one is refused even when an ``allow`` prefix covers it too). With no tenants file the service
runs *open*: one tenant, ``open``, that may use every ``s3://`` location (and ``file://`` when
enabled).

The same check runs in the API at submission and again in the worker before any byte moves.
The API re-reads a changed file while it runs (:class:`TenantsFile`); the worker reads it for
every job.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from jobs.uris import InvalidUri, Location, parse_uri

__all__ = [
    "OPEN_TENANT",
    "Refusal",
    "Tenant",
    "Tenants",
    "TenantsFile",
    "TenantsFileError",
    "hash_key",
    "load_tenants",
    "refusal",
]

log = logging.getLogger("coremerge.auth")

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_TENANT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TENANT_FIELDS = frozenset({"keys_sha256", "allow", "read_only", "role", "notify", "notify_secret"})
#: A tenant's notification signing key is at least this long (it is an HMAC key).
MIN_NOTIFY_SECRET = 16
#: ``tenant`` (the default) sees its own jobs; ``admin`` may also read and list every
#: tenant's jobs (never cancel them, nor use their locations).
ROLES = ("tenant", "admin")
#: The API looks at the tenants file's identity (inode, size, mtime) at most this often.
RELOAD_CHECK_S = 1.0
#: A tenants file larger than this is refused unread (thousands of tenants fit in 1 MiB).
MAX_TENANTS_FILE_BYTES = 16 << 20


class TenantsFileError(ValueError):
    """The tenants file is missing, not JSON, or not of the documented shape."""


def hash_key(key: str) -> str:
    """The sha256 (hex) under which a key is stored in the tenants file."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    """A tenant and its location prefixes (normalised): ``allow`` for inputs and outputs
    (``None`` = everything), ``read_only`` for inputs only."""

    name: str
    allow: tuple[str, ...] | None
    read_only: tuple[str, ...] = ()
    admin: bool = False
    #: URL prefixes a job's ``notify.url`` may start with (``jobs.notify``), and the key that
    #: signs those notifications (never shown in a repr or a log).
    notify: tuple[str, ...] = ()
    notify_secret: str | None = field(default=None, repr=False)

    def may_use(self, location: Location, *, for_output: bool = False) -> bool:
        """Whether the tenant may read (``for_output=False``) or write at ``location``.
        A Hub repository is allowed only by a prefix that names it (``hf://org/``), never
        by open mode's "everything"."""
        if self.is_read_only(location):
            return not for_output
        if self.allow is None:
            return location.scheme != "hf"
        return _under(location, self.allow)

    def is_read_only(self, location: Location) -> bool:
        """Whether ``location`` lies under one of the tenant's ``read_only`` prefixes."""
        return _under(location, self.read_only)


def _under(location: Location, prefixes: tuple[str, ...]) -> bool:
    """Whether ``location`` starts with one of ``prefixes`` (a Hub repository with or
    without its revision: ``hf://org/name/`` allows every revision of it)."""
    forms = {location.normalized, location.unpinned}
    return any(form.startswith(prefix) for form in forms for prefix in prefixes)


OPEN_TENANT = Tenant("open", None)


@dataclass(frozen=True)
class Refusal:
    """Why a location may not be used: ``invalid`` (malformed: 422) or ``forbidden`` (403)."""

    kind: str
    message: str


#: The processes that check locations, as a refusal names them (``process=`` of :func:`refusal`).
_CHECKERS = {"api": "the API (coremerge serve)", "worker": "the worker (coremerge worker)"}


def refusal(
    tenant: Tenant,
    uri: str,
    *,
    allow_file_uris: bool,
    for_output: bool = False,
    process: str = "api",
) -> Refusal | None:
    """``None`` when ``tenant`` may use ``uri`` (as the output when ``for_output``, else as an
    input); otherwise the reason it may not. ``uri`` is parsed and normalised first
    (:func:`jobs.uris.parse_uri`: ``S3://b/p`` is ``s3://b/p/``). ``process`` (``api`` or
    ``worker``) is who checks: both do, each with its own settings, so a refusal of
    ``file://`` says which one refused and which variable it lacks."""
    try:
        location = parse_uri(uri)
    except InvalidUri as exc:
        return Refusal("invalid", str(exc))
    if location.scheme == "hf" and for_output:
        return Refusal("invalid", f"{uri!r}: an hf:// location is an input only")
    if location.scheme == "file" and not allow_file_uris:
        return Refusal(
            "forbidden",
            f"{uri!r}: file:// URIs are disabled in {_CHECKERS[process]}: set "
            "COREMERGE_ALLOW_FILE_URIS=true for the API and the workers alike",
        )
    if for_output and tenant.is_read_only(location):
        return Refusal(
            "forbidden",
            f"{uri!r}: tenant {tenant.name!r} may only read here (a read_only prefix), "
            "not write the output",
        )
    if not tenant.may_use(location, for_output=for_output):
        return Refusal("forbidden", f"{uri!r}: tenant {tenant.name!r} may not use this location")
    return None


def _prefixes(raw: object, what: str, bad: Callable[[str], TenantsFileError]) -> tuple[str, ...]:
    """A list of location prefixes, each parsed and normalised like a spec's location (so
    ``..``, empty segments and percent-escapes are refused here as there)."""
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise bad(f"{what} must be a list of URI prefixes")
    prefixes = []
    for prefix in raw:
        try:
            prefixes.append(parse_uri(prefix).normalized)
        except InvalidUri as exc:
            raise bad(f"{what} {exc}") from None
    return tuple(prefixes)


def _notify_fields(
    body: dict, what: str, bad: Callable[[str], TenantsFileError]
) -> tuple[tuple[str, ...], str | None]:
    """A tenant's ``notify`` URL prefixes (each checked by :func:`jobs.notify.parse_prefix`)
    and its ``notify_secret``."""
    from jobs.notify_urls import parse_prefix

    raw = body.get("notify", [])
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise bad(f"{what}: notify must be a list of URL prefixes")
    try:
        notify = tuple(parse_prefix(prefix) for prefix in raw)
    except ValueError as exc:
        raise bad(f"{what}: notify {exc}") from None
    secret = body.get("notify_secret")
    if secret is not None and (not isinstance(secret, str) or len(secret) < MIN_NOTIFY_SECRET):
        raise bad(
            f"{what}: notify_secret must be a string of at least {MIN_NOTIFY_SECRET} characters"
        )
    return notify, secret


class Tenants:
    """The key → tenant map. ``Tenants.open()`` when no tenants file is configured."""

    def __init__(self, tenants: Iterable[tuple[Tenant, Iterable[str]]]) -> None:
        self._keys: list[tuple[bytes, Tenant]] = []
        self._by_name: dict[str, Tenant] = {}
        for tenant, hashes in tenants:
            self._by_name[tenant.name] = tenant
            self._keys.extend((bytes.fromhex(h), tenant) for h in hashes)

    @classmethod
    def open(cls) -> Tenants:
        return cls([(OPEN_TENANT, ())])

    @property
    def is_open(self) -> bool:
        return not self._keys

    @classmethod
    def from_file(cls, path: Path) -> Tenants:
        """Parse the tenants file. Every way it can be broken (unreadable, too large, not
        UTF-8, not JSON, nested too deeply for the parser, the wrong shape) is one
        :class:`TenantsFileError` whose message says which, never another exception."""
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_TENANTS_FILE_BYTES + 1)
        except OSError as exc:
            raise TenantsFileError(
                f"tenants file {path}: cannot read it ({exc.strerror})"
            ) from None
        if len(data) > MAX_TENANTS_FILE_BYTES:
            raise TenantsFileError(
                f"tenants file {path}: larger than {MAX_TENANTS_FILE_BYTES} bytes"
            )
        try:
            raw = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise TenantsFileError(f"tenants file {path}: not UTF-8 at byte {exc.start}") from None
        except json.JSONDecodeError as exc:
            raise TenantsFileError(f"tenants file {path}: not JSON ({exc})") from None
        except RecursionError:
            raise TenantsFileError(f"tenants file {path}: nested too deeply to parse") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: object, *, source: str = "tenants") -> Tenants:
        def bad(message: str) -> TenantsFileError:
            return TenantsFileError(f"{source}: {message}")

        if (
            not isinstance(raw, dict)
            or set(raw) != {"tenants"}
            or not isinstance(raw["tenants"], dict)
        ):
            raise bad(
                'expected {"tenants": {NAME: {"keys_sha256": [...], "allow": [...], '
                '"read_only": [...]}}}'
            )
        entries = []
        for name, body in raw["tenants"].items():
            if not _TENANT_NAME.match(name):
                raise bad(f"tenant name {name!r}: letters, digits, '_', '.', '-' only")
            if not isinstance(body, dict) or not set(body) <= _TENANT_FIELDS:
                raise bad(
                    f"tenant {name!r}: only 'keys_sha256', 'allow', 'read_only', 'role', "
                    "'notify' and 'notify_secret' are accepted"
                )
            role = body.get("role", "tenant")
            if role not in ROLES:
                raise bad(f"tenant {name!r}: role must be 'tenant' or 'admin'")
            hashes = body.get("keys_sha256", [])
            if not isinstance(hashes, list) or not all(
                isinstance(h, str) and _SHA256_HEX.match(h) for h in hashes
            ):
                raise bad(f"tenant {name!r}: keys_sha256 must be lower-case sha256 hex digests")
            allow = _prefixes(body.get("allow", []), f"tenant {name!r}: allow", bad)
            read_only = _prefixes(body.get("read_only", []), f"tenant {name!r}: read_only", bad)
            notify, secret = _notify_fields(body, f"tenant {name!r}", bad)
            tenant = Tenant(name, allow, read_only, role == "admin", notify, secret)
            entries.append((tenant, hashes))
        seen: set[str] = set()
        for _, hashes in entries:
            if seen & set(hashes):
                raise bad("a key hash is listed under two tenants")
            seen |= set(hashes)
        if not seen:
            raise bad("no keys: remove COREMERGE_TENANTS_FILE to run open instead")
        return cls(entries)

    def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant whose key this is, or ``None``. Compares against every stored hash."""
        if self.is_open:
            return OPEN_TENANT
        if not key:
            return None
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for stored, tenant in self._keys:
            if hmac.compare_digest(digest, stored):  # no break: time does not depend on position
                found = tenant
        return found

    def get(self, name: str) -> Tenant | None:
        """The tenant called ``name`` (the worker's second check looks it up by name)."""
        return self._by_name.get(name)

    def all(self) -> list[Tenant]:
        """Every tenant (the worker probes the buckets they may publish to)."""
        return list(self._by_name.values())


def load_tenants(tenants_file: Path | None, *, warn_open: bool = True) -> Tenants:
    """The tenants file, or open mode (said loudly) when none is configured."""
    if tenants_file is not None:
        return Tenants.from_file(tenants_file)
    if warn_open:
        log.warning(
            "NO TENANTS FILE (COREMERGE_TENANTS_FILE unset): the API is OPEN. Anyone who "
            "reaches it can submit merges that read and write any s3:// location these "
            "credentials can. Keep it on loopback, or configure tenants."
        )
    return Tenants.open()


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    """What tells a rewritten file from the one read before: device, inode (a Kubernetes
    Secret volume swaps a symlink, an editor renames a new file in), size and mtime (ns)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class TenantsFile:
    """The API's tenants, re-read when the file changes, so that a revoked key stops working
    within about :data:`RELOAD_CHECK_S` seconds and without a restart.

    :meth:`current` is called on every authenticated request; it looks at the file at most
    once per ``check_every`` seconds (one ``stat``) and parses it only when its identity
    changed. A file that became unreadable or invalid keeps the last good tenants and logs
    an error (once per change), so a half-written edit never opens or closes the service.
    Without a file (open mode) there is nothing to watch."""

    def __init__(
        self,
        path: Path | None,
        *,
        check_every: float = RELOAD_CHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.check_every = check_every
        self._clock = clock
        self._lock = threading.Lock()
        self._identity = _identity(self.path) if self.path is not None else None
        self._tenants = load_tenants(self.path)  # an invalid file stops the API at start-up
        self._checked = clock()

    def current(self) -> Tenants:
        """The tenants to authenticate this request with."""
        if self.path is None or self._clock() - self._checked < self.check_every:
            return self._tenants
        with self._lock:
            if self._clock() - self._checked >= self.check_every:
                self._checked = self._clock()
                self._reload_if_changed()
        return self._tenants

    def _reload_if_changed(self) -> None:
        assert self.path is not None
        identity = _identity(self.path)
        if identity is None or identity == self._identity:
            if identity is None and self._identity is not None:
                log.error("tenants file %s: unreadable; keeping the last good one", self.path)
                self._identity = None
            return
        self._identity = identity
        try:
            tenants = Tenants.from_file(self.path)
        except TenantsFileError as exc:
            log.error("%s; keeping the last good tenants", exc)
            return
        self._tenants = tenants
        log.info("tenants file %s: reloaded", self.path)
