"""Where adapters come from and where merged adapters go: ``s3://`` and ``file://``.

    objects.py   ObjectStore, the one interface both stores implement
    s3.py        S3Store: one bucket through boto3 (pinned reads, conditional creates)
    local.py     LocalStore: the local file system (atomic, conditional creates)
    errors.py    S3's errors as job errors
    inputs.py    checking input adapters, then handing out their bytes (pinned) or copying them
    hub.py       Hugging Face Hub adapters (hf://): sized, then fetched into its cache
    publish.py   publishing an output without destroying data (claim, files, report last)
    ownership.py who wrote an object at an output: a tag nobody outside the service can forge
    reports.py   a merge_report.json found at an output, read back within bounds

:class:`Storage` puts them together for a job: it picks the store for each location and runs
the input and publishing protocols on it. Stores are made by a factory that tests can replace
(``Storage(stores=...)``), so a job runs against an in-memory store as it would against S3.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from jobs.hub import HUB_SCHEME, parse_hub
from jobs.uris import Location, parse_uri
from worker.adapters.format import CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME

from .hub import HubAdapter, check_hub_adapter, fetch_hub_adapter
from .inputs import (
    CheckedAdapter,
    RemoteInput,
    check_adapter,
    check_limits,
    prepare_remote,
)
from .local import LocalStore
from .objects import ObjectStore
from .ownership import JOB_ID_META, RUN_META, TAG_META, Owner
from .publish import (
    CLAIM_NAME,
    OutputPublisher,
    conditional_writes_honoured,
    remove_run_leftovers,
)
from .s3 import S3Store, make_s3_client

__all__ = [
    "CLAIM_NAME",
    "CONFIG_NAME",
    "JOB_ID_META",
    "REPORT_NAME",
    "RUN_META",
    "TAG_META",
    "WEIGHTS_NAME",
    "LocalStore",
    "ObjectStore",
    "OutputPublisher",
    "Owner",
    "RemoteInput",
    "S3Store",
    "Storage",
    "conditional_writes_honoured",
    "make_s3_client",
    "make_transfer_config",
    "remove_dead_run_leftovers",
]


def make_transfer_config(settings: Any) -> Any:
    """The transfer sizes and concurrency of ``settings`` (multipart threshold and part size,
    parallel parts), as boto3's ``TransferConfig``."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=settings.s3_multipart_threshold,
        multipart_chunksize=settings.s3_multipart_chunksize,
        max_concurrency=settings.s3_max_concurrency,
    )


