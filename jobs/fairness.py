"""Fair turns between tenants in the one RQ queue: a job's place is set by its tenant's round.

One FIFO list served every tenant in submission order, so a tenant that queued 50 jobs held
every worker until they were done. Here each job gets a *round* when it is queued: one more
than the later of its tenant's last round and the round already being served. The queue
stays one RQ list (KEDA counts it, RQ's workers take its head), kept in order of round: a job
is inserted before the first job of a round at least its own. So a tenant's k-th waiting job
runs in round k, whoever else is waiting: tenant A queues 50 jobs (rounds 1 to 50), tenant B
then submits one; B's job gets the round after the ones already started and goes before A's
job of that round, so it starts as soon as a worker frees up.

    rq:queue:<name>                    RQ's list of job ids, in order of round (kept here)
    rq:job:<id>        fair_round      the job's round (beside RQ's own fields)
    rq:queue:<name>:fair:last          hash: tenant → the last round given to one of its jobs
    rq:queue:<name>:fair:served        the highest round a worker has taken

A job's tenant is in its RQ ``meta`` (``jobs.queue.enqueue_merge``). Inserting finds the place
by binary search over the list (a few ``LINDEX`` for thousands of waiting jobs) in one Lua
script, so two submissions cannot interleave. A job pushed by RQ itself (a retry after its
worker died) keeps its round and goes to the end; the order is then only nearly sorted, which
costs a little fairness, never a job.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PLACE", "TOOK", "fair_keys", "place", "took"]

# KEYS: the queue's list, the job's RQ hash, the last-round hash, the served counter.
# ARGV: job id. Takes the job out of the list (RQ pushed it at the end) and inserts it before
# the first job whose round is at least its own; a job a worker already took stays taken.
# Returns the round given.
PLACE = """
local queue, job, last, served = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local meta = redis.call('HGET', job, 'meta')
local tenant = ''
if meta then
  local ok, decoded = pcall(cjson.decode, meta)
  if ok and type(decoded) == 'table' and type(decoded.tenant) == 'string' then
    tenant = decoded.tenant
  end
end
local round = math.max(tonumber(redis.call('GET', served) or '0'),
                       tonumber(redis.call('HGET', last, tenant) or '0')) + 1
redis.call('HSET', last, tenant, round)
redis.call('HSET', job, 'fair_round', round)
if redis.call('LREM', queue, -1, ARGV[1]) == 0 then return round end
local function round_at(i)
  local id = redis.call('LINDEX', queue, i)
  return tonumber(redis.call('HGET', 'rq:job:' .. id, 'fair_round') or '0')
end
local lo, hi = 0, redis.call('LLEN', queue)
while lo < hi do
  local mid = math.floor((lo + hi) / 2)
  if round_at(mid) >= round then hi = mid else lo = mid + 1 end
end
if lo == redis.call('LLEN', queue) then
  redis.call('RPUSH', queue, ARGV[1])
else
  redis.call('LINSERT', queue, 'BEFORE', redis.call('LINDEX', queue, lo), ARGV[1])
end
return round
"""

# KEYS: the job's RQ hash, the served counter. A worker took the job: its round is being
# served now (later jobs of any tenant get later rounds).
TOOK = """
local round = tonumber(redis.call('HGET', KEYS[1], 'fair_round') or '0')
if round > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], round) end
return round
"""


def fair_keys(queue_key: str) -> tuple[str, str]:
    """The last-round hash and the served counter of the queue whose list is ``queue_key``."""
    return f"{queue_key}:fair:last", f"{queue_key}:fair:served"


def place(redis: Any, queue_key: str, job_id: str, *, pipeline: Any = None) -> Any:
    """Move the just-pushed job ``job_id`` to its fair place (in ``pipeline`` when given)."""
    last, served = fair_keys(queue_key)
    script = redis.register_script(PLACE)
    keys = [queue_key, f"rq:job:{job_id}", last, served]
    return script(keys=keys, args=[job_id], client=pipeline or redis)


def took(redis: Any, queue_key: str, job_id: str) -> int:
    """Record that a worker took ``job_id``: its round is the one being served."""
    script = redis.register_script(TOOK)
    return int(script(keys=[f"rq:job:{job_id}", fair_keys(queue_key)[1]], args=[]))
