"""Adapter and output locations: parse a URI once, refuse anything ambiguous, normalise it.

A location is a *directory*: ``s3://bucket/prefix/``, ``file:///abs/dir/``, or (an input
only) a Hugging Face Hub repository ``hf://org/name[@revision]/`` (``jobs.hub``). Its normal form
ends with ``/``, so that an allow-list prefix ``s3://merged/team-a/`` never matches
``s3://merged/team-ab/``. What is refused, and why:

- schemes other than ``s3`` and ``file`` (``http(s)://`` would let a request make the worker
  fetch any address); a bare local path (the CLI's, not the API's);
- credentials or a port in the authority (no request carries endpoints or credentials), and a
  bucket "name" formatted as an IP address (S3 forbids it; it reads like a host);
- ``.`` and ``..`` segments and empty segments (``a//b``): S3 keeps them literally but other
  layers collapse them, so a prefix check on the raw text could be walked around;
- any ``%`` escape (a percent-encoded ``/`` or ``.`` is a separator to some layers and not to
  others), backslashes, ``?``, ``#``, whitespace and control characters.

>>> parse_uri("S3://adapters/snli").normalized
's3://adapters/snli/'
>>> overlaps(parse_uri("s3://adapters/snli/out"), parse_uri("S3://adapters/snli/"))
True
>>> parse_uri("s3://adapters/a/../b")
Traceback (most recent call last):
...
jobs.uris.InvalidUri: 's3://adapters/a/../b': '.' and '..' segments are not allowed
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from jobs.hub import is_hub_id, parse_hub

__all__ = [
    "InvalidUri",
    "Location",
    "canonical_scheme",
    "local_location",
    "output_overlap",
    "overlaps",
    "parse_uri",
]

SCHEMES = ("s3", "file", "hf")
# S3's bucket naming rules: 3-63 characters, lower-case letters, digits, '.', '-'.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x20\x7f%\\?#]")
_IP_ADDRESS = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class InvalidUri(ValueError):
    """A location that is not an acceptable ``s3://`` or ``file://`` directory URI."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"{uri!r}: {reason}")
        self.uri = uri
        self.reason = reason


@dataclass(frozen=True)
class Location:
    """A parsed directory URI. ``key`` is the S3 key prefix (``""`` or ending in ``/``); for
    ``file`` URIs ``path`` is the absolute directory; for ``hf`` ones ``bucket`` is the
    organisation, ``key`` the repository's name and ``/``, ``revision`` the one asked for."""

    scheme: str
    bucket: str
    key: str
    path: str
    revision: str = ""

    @property
    def normalized(self) -> str:
        if self.scheme == "hf":
            name = self.key.rstrip("/")
            repo = f"{self.bucket}/{name}" if name else self.bucket
            return f"hf://{repo}" + (f"@{self.revision}/" if self.revision else "/")
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}"
        return f"file://{self.path.rstrip('/')}/"

    @property
    def unpinned(self) -> str:
        """The normal form without a revision: what an allow-list prefix of repositories
        (``hf://org/``, ``hf://org/name/``) is compared with."""
        return f"hf://{self.bucket}/{self.key}" if self.scheme == "hf" else self.normalized

    def child(self, name: str) -> str:
        """The S3 key (or local path) of the file ``name`` inside this directory."""
        return f"{self.key}{name}" if self.scheme == "s3" else f"{self.path.rstrip('/')}/{name}"

    def __str__(self) -> str:
        return self.normalized


def _check_segments(uri: str, segments: list[str]) -> None:
    # A trailing "/" leaves one empty last segment: that is the directory form, not an error.
    if segments and segments[-1] == "":
        segments = segments[:-1]
    for segment in segments:
        if segment == "":
            raise InvalidUri(uri, "empty path segments ('//') are not allowed")
        if segment in (".", ".."):
            raise InvalidUri(uri, "'.' and '..' segments are not allowed")


