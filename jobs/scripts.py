"""The Lua scripts that change a job record atomically in Redis (``jobs.records.JobStore``).

Each runs as one Redis command, so a check and the change it guards cannot be split by
another client: the status machine (``jobs.status``) lives in :data:`TRANSITION`, the
run-token fence that keeps a replaced run off the record in :data:`TRANSITION` and
:data:`PROGRESS`, and the per-tenant quotas in :data:`CREATE` (checked by the same code that
creates the record, so two API processes cannot both take the last free slot).

Every script keeps the tenant's indexes in step with the record it changes: the sorted set of
all its jobs and one sorted set per status (scored by creation time, members are job keys).
``GET /merges?status=…`` reads one of those, and a tenant's active jobs are the sizes of its
``queued`` and ``running`` sets, so the count cannot drift from the records.

The keys of a tenant's indexes are passed in ``KEYS`` in this order (``jobs.records``
builds them): all jobs, then ``queued``, ``running``, ``succeeded``, ``failed``,
``canceled``.
"""

from __future__ import annotations

__all__ = [
    "CLAIM_STALE",
    "COMMIT",
    "CREATE",
    "DISCARD",
    "PROGRESS",
    "QUOTA",
    "REQUEST_CANCEL",
    "TRANSITION",
]

# The quota check shared by QUOTA and CREATE. Expects ``queued_key``, ``running_key`` and
# ``submits_key`` (a sorted set: job id → submission time in ms, Redis's clock) and the
# numbers ``max_active`` (0: no limit), ``per_window`` (0: no limit), ``window_ms``,
# ``active_retry_s``. Sets ``now_ms``; returns nil when admitted, else {code, retry-after s}
# with code -1 (too many active jobs) or -2 (too many submissions in the window).
_QUOTA_CHECK = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function active_jobs()
  return redis.call('ZCARD', queued_key) + redis.call('ZCARD', running_key)
end
local function over_quota()
  if max_active > 0 and active_jobs() >= max_active then
    -- Before refusing, drop entries whose record is gone or in another status (left by a
    -- version before these indexes, or a record deleted by hand): the count cannot drift.
    for status, index in pairs({queued = queued_key, running = running_key}) do
      for _, job in ipairs(redis.call('ZRANGE', index, 0, -1)) do
        if redis.call('HGET', job, 'status') ~= status then redis.call('ZREM', index, job) end
      end
    end
    if active_jobs() >= max_active then return {-1, active_retry_s} end
  end
  if per_window > 0 then
    local since = now_ms - window_ms
    local recent = redis.call('ZCOUNT', submits_key, '(' .. since, '+inf')
    if recent >= per_window then
      -- the submission whose leaving the window frees a slot
      local row = redis.call('ZRANGEBYSCORE', submits_key, '(' .. since, '+inf', 'WITHSCORES',
                             'LIMIT', recent - per_window, 1)
      local wait_ms = tonumber(row[2]) + window_ms - now_ms
      return {-2, math.max(1, math.ceil(wait_ms / 1000))}
    end
  end
  return nil
end
"""

# KEYS: the tenant's queued and running indexes, its submissions. ARGV: max active, max per
# window, window ms, retry-after s for the active limit. Creates nothing (it may only drop
# stale index entries): {1, 0} when a submission would be admitted now, else {-1 or -2,
# retry-after s}.
QUOTA = (
    """
local queued_key, running_key, submits_key = KEYS[1], KEYS[2], KEYS[3]
local max_active, per_window = tonumber(ARGV[1]), tonumber(ARGV[2])
local window_ms, active_retry_s = tonumber(ARGV[3]), tonumber(ARGV[4])
"""
    + _QUOTA_CHECK
    + """
return over_quota() or {1, 0}
"""
)

# KEYS: job. ARGV: run token. The worker is about to write the report, which makes the job's
# output final: 1 = go (the record now says so, and a cancel from here on is refused), 0 =
# stop (a cancel was requested first, the job is no longer running, or this run was replaced).
COMMIT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'run') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 0 end
redis.call('HSET', KEYS[1], 'committing', '1')
return 1
"""

# KEYS: job. A cancel of a running job: sets the flag the worker checks, unless the worker
# has started writing the report ("committing": too late to stop, the API answers 409).
# Returns the outcome: 'requested', 'committing', or the status when the job is not running.
REQUEST_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' then return status or '' end
if redis.call('HGET', KEYS[1], 'committing') == '1' then return 'committing' end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
return 'requested'
"""

# Keeps a tenant's stored records at ``max_stored`` (0: no limit) by deleting its oldest
# finished ones (or index entries whose record is gone); queued and running jobs are never
# deleted. Expects ``all_jobs`` and KEYS[3..8] (the tenant's six indexes) and ``max_active``.
_EVICT_OLDEST = """
local function evict_oldest(max_stored)
  if max_stored <= 0 then return end
  local excess = redis.call('ZCARD', all_jobs) - max_stored
  if excess <= 0 then return end
  -- among the oldest excess + (at most the active ones) entries, finished records go first
  local span = excess + math.max(max_active, 100)
  for _, old in ipairs(redis.call('ZRANGE', all_jobs, 0, span - 1)) do
    if excess <= 0 then break end
    local status = redis.call('HGET', old, 'status')
    if status ~= 'queued' and status ~= 'running' then
      redis.call('DEL', old)
      for i = 3, 8 do redis.call('ZREM', KEYS[i], old) end
      excess = excess - 1
    end
  end
