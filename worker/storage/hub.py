"""Input adapters on the Hugging Face Hub (``hf://org/name[@revision]``), through
``huggingface_hub``: its cache, its token (``HF_TOKEN``, or a ``huggingface-cli login``) and
its offline mode (``HF_HUB_OFFLINE=1``: only what the cache holds).

    check_hub_adapter(ref)     the revision pinned to a commit, both files' sizes: nothing
                               downloaded (online: the Hub's file metadata; offline: the cache)
    fetch_hub_adapter(adapter) the two files at that commit, into the cache; their folder

Only ``adapter_config.json`` and ``adapter_model.safetensors`` are ever fetched: a repository
that has only pickle weights (``adapter_model.bin``) is refused, never downloaded. Sizes are
known before a byte is written, so the service checks them against its limits first
(``worker.storage.inputs.check_limits``). Errors are job errors whose messages carry the
repository and the cause, never a host, a path or the library's text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.errors import AccessDenied, AdapterInvalid, AdapterNotFound, MergeError, StorageError
from jobs.hub import HUB_SCHEME, HubRef, parse_hub
from jobs.spec import MergeSpec
from jobs.uris import Location, parse_uri
from worker.adapters.format import CONFIG_NAME, PICKLE_NAMES, WEIGHTS_NAME

__all__ = [
    "HubAdapter",
    "check_hub_adapter",
    "fetch_hub_adapter",
    "pinned_spec",
    "resolve_cli_inputs",
]

log = logging.getLogger("coremerge.hub")

_FILES = (CONFIG_NAME, WEIGHTS_NAME)


@dataclass(frozen=True)
class HubAdapter:
    """A Hub adapter, measured: its repository, the commit its revision resolved to, and
    its two files' sizes (the duck type of ``inputs.CheckedAdapter`` that the limits take)."""

    ref: HubRef
    commit: str
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())

    @property
    def uri(self) -> str:
        """The adapter pinned to its commit: what the report and the model card record."""
        return HubRef(self.ref.repo_id, self.commit).uri

    @property
    def location(self) -> Location:
        return parse_uri(self.uri)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_hub_adapter(ref: HubRef) -> HubAdapter:
    """Resolve ``ref``'s revision to a commit and size its two files, downloading nothing."""
    try:
        return _from_cache(ref) if _offline() else _from_hub(ref)
    except MergeError:
        raise
    except Exception as exc:
        raise _job_error(ref, exc) from None


def _from_hub(ref: HubRef) -> HubAdapter:
    from huggingface_hub import HfApi

    api = HfApi()
    commit = api.repo_info(ref.repo_id, revision=ref.revision).sha
    if not commit:
        raise StorageError(f"{ref.uri}: the Hub gave no commit for this revision")
    infos = api.get_paths_info(ref.repo_id, [*_FILES, *PICKLE_NAMES], revision=commit)
    sizes = {info.path: int(info.size) for info in infos if getattr(info, "size", None) is not None}
    _refuse_missing(ref, sizes)
    return HubAdapter(ref, commit, {name: sizes[name] for name in _FILES})


def _from_cache(ref: HubRef) -> HubAdapter:
    """Offline: the cache's snapshot of the revision (a branch or tag through the cache's
    refs, or a commit hash)."""
    from huggingface_hub import try_to_load_from_cache

    found: dict[str, Path] = {}
    for name in (*_FILES, *PICKLE_NAMES):
        path = try_to_load_from_cache(ref.repo_id, name, revision=ref.revision or "main")
        if isinstance(path, str):
            found[name] = Path(path)
    if WEIGHTS_NAME in found or not set(found) & set(PICKLE_NAMES):
        missing = [name for name in _FILES if name not in found]
        if missing:
            raise AdapterNotFound(
                f"{ref.uri}: {' and '.join(missing)} not in the local Hugging Face cache, and "
                "HF_HUB_OFFLINE is set"
            )
    _refuse_missing(ref, {name: 0 for name in found})
    commit = found[CONFIG_NAME].parent.name
    if found[WEIGHTS_NAME].parent.name != commit:
        raise AdapterNotFound(f"{ref.uri}: the cache holds the two files of different commits")
    return HubAdapter(ref, commit, {name: found[name].stat().st_size for name in _FILES})


