"""Notify URLs and allow-list prefixes: their forms and their normal form (``jobs.notify``
sends; ``jobs.tenants`` and ``jobs.spec`` check the forms with this leaf, so neither imports
the sender)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["MAX_URL", "Target", "parse_prefix", "parse_target"]

MAX_URL = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Target:
    """A notify URL or allow-list prefix, its host lower-case and its port explicit."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def is_ip_literal(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def prefix(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse_target(url: str, *, prefix: bool = False) -> Target:
    """``url`` parsed, or ``ValueError`` saying what is wrong: http(s) only, a host, no
    user:password, no fragment (and for an allow-list ``prefix`` no query; its path is
    made to end with ``/`` so that ``https://h/hooks`` does not allow ``/hooks-other``)."""
    if not 10 <= len(url) <= MAX_URL or not url.isascii() or any(c.isspace() for c in url):
        raise ValueError(f"{url[:80]!r}: an ASCII URL of 10 to {MAX_URL} characters, no spaces")
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError(f"{url!r}: only https:// (or http:// where allowed) URLs")
    if "@" in parts.netloc:
        raise ValueError(f"{url!r}: no user:password in a notify URL (the body is signed)")
    if not parts.hostname or parts.fragment:
        raise ValueError(f"{url!r}: needs a host and no #fragment")
    if prefix and parts.query:
        raise ValueError(f"{url!r}: an allow-list prefix has no ?query")
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise ValueError(f"{url!r}: the port is not a number from 1 to 65535") from None
    path = parts.path or "/"
    if prefix and not path.endswith("/"):
        path += "/"
    return Target(parts.scheme, parts.hostname.lower().rstrip("."), port, path)


def parse_prefix(text: str) -> str:
    """An allow-list entry in its normal form (``https://hooks.example.com:443/ci/``)."""
    return parse_target(text, prefix=True).prefix()