def parse_uri(uri: str) -> Location:
    """Parse and check ``uri``; raise :class:`InvalidUri` with the reason."""
    if _FORBIDDEN_CHARS.search(uri):
        raise InvalidUri(
            uri,
            "percent-escapes, backslashes, '?', '#', spaces and control characters are not allowed",
        )
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise InvalidUri(uri, "not a URI: give s3://bucket/prefix/ or file:///abs/dir/")
    scheme = scheme.lower()
    if scheme in ("http", "https"):
        raise InvalidUri(uri, "http(s):// URIs are not accepted: give s3:// or file://")
    if scheme not in SCHEMES:
        raise InvalidUri(uri, f"unsupported scheme {scheme!r}: give s3://, file:// or hf://")
    if scheme == "hf":
        return _hub_location(uri)
    authority, _, path = rest.partition("/")
    if "@" in authority:
        raise InvalidUri(uri, "credentials in URIs are not accepted")
    if ":" in authority:
        raise InvalidUri(uri, "a port or endpoint in the URI is not accepted")
    segments = path.split("/") if path else []
    _check_segments(uri, segments)

    if scheme == "s3":
        if not _BUCKET.match(authority) or ".." in authority:
            raise InvalidUri(uri, f"{authority!r} is not a valid S3 bucket name")
        if _IP_ADDRESS.match(authority):  # S3's rules forbid it; it reads like a host
            raise InvalidUri(uri, f"{authority!r}: a bucket name formatted as an IP address")
        key = "/".join(s for s in segments if s)
        return Location("s3", authority, f"{key}/" if key else "", "")

    if authority not in ("", "localhost"):
        raise InvalidUri(uri, "file:// URIs name a local absolute path: file:///abs/dir")
    if not path:
        raise InvalidUri(uri, "file:// URIs need an absolute path: file:///abs/dir")
    local = str(PurePosixPath("/" + "/".join(s for s in segments if s)))
    return Location("file", "", "", local)


def _hub_location(uri: str) -> Location:
    """An ``hf://org/name[@revision]`` location (``jobs.hub``'s form), or an organisation,
    ``hf://org/``, as an allow-list prefix names one (not an adapter: the spec refuses it)."""
    org = uri[len("hf://") :].rstrip("/")
    if org and "/" not in org and is_hub_id(f"{org}/x"):
        return Location("hf", org, "", "")
    try:
        ref = parse_hub(uri)
    except ValueError as exc:
        raise InvalidUri(uri, str(exc).split(": ", 1)[1]) from None
    org, name = ref.repo_id.split("/")
    return Location("hf", org, f"{name}/", "", ref.revision or "")


def canonical_scheme(uri: str) -> str:
    """``uri`` with its scheme lower-cased (``S3://b/p`` → ``s3://b/p``), anything else as is.

    Schemes are case-insensitive (RFC 3986), but code that tests ``uri.startswith("s3://")``
    is not: the job spec applies this to every location, so the API, the CLI and the worker
    all see one spelling, even for a record stored before the API normalised its URIs.
    A string without a scheme (a CLI's local path) is returned unchanged."""
    match = _SCHEME.match(uri)
    if match is None:
        return uri
    return match.group(1).lower() + uri[match.end(1) :]


def local_location(path: str | Path) -> Location:
    """A ``file`` :class:`Location` for a local path, resolved to an absolute one (symlinks
    followed, as the CLI will open it). Not checked like :func:`parse_uri` (a local path may
    hold characters a URI may not): only for comparing the CLI's folders with each other."""
    return Location("file", "", "", str(Path(path).expanduser().resolve()))


def _segments(location: Location) -> tuple[str, ...]:
    """The location as path segments below its scheme: bucket then key parts, or the path's."""
    if location.scheme == "s3":
        return (location.bucket, *(s for s in location.key.split("/") if s))
    return tuple(s for s in location.path.split("/") if s)


def overlaps(a: Location, b: Location) -> bool:
    """Whether ``a`` and ``b`` are the same folder or one lies inside the other.

    Compared segment by segment on the normal form, so ``s3://b/run`` and ``s3://b/run-2``
    do not overlap while ``s3://b/run`` and ``S3://b/run/x/`` do."""
    if a.scheme != b.scheme:
        return False
    sa, sb = _segments(a), _segments(b)
    shorter = min(len(sa), len(sb))
    return sa[:shorter] == sb[:shorter]


def output_overlap(output: Location, inputs: Sequence[Location]) -> int | None:
    """The index of the first input that the output equals, contains or lies inside, or
    ``None``. Writing there would change an input while it is read, or publish the merge
    among its own inputs (where the next job that lists the folder would take it for one):
    the API refuses it with 422 naming ``output.uri``, the CLI with exit status 2."""
    for index, location in enumerate(inputs):
        if overlaps(output, location):
            return index
    return None
