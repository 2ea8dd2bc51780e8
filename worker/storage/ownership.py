"""Which job, and which run of it, wrote an object at an output: a mark nobody outside the
service can forge.

Every object a run creates carries three metadata values: the job id, the run, and a tag,
``HMAC-SHA256(secret, job id ␀ run ␀ key)``, where ``secret`` is the job's own random nonce,
made by the worker on the job's first run and kept in its record in Redis (never shown by
the API, never written anywhere else). An object is the job's only when its tag verifies:

- the job id alone is not enough, since a keyed job's id is derived from the tenant and the
  ``Idempotency-Key`` and known before the job exists: a ``merge_report.json`` planted at
  the output with that id in its metadata is not the job's, and the job ends
  ``output_exists`` instead of "succeeding" without merging;
- the tag names the key, so the tag of one object (visible to anyone who can read the
  output, on the claim for instance) cannot be copied onto another;
- the tag names the run, so a run tells the objects it created itself (a PUT whose answer
  was lost, then retried) from those of another run of the same job.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from .objects import ObjectInfo

__all__ = ["JOB_ID_META", "RUN_META", "TAG_META", "Owner"]

#: Metadata naming the job, and the run of it, that wrote an object, and the tag proving it.
JOB_ID_META = "coremerge-job-id"
RUN_META = "coremerge-run"
TAG_META = "coremerge-tag"


@dataclass(frozen=True)
class Owner:
    """A job as the owner of output objects: its id and its secret nonce.

    >>> owner = Owner("job-1", "s3cr3t")
    >>> meta = owner.metadata("run-1", "out/merge_report.json")
    >>> owner.run_of(ObjectInfo("out/merge_report.json", 2, "e", meta))
    'run-1'
    >>> owner.run_of(ObjectInfo("out/README.md", 2, "e", meta)) is None  # a copied tag
    True
    """

    job_id: str
    secret: str = field(repr=False)

    def _tag(self, run: str, key: str) -> str:
        message = f"{self.job_id}\0{run}\0{key}".encode()
        return hmac.new(self.secret.encode(), message, hashlib.sha256).hexdigest()

    def metadata(self, run: str, key: str) -> dict[str, str]:
        """What run ``run`` of the job writes with the object ``key``."""
        return {JOB_ID_META: self.job_id, RUN_META: run, TAG_META: self._tag(run, key)}

    def run_of(self, info: ObjectInfo | None) -> str | None:
        """The run of this job that wrote the object, or None: not this job's (another
        job's, nobody's, or a forgery)."""
        if info is None or info.metadata.get(JOB_ID_META) != self.job_id:
            return None
        run, tag = info.metadata.get(RUN_META, ""), info.metadata.get(TAG_META, "")
        return run if run and hmac.compare_digest(tag, self._tag(run, info.key)) else None

    def wrote(self, info: ObjectInfo | None) -> bool:
        """Whether some run of this job wrote the object."""
        return self.run_of(info) is not None