class Storage:
    """Fetches adapters and publishes outputs. ``s3`` is a boto3 S3 client (or ``None`` when
    only ``file://`` locations are used); ``stores`` replaces the store factory (tests)."""

    def __init__(
        self,
        s3: Any = None,
        *,
        transfer_config: Any = None,
        max_job_bytes: int | None = None,
        max_adapter_bytes: int | None = None,
        max_parallel: int = 8,
        stores: Callable[[Location], ObjectStore] | None = None,
    ) -> None:
        self.s3 = s3
        self.transfer_config = transfer_config
        self.max_job_bytes = max_job_bytes
        self.max_adapter_bytes = max_adapter_bytes
        self.max_parallel = max_parallel
        self._stores = stores or self._default_store
        #: The Hub inputs of the last inputs checked, by index, pinned to their
        #: commits (``hub.pinned_spec`` records them in the job's report).
        self.hub_inputs: dict[int, HubAdapter] = {}

    def _default_store(self, loc: Location) -> ObjectStore:
        if loc.scheme == "file":
            return LocalStore()
        t = self.transfer_config
        sizes = {} if t is None else {
            "multipart_threshold": t.multipart_threshold,
            "chunk_size": t.multipart_chunksize,
            "concurrency": t.max_concurrency,
        }  # fmt: skip
        return S3Store(self.s3, loc.bucket, **sizes)

    def locate(self, uri: str) -> tuple[ObjectStore, str, Location]:
        """The store holding ``uri``, the key prefix of its folder there, and the location."""
        loc = parse_uri(uri)
        prefix = loc.key if loc.scheme == "s3" else loc.path.strip("/") + "/"
        return self._stores(loc), prefix, loc

    # -- inputs
    def check_inputs(
        self, uris: Sequence[str], pool: ThreadPoolExecutor
    ) -> list[tuple[ObjectStore | None, CheckedAdapter | HubAdapter]]:
        """Every adapter's size and safetensors prefix checked (a Hub adapter's sizes and
        commit), and the limits, before any of its tensors is read. An adapter named by
        several entries is checked once, and the entries share its result (one URI, one ETag
        or commit); the size limits count it once per entry, as the merge reads it once per
        entry's weight."""

        def key(uri: str) -> str:
            return uri if uri.startswith(HUB_SCHEME) else parse_uri(uri).normalized

        def check(uri: str) -> tuple[ObjectStore | None, CheckedAdapter | HubAdapter]:
            if uri.startswith(HUB_SCHEME):
                return None, check_hub_adapter(parse_hub(uri))
            store, prefix, loc = self.locate(uri)
            return store, check_adapter(store, loc, prefix)

        firsts: dict[str, str] = {}
        for uri in uris:
            firsts.setdefault(key(uri), uri)
        checked = dict(zip(firsts, pool.map(check, firsts.values()), strict=True))
        entries = [checked[key(uri)] for uri in uris]
        check_limits([c for _, c in entries], self.max_adapter_bytes, self.max_job_bytes)  # type: ignore[misc]
        self.hub_inputs = {i: c for i, (_, c) in enumerate(entries) if isinstance(c, HubAdapter)}
        return entries

    def _pool(self, count: int) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(min(self.max_parallel, count) or 1)

    def open_inputs(self, uris: Sequence[str], dest: Path) -> list[Path | RemoteInput]:
        """The adapters at ``uris``, in order, ready for ``worker.merge.runner.run_merge``: checked
        first (sizes, limits, prefix); a ``file://`` adapter is its folder, used in place; an
        S3 adapter a :class:`RemoteInput`: its config copied to ``dest/<n>/``, its weights
        handed out as a pinned object (``worker.adapters.opening`` reads them); a Hub
        adapter its two files fetched at the commit it was sized at (``hub_inputs``).
        Entries naming the same adapter get the same object, so it is opened once."""
        with self._pool(len(uris)) as pool:
            checked = self.check_inputs(uris, pool)
            distinct = list({id(adapter): (store, adapter) for store, adapter in checked}.values())

            def prepare(i: int) -> Path | RemoteInput:
                store, adapter = distinct[i]
                if isinstance(adapter, HubAdapter):  # fetched into huggingface_hub's cache
                    return fetch_hub_adapter(adapter)
                if adapter.location.scheme == "file":
                    return Path(adapter.location.path)
                return prepare_remote(store, adapter, dest / str(i))

            prepared = dict(
                zip(
                    (id(a) for _, a in distinct),
                    pool.map(prepare, range(len(distinct))),
                    strict=True,
                )
            )
            return [prepared[id(adapter)] for _, adapter in checked]

    # -- output
    def publisher(
        self, uri: str, *, owner: Owner, run: str, claim_wait_s: float = 120.0
    ) -> OutputPublisher:
        """The publisher of one run of ``owner``'s job at ``uri`` (``worker.storage.publish``)."""
        store, prefix, loc = self.locate(uri)
        return OutputPublisher(
            store, prefix, loc.normalized, owner=owner, run=run, claim_wait_s=claim_wait_s
        )

    def drop_claim(self, uri: str, owner: Owner) -> None:
        """Delete the claim of ``owner``'s job on the output at ``uri``, if one is left beside
        its published report (a run killed between the two); another job's claim stays."""
        store, prefix, _ = self.locate(uri)
        if owner.wrote(store.head(prefix + CLAIM_NAME)):
            store.delete(prefix + CLAIM_NAME)

    def remove_leftovers(self, uri: str, owner: Owner, run: str | None) -> None:
        """What a dead run of ``owner``'s job left at ``uri`` (``publish.remove_run_leftovers``)."""
        store, prefix, _ = self.locate(uri)
        remove_run_leftovers(store, prefix, owner, run)


def remove_dead_run_leftovers(
    settings: Any, job_id: str, uri: str, run: str | None = None, *, secret: str | None = None
) -> None:
    """For the worker that saw a run of ``job_id`` die: remove what that run (``run``; every
    run of the job when None, its last one) left at the output ``uri``. ``secret`` is the
    job's (its record's ``output_secret``): without it nothing can be told the job's, and
    nothing is removed."""
    if secret is None:
        return
    loc = parse_uri(uri)
    Storage(make_s3_client(settings) if loc.scheme == "s3" else None).remove_leftovers(
        uri, Owner(job_id, secret), run
    )
