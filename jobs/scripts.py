"""The Lua scripts that change a job record atomically in Redis (``jobs.records.JobStore``).

Each runs as one Redis command, so a check and the change it guards cannot be split by
another client: the status machine (``jobs.status``) lives in :data:`TRANSITION`, and the
run-token fence that keeps a replaced run off the record in :data:`TRANSITION` and
:data:`PROGRESS`.
"""

from __future__ import annotations

__all__ = ["CREATE", "DISCARD", "PROGRESS", "TRANSITION"]

# KEYS: job, stats. ARGV: to, allowed-from (",a,b,"), ttl (0: keep), run token ('' = any run),
# then field/value pairs. Returns {1, previous} when moved, {0, current or ""} when the record
# is not in an allowed state or is held by another run.
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
end
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return {1, current}
"""

# KEYS: job, tenant index, stats. ARGV: score, then field/value pairs. 1 = created, 0 = exists.
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('ZADD', KEYS[2], ARGV[1], KEYS[1])
redis.call('HINCRBY', KEYS[3], 'entered:queued', 1)
redis.call('HINCRBY', KEYS[3], 'active:queued', 1)
return 1
"""

# KEYS: job. ARGV: progress JSON, run token ('' = any). Publishes progress of a running job;
# 1 = it should stop (canceled, no longer running, or this run was replaced by another).
PROGRESS = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 1 end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'run') ~= ARGV[2] then return 1 end
redis.call('HSET', KEYS[1], 'progress', ARGV[1])
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 1 end
return 0
"""

# KEYS: job, tenant index, stats. Undo a create whose enqueue failed.
DISCARD = """
if redis.call('HGET', KEYS[1], 'status') == 'queued' then
  redis.call('HINCRBY', KEYS[3], 'entered:queued', -1)
  redis.call('HINCRBY', KEYS[3], 'active:queued', -1)
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], KEYS[1])
return 1
"""
