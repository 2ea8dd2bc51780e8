"""Tenants: who a bearer key belongs to, and which locations that tenant may read and write.

The tenants file (``COREMERGE_TENANTS_FILE``, docs/job-spec.md)::

    {"tenants": {"team-a": {"keys_sha256": ["9f86d0…"],
                            "allow": ["s3://adapters-a/", "s3://merged/team-a/"]}}}

Keys are stored only as their sha256 (``coremerge hash-key`` prints it). A presented key is
hashed and compared with every stored hash in constant time, without stopping at a match, so
the time taken says nothing about which key (or how much of one) matched. A location is
allowed when its normal form (:mod:`jobs.uris`) starts with one of the tenant's ``allow``
prefixes; inputs and output alike. With no tenants file the service runs *open*: one tenant,
``open``, that may use every ``s3://`` location (and ``file://`` when enabled).

The same check runs in the API at submission and again in the worker before any byte moves.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from jobs.uris import InvalidUri, Location, parse_uri

__all__ = [
    "OPEN_TENANT",
    "Refusal",
    "Tenant",
    "Tenants",
    "TenantsFileError",
    "hash_key",
    "load_tenants",
    "refusal",
]

log = logging.getLogger("coremerge.auth")

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_TENANT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class TenantsFileError(ValueError):
    """The tenants file is missing, not JSON, or not of the documented shape."""


def hash_key(key: str) -> str:
    """The sha256 (hex) under which a key is stored in the tenants file."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    """A tenant and its allowed location prefixes (normalised; ``None`` = everything)."""

    name: str
    allow: tuple[str, ...] | None

    def may_use(self, location: Location) -> bool:
        if self.allow is None:
            return True
        normalized = location.normalized
        return any(normalized.startswith(prefix) for prefix in self.allow)


OPEN_TENANT = Tenant("open", None)


@dataclass(frozen=True)
class Refusal:
    """Why a location may not be used: ``invalid`` (malformed: 422) or ``forbidden`` (403)."""

    kind: str
    message: str


def refusal(tenant: Tenant, uri: str, *, allow_file_uris: bool) -> Refusal | None:
    """``None`` when ``tenant`` may use ``uri``; otherwise the reason it may not."""
    try:
        location = parse_uri(uri)
    except InvalidUri as exc:
        return Refusal("invalid", str(exc))
    if location.scheme == "file" and not allow_file_uris:
        return Refusal(
            "forbidden", f"{uri!r}: file:// URIs are disabled here (COREMERGE_ALLOW_FILE_URIS)"
        )
    if not tenant.may_use(location):
        return Refusal("forbidden", f"{uri!r}: tenant {tenant.name!r} may not use this location")
    return None


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
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TenantsFileError(f"tenants file {path}: {exc}") from None
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
            raise bad('expected {"tenants": {NAME: {"keys_sha256": [...], "allow": [...]}}}')
        entries = []
        for name, body in raw["tenants"].items():
            if not _TENANT_NAME.match(name):
                raise bad(f"tenant name {name!r}: letters, digits, '_', '.', '-' only")
            if not isinstance(body, dict) or not set(body) <= {"keys_sha256", "allow"}:
                raise bad(f"tenant {name!r}: only 'keys_sha256' and 'allow' are accepted")
            hashes = body.get("keys_sha256", [])
            allow = body.get("allow", [])
            if not isinstance(hashes, list) or not all(
                isinstance(h, str) and _SHA256_HEX.match(h) for h in hashes
            ):
                raise bad(f"tenant {name!r}: keys_sha256 must be lower-case sha256 hex digests")
            if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
                raise bad(f"tenant {name!r}: allow must be a list of URI prefixes")
            prefixes = []
            for prefix in allow:
                try:
                    prefixes.append(parse_uri(prefix).normalized)
                except InvalidUri as exc:
                    raise bad(f"tenant {name!r}: allow {exc}") from None
            entries.append((Tenant(name, tuple(prefixes)), hashes))
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
