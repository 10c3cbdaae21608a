"""Lua scripts the RabbitMQ broker runs on its Redis state store (the Redis broker's key layout).

The state store holds every job's record in the Redis broker's format (see redis_keys), so the
Redis broker's own scripts answer get_job, stats, cancel, settle, extend and the DLQ. These add
what RabbitMQ needs: claiming a job whose AMQP message a fetch just took, and undoing the records
of an enqueue that RabbitMQ refused.
"""

from __future__ import annotations

from offload.brokers.redis_keys import script

# ARGV: namespace, worker name, ids... For each id returns a verdict and its fields:
#   "take", queue, body, token, deliveries, attempts, lease seconds   (leased to the caller)
#   "wait", seconds, queue, prio                     (not due yet / leased elsewhere: delay it)
#   "drop"                                           (finished, cancelled, purged: ack and forget)
CLAIM = script(
    """
local worker = ARGV[2]
local now = now_ts()
local out, finished, leased = {}, {}, {}
local function claim(id, q, f)
  local deliveries = tonumber(f.deliv) + 1
  local token = redis.call('INCR', K_TOKEN)
  local expires = fmt(now + tonumber(f.lease))
  redis.call('HSET', k_job(id), 'state', 'running', 'deliv', deliveries, 'token', token, 'lexp', expires,
    'started', fmt(now), 'worker', worker)
  redis.call('ZADD', K_LEASES, expires, id)
  bump(leased, q, 1)
  out[#out + 1] = {'take', q, f.body, token, deliveries, f.att, f.lease}
end
for i = 3, #ARGV do
  local id = ARGV[i]
  local v = redis.call('HMGET', k_job(id), 'state', 'queue', 'body', 'deliv', 'att', 'lease', 'lexp',
    'maxd', 'prio', 'run_at', 'rm')
  local f = {state = v[1], q = v[2], body = v[3], deliv = v[4], att = v[5], lease = v[6], lexp = v[7],
    maxd = v[8], prio = v[9], run_at = v[10], rm = v[11]}
  if f.state == 'queued' then
    local due = tonumber(f.run_at or '0')
    if due > now + 0.002 then
      out[#out + 1] = {'wait', fmt(due - now), f.q, f.prio}
    else
      if f.rm then redis.call('ZREM', k_ready(f.q), f.rm) end
      redis.call('ZREM', k_delayed(f.q), id)
      redis.call('HDEL', k_job(id), 'rm')
      claim(id, f.q, f)
    end
  elseif f.state == 'running' then
    local lexp = tonumber(f.lexp)
    if lexp > now then
      -- RabbitMQ redelivered it early (the holder's channel closed): wait out the lease.
      out[#out + 1] = {'wait', fmt(lexp - now), f.q, f.prio}
    else
      redis.call('ZREM', K_LEASES, id)
      redis.call('HINCRBY', K_RUNNING, f.q, -1)
      local deliveries, most = tonumber(f.deliv), tonumber(f.maxd)
      if deliveries >= most then
        to_dlq(id, f.q, now, 'delivered ' .. deliveries .. ' times without being settled (max_deliveries='
          .. most .. '); the worker crashed or lost its lease each time', finished)
        out[#out + 1] = {'drop'}
      else
        claim(id, f.q, f)
      end
    end
  else
    out[#out + 1] = {'drop'}
  end
end
for q, n in pairs(leased) do redis.call('HINCRBY', K_RUNNING, q, n) end
count_finished(finished, now)
return out
"""
)

# ARGV: namespace, ids... Deletes the records (and idempotency keys) of jobs RabbitMQ refused.
ROLLBACK = script(
    """
for i = 2, #ARGV do
  local id = ARGV[i]
  local f = redis.call('HMGET', k_job(id), 'state', 'queue', 'rm', 'ikey')
  if f[1] == 'queued' then
    if f[3] then redis.call('ZREM', k_ready(f[2]), f[3]) end
    redis.call('ZREM', k_delayed(f[2]), id)
    if f[4] and redis.call('GET', k_idem(f[4])) == id then redis.call('DEL', k_idem(f[4])) end
    redis.call('DEL', k_job(id))
  end
end
return 0
"""
)

# ARGV: namespace, ids... Returns per id: state, queue, prio, run_at (what a re-publish needs).
ROUTE = script(
    """
local out = {}
for i = 2, #ARGV do
  local f = redis.call('HMGET', k_job(ARGV[i]), 'state', 'queue', 'prio', 'run_at')
  out[#out + 1] = {f[1] or '', f[2] or '', f[3] or '0', f[4] or '0'}
end
return out
"""
)