end
"""

# KEYS: job, stats, the tenant's six indexes (all, queued, running, succeeded, failed,
# canceled), its submissions, the accepting set. ARGV: creation score, max active, max per
# window, window ms, retry-after s for the active limit, max stored records (0: no limit),
# accepting since ('' = not accepting), then field/value pairs. Returns {1, 0} created,
# {0, 0} the id exists already (checked first, so an idempotent repeat gets its job back even
# at a limit), {-1 or -2, retry-after s} refused by a quota. Also drops up to two expired
# entries from the old end of the all-jobs index, and the tenant's oldest finished records
# beyond max stored.
CREATE = (
    """
local job, stats, all_jobs = KEYS[1], KEYS[2], KEYS[3]
local queued_key, running_key, submits_key, accepting = KEYS[4], KEYS[5], KEYS[9], KEYS[10]
local max_active, per_window = tonumber(ARGV[2]), tonumber(ARGV[3])
local window_ms, active_retry_s = tonumber(ARGV[4]), tonumber(ARGV[5])
if redis.call('EXISTS', job) == 1 then return {0, 0} end
"""
    + _QUOTA_CHECK
    + _EVICT_OLDEST
    + """
local refused = over_quota()
if refused then return refused end
redis.call('HSET', job, unpack(ARGV, 8))
redis.call('ZADD', all_jobs, ARGV[1], job)
redis.call('ZADD', queued_key, ARGV[1], job)
redis.call('HINCRBY', stats, 'entered:queued', 1)
redis.call('HINCRBY', stats, 'active:queued', 1)
if per_window > 0 then
  redis.call('ZREMRANGEBYSCORE', submits_key, '-inf', now_ms - window_ms)
  redis.call('ZADD', submits_key, now_ms, redis.call('HGET', job, 'id'))
  redis.call('PEXPIRE', submits_key, window_ms)
end
if ARGV[7] ~= '' then redis.call('ZADD', accepting, ARGV[7], job) end
for _, old in ipairs(redis.call('ZRANGE', all_jobs, 0, 1)) do
  if redis.call('EXISTS', old) == 0 then redis.call('ZREM', all_jobs, old) end
end
evict_oldest(tonumber(ARGV[6]))
return {1, 0}
"""
)

# KEYS: job, stats, the tenant's six indexes (all, queued, running, succeeded, failed,
# canceled). ARGV: to, allowed-from (",a,b,"), ttl (0: keep), run token ('' = any run), then
# field/value pairs. Returns {1, previous} when moved, {0, current or ""} when the record is not
# in an allowed state or is held by another run. Moving the record moves it between the status
# indexes; entering a terminal index drops up to two expired entries from its old end.
TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {0, ''} end
if not string.find(ARGV[2], ',' .. current .. ',', 1, true) then return {0, current} end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'run') ~= ARGV[4] then return {0, current} end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
for i = 5, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[1], ARGV[i])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
if current ~= ARGV[1] then
  redis.call('HINCRBY', KEYS[2], 'entered:' .. ARGV[1], 1)
  if current == 'queued' or current == 'running' then
    redis.call('HINCRBY', KEYS[2], 'active:' .. current, -1)
  end
  if ARGV[1] == 'queued' or ARGV[1] == 'running' then
    redis.call('HINCRBY', KEYS[2], 'active:' .. ARGV[1], 1)
  end
  local index = {queued = KEYS[4], running = KEYS[5], succeeded = KEYS[6], failed = KEYS[7],
                 canceled = KEYS[8]}
  local score = redis.call('ZSCORE', KEYS[3], KEYS[1])
  if not score then score = redis.call('TIME')[1] end
  redis.call('ZREM', index[current], KEYS[1])
  redis.call('ZADD', index[ARGV[1]], score, KEYS[1])
  if ARGV[1] ~= 'queued' and ARGV[1] ~= 'running' then
    for _, old in ipairs(redis.call('ZRANGE', index[ARGV[1]], 0, 1)) do
      if redis.call('EXISTS', old) == 0 then redis.call('ZREM', index[ARGV[1]], old) end
    end
  end
end
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return {1, current}
"""

# KEYS: job. ARGV: progress JSON, run token ('' = any), now (ISO 8601). Publishes progress of
# a running job; 1 = it should stop (canceled, no longer running, or this run was replaced).
PROGRESS = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 1 end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'run') ~= ARGV[2] then return 1 end
redis.call('HSET', KEYS[1], 'progress', ARGV[1], 'updated_at', ARGV[3])
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 1 end
return 0
"""

# KEYS: job, stats, the tenant's six indexes (all, queued … canceled), its submissions, the
# accepting set. ARGV: job id. Undo a create whose enqueue failed: the submission never
# happened, so it leaves no trace in any index nor in the tenant's quota.
DISCARD = """
if redis.call('HGET', KEYS[1], 'status') == 'queued' then
  redis.call('HINCRBY', KEYS[2], 'entered:queued', -1)
  redis.call('HINCRBY', KEYS[2], 'active:queued', -1)
end
redis.call('DEL', KEYS[1])
for i = 3, 8 do redis.call('ZREM', KEYS[i], KEYS[1]) end
redis.call('ZREM', KEYS[9], ARGV[1])
redis.call('ZREM', KEYS[10], KEYS[1])
return 1
"""

# KEYS: the accepting set (job key → when its API request created it). ARGV: cutoff, now,
# at most how many. Returns the job keys still marked accepting since before the cutoff, and
# moves each one's time to ``now``: of several API processes sweeping at once only one gets a
# given job, and should it die before repairing it, the job comes up again a cutoff later.
CLAIM_STALE = """
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, job in ipairs(stale) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], job) end
return stale
"""