def _refuse_missing(ref: HubRef, present: dict[str, Any]) -> None:
    """Pickle weights alone are refused (never fetched); so is a repository that is not a
    PEFT adapter."""
    if WEIGHTS_NAME not in present:
        pickle = next((p for p in PICKLE_NAMES if p in present), None)
        if pickle is not None:
            raise AdapterInvalid(
                f"{ref.uri}: has {pickle} (pickle) and no {WEIGHTS_NAME}; pickle weights are "
                "refused, and were not downloaded"
            )
        raise AdapterNotFound(f"{ref.uri}: no {WEIGHTS_NAME} in this repository")
    if CONFIG_NAME not in present:
        raise AdapterInvalid(f"{ref.uri}: has weights but no {CONFIG_NAME} (not a PEFT adapter)")


def fetch_hub_adapter(adapter: HubAdapter) -> Path:
    """The folder (the cache's snapshot of the commit) holding the adapter's two files,
    fetched if the cache lacks them; each must have the size it was checked with."""
    from huggingface_hub import hf_hub_download

    paths = {}
    try:
        for name in _FILES:
            paths[name] = Path(hf_hub_download(adapter.ref.repo_id, name, revision=adapter.commit))
    except Exception as exc:
        raise _job_error(adapter.ref, exc) from None
    for name, path in paths.items():
        if path.stat().st_size != adapter.sizes[name]:
            raise StorageError(
                f"{adapter.uri}: {name} changed size between being checked and fetched"
            )
    return paths[WEIGHTS_NAME].parent


def _job_error(ref: HubRef, exc: Exception) -> MergeError:
    """The job error for a ``huggingface_hub`` failure; its text goes to the log only."""
    from huggingface_hub import errors

    log.warning("hub: %s: %s: %s", ref.uri, type(exc).__name__, exc)
    if isinstance(exc, errors.GatedRepoError):
        return AccessDenied(f"{ref.uri}: a gated repository; this token has no access to it")
    if isinstance(exc, errors.RevisionNotFoundError):
        return AdapterNotFound(f"{ref.uri}: no revision {ref.revision!r} in this repository")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return AdapterNotFound(f"{ref.uri}: no such repository, or it is private to others")
    if isinstance(exc, errors.EntryNotFoundError):
        return AdapterNotFound(f"{ref.uri}: a file of the adapter is missing")
    if isinstance(exc, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        return AdapterNotFound(
            f"{ref.uri}: not in the local Hugging Face cache, and the Hub cannot be reached "
            "(or HF_HUB_OFFLINE is set)"
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return AccessDenied(f"{ref.uri}: the Hub refused access (HTTP {status}); check HF_TOKEN")
    return StorageError(
        f"{ref.uri}: the Hugging Face Hub failed ({type(exc).__name__}); nothing was merged"
    )


def pinned_spec(spec: MergeSpec, pinned: dict[int, HubAdapter]) -> MergeSpec:
    """``spec`` with each Hub adapter (by index) at its commit, named by its repository
    unless the spec names it: what the report and the model card then record."""
    adapters = list(spec.adapters)
    for i, hub in pinned.items():
        ref = adapters[i]
        adapters[i] = ref.model_copy(update={"uri": hub.uri, "name": ref.name or hub.ref.repo_id})
    return spec.model_copy(update={"adapters": adapters})


def resolve_cli_inputs(
    spec: MergeSpec, local: Callable[[str], Path]
) -> tuple[MergeSpec, list[Path]]:
    """The CLI's inputs as folders: a Hub adapter checked, fetched and pinned; any other
    through ``local`` (the CLI's local path rule)."""
    pinned = {
        i: check_hub_adapter(parse_hub(ref.uri))
        for i, ref in enumerate(spec.adapters)
        if ref.uri.startswith(HUB_SCHEME)
    }
    dirs = [
        fetch_hub_adapter(pinned[i]) if i in pinned else local(ref.uri)
        for i, ref in enumerate(spec.adapters)
    ]
    return pinned_spec(spec, pinned), dirs
