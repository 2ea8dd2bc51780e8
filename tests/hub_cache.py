"""A Hugging Face Hub cache, laid out as huggingface_hub lays it out, holding real PEFT
adapters: the Hub's side of the tests that cannot reach the Hub (offline mode).

    <cache>/models--<org>--<name>/blobs/<sha256 of the file>
                                 /refs/<branch or tag>        the commit hash
                                 /snapshots/<commit>/<file>   a link to its blob
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["commit_hash", "put_in_cache"]


def commit_hash(label: str) -> str:
    """A 40-digit commit hash, made up from ``label``."""
    return hashlib.sha1(label.encode()).hexdigest()


def put_in_cache(
    cache: Path,
    repo_id: str,
    folder: Path,
    *,
    refs: tuple[str, ...] = ("main",),
    commit: str | None = None,
    files: tuple[str, ...] = ("adapter_config.json", "adapter_model.safetensors"),
) -> str:
    """Put ``files`` of ``folder`` in the cache as ``repo_id`` at one commit, which each of
    ``refs`` points to; returns the commit hash."""
    commit = commit or commit_hash(f"{repo_id}:{folder}")
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in files:
        data = (folder / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return commit
