"""Adapters on the Hugging Face Hub: ``hf://org/name[@revision]`` references, and how a CLI
argument or a config's ``model:`` is told apart from a local folder (docs/job-spec.md,
"Adapters from the Hugging Face Hub").

The URI form is the subset of huggingface_hub's own ``hf://[TYPE/]ID[@REVISION][/PATH]``
that names a model repository: ``hf://org/name`` or ``hf://org/name@revision`` (a branch,
a tag, a commit hash or ``refs/pr/N``); no subfolder, no dataset or space. A bare
``org/name[@revision]``, as mergekit and ``from_pretrained`` take it, is a Hub id unless a
local folder of that name exists (:func:`reference_uri`).

>>> parse_hub("hf://org/adapter@v2")
HubRef(repo_id='org/adapter', revision='v2')
>>> reference_uri("org/adapter", exists=lambda p: False)
'hf://org/adapter'
>>> reference_uri("org/adapter", exists=lambda p: True)
'org/adapter'

Imports nothing but the standard library: the API and the client use it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HUB_SCHEME", "HubRef", "is_hub_id", "parse_hub", "reference_uri"]

HUB_SCHEME = "hf://"
# The Hub's rules for a name (huggingface_hub's validate_repo_id): letters, digits, '-',
# '_', '.', at most 96, not starting or ending with '-' or '.', no '--' or '..'.
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REVISION = r"(?:refs/pr/\d+|[A-Za-z0-9_][A-Za-z0-9_.-]{0,254})"
_HUB_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<revision>{_REVISION}))?$")


@dataclass(frozen=True)
class HubRef:
    """A model repository on the Hub, and the revision asked for (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    @property
    def uri(self) -> str:
        return f"{HUB_SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def _parse_id(text: str) -> HubRef | None:
    match = _HUB_ID.match(text)
    if match is None or "--" in match["repo"] or ".." in match["repo"]:
        return None
    if match["repo"].endswith(".git"):
        return None
    return HubRef(match["repo"], match["revision"])


def parse_hub(uri: str) -> HubRef:
    """``hf://org/name[@revision][/]`` → :class:`HubRef`; ``ValueError`` saying why not."""
    if not uri.lower().startswith(HUB_SCHEME):
        raise ValueError(f"{uri!r}: not an hf:// URI")
    rest = uri[len(HUB_SCHEME) :].removeprefix("models/").rstrip("/")
    ref = _parse_id(rest)
    if ref is None:
        raise ValueError(
            f"{uri!r}: not a Hub model repository: give hf://org/name or hf://org/name@revision "
            "(no subfolder; names of letters, digits, '-', '_', '.')"
        )
    return ref


def is_hub_id(text: str) -> bool:
    """Whether ``text`` has the form of a bare Hub id, ``org/name[@revision]``."""
    return _parse_id(text) is not None


def reference_uri(text: str, exists: Callable[[str], bool] = lambda p: Path(p).exists()) -> str:
    """What an adapter reference given to the CLI (an argument or a config's ``model:``)
    names, in the job spec's terms: an ``hf://`` URI for the Hub, the text as given for a
    local folder or another URI.

    In order: a URI (``hf://``, ``file://``, ``s3://``) is what it says; an existing local
    path is local (as with mergekit and ``from_pretrained``); a path starting with ``/``,
    ``./``, ``../`` or ``~`` is local; ``org/name`` or ``org/name@revision`` is a Hub id;
    anything else is a local path. ``./org/name`` forces a local folder, ``hf://org/name``
    the Hub."""
    if "://" in text:
        return text
    if exists(text) or text.startswith(("/", "./", "../", "~")):
        return text
    ref = _parse_id(text)
    return ref.uri if ref is not None else text
