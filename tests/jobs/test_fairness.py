"""``jobs.fairness``: the one RQ queue holds jobs in fair turns between tenants, through both
submission paths (the unkeyed transaction and the keyed unique enqueue) and RQ's own pushes.
The end-to-end measurement with two workers is ``tests/integration/test_fairness.py``."""

from __future__ import annotations

from jobs.fairness import took
from jobs.queue import make_queue
from jobs.records import JobStore, job_id_for
from jobs.spec import MergeSpec
from jobs.submission import submit
from tests.service.conftest import spec

REQUEST = MergeSpec.model_validate(spec()).model_dump(mode="json")


def _submit(store, queue, settings, tenant: str, key: str | None = None) -> str:
    job_id = job_id_for(tenant, key)
    submit(store, queue, settings, job_id=job_id, tenant=tenant, request=REQUEST,
           keyed=key is not None)  # fmt: skip
    return job_id


def _take(queue) -> str:
    """What a worker does: take the head of the list, then note its round."""
    job_id = queue.connection.lpop(queue.key).decode()
    took(queue.connection, queue.key, job_id)
    return job_id


def test_a_newcomer_goes_before_the_waiting_jobs_of_a_busy_tenant(settings, redis) -> None:
    store, queue = JobStore(redis, key_prefix=settings.key_prefix), make_queue(redis, settings)
    a = [_submit(store, queue, settings, "a") for _ in range(10)]
    assert queue.job_ids == a  # one tenant: first in, first out
    running = [_take(queue), _take(queue)]  # two workers busy with a's first two
    assert running == a[:2]
    b = _submit(store, queue, settings, "b", key="b-1")  # the keyed (unique) path
    assert queue.job_ids[0] == b  # next to start, ahead of a's eight waiting jobs
    assert queue.job_ids[1:] == a[2:]


def test_tenants_that_queue_together_take_turns(settings, redis) -> None:
    store, queue = JobStore(redis, key_prefix=settings.key_prefix), make_queue(redis, settings)
    jobs = {t: [_submit(store, queue, settings, t) for _ in range(3)] for t in ("a", "b", "c")}
    order = [next(t for t, ids in jobs.items() if job in ids) for job in queue.job_ids]
    assert order == ["c", "b", "a"] * 3  # a round each, newest tenant first within a round
    for ids in jobs.values():  # each tenant's own jobs stay in submission order
        assert [j for j in queue.job_ids if j in ids] == ids
    for _ in range(4):  # round 1 and c's job of round 2 start: round 2 is being served
        _take(queue)
    late = _submit(store, queue, settings, "d")  # a late tenant gets the next round, first
    assert queue.job_ids.index(late) == 2  # after b's and a's jobs of round 2


def test_a_tenant_returning_after_a_pause_does_not_jump_the_queue(settings, redis) -> None:
    """Rounds follow what is being served: a tenant's old, low rounds do not carry over."""
    store, queue = JobStore(redis, key_prefix=settings.key_prefix), make_queue(redis, settings)
    first = _submit(store, queue, settings, "a")
    assert _take(queue) == first
    b = [_submit(store, queue, settings, "b") for _ in range(5)]
    for _ in range(3):
        _take(queue)
    again = _submit(store, queue, settings, "a")
    assert queue.job_ids == [again, *b[3:]]  # a's turn in the current round, then b's
