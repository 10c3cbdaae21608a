"""Lua scripts the RabbitMQ broker runs on its Redis state store (the Redis broker's key layout).

The state store holds every job's record in the Redis broker's format (see redis_keys), so the
Redis broker's own scripts answer get_job, stats, cancel, settle, extend and the DLQ. These add
what RabbitMQ needs: claiming a job whose AMQP message a fetch just took, undoing the records of
an enqueue that RabbitMQ refused, marking records whose publish is not confirmed yet and sweeping
them, telling a fetch which priority classes to look in, and recycling poison messages.
"""

from __future__ import annotations

from offload.brokers import redis_scripts
from offload.brokers.rabbitmq_url import CLASSES, UNPUBLISHED
from offload.brokers.redis_keys import script

_KEYS = f"""
local K_UNPUBLISHED = P .. '{UNPUBLISHED}'
local function k_classes(q) return P .. '{CLASSES}' .. q end
"""


def _script(body: str) -> str:
    return script(_KEYS + body)


# ARGV: namespace, worker name, ids... For each id returns a verdict and its fields:
#   "take", queue, body, token, deliveries, attempts, lease seconds   (leased to the caller)
#   "wait", seconds, queue, prio                     (not due yet / leased elsewhere: delay it)
#   "drop"                                           (finished, cancelled, purged: ack and forget;
#                                                     also a second message of a job in this batch)
# Per job only its HMGET and HSET (and HDEL of its ready member); the sorted-set updates and the
# fencing tokens (next_token once, then a range) are one command per batch.
CLAIM = _script(
    """
local worker = ARGV[2]
local now = now_ts()
local started = fmt(now)
local out, finished, leased, taken = {}, {}, {}, {}
local unready, undelay = {}, {}  -- per queue: ready-set members, delayed ids to remove
local function add(t, key, x)
  local l = t[key]
  if l == nil then l = {}; t[key] = l end
  l[#l + 1] = x
end
local seen = {}  -- the records are written after the loop: a job's second message must not see
                -- it still queued (after a crash, a redelivery and a re-publish can arrive together)
for i = 3, #ARGV do
  local id = ARGV[i]
  local v = redis.call('HMGET', k_job(id), 'state', 'queue', 'body', 'deliv', 'att', 'lease', 'lexp',
    'maxd', 'prio', 'run_at', 'rm')
  local state, q = v[1], v[2]
  if seen[id] then
    out[#out + 1] = {'drop'}
  elseif state == 'queued' then
    local due = tonumber(v[10] or '0')
    if due > now + 0.002 then
      out[#out + 1] = {'wait', fmt(due - now), q, v[9]}
    else
      if v[11] then
        add(unready, q, v[11])
        redis.call('HDEL', k_job(id), 'rm')
      end
      add(undelay, q, id)
      out[#out + 1] = false
      taken[#taken + 1] = {id, q, v, #out}
    end
  elseif state == 'running' then
    local lexp = tonumber(v[7])
    if lexp > now then
      -- RabbitMQ redelivered it early (the holder's channel closed): wait out the lease.
      out[#out + 1] = {'wait', fmt(lexp - now), q, v[9]}
    else
      redis.call('ZREM', K_LEASES, id)
      redis.call('HINCRBY', K_RUNNING, q, -1)
      local deliveries, most = tonumber(v[4]), tonumber(v[8])
      if deliveries >= most then
        to_dlq(id, q, now, 'delivered ' .. deliveries .. ' times without being settled (max_deliveries='
          .. most .. '); the worker crashed or lost its lease each time', finished)
        out[#out + 1] = {'drop'}
      else
        out[#out + 1] = false
        taken[#taken + 1] = {id, q, v, #out}
      end
    end
  else
    out[#out + 1] = {'drop'}
  end
  seen[id] = true
end
for q, members in pairs(unready) do zrem_many(k_ready(q), members) end
for q, ids in pairs(undelay) do zrem_many(k_delayed(q), ids) end
if #taken > 0 then
  local token = next_token(now, #taken)
  local leases, ids, expiry = {}, {}, {}
  for j, t in ipairs(taken) do
    local id, q, v = t[1], t[2], t[3]
    local deliveries = tonumber(v[4]) + 1
    local expires = expiry[v[6]]
    if expires == nil then
      expires = fmt(now + tonumber(v[6]))
      expiry[v[6]] = expires
    end
    local this = token + j - 1
    redis.call('HSET', k_job(id), 'state', 'running', 'deliv', deliveries, 'token', string.format('%d', this),
      'lexp', expires, 'started', started, 'worker', worker)
    leases[#leases + 1] = expires
    leases[#leases + 1] = id
    ids[#ids + 1] = id
    bump(leased, q, 1)
    out[t[4]] = {'take', q, v[3], this, deliveries, v[5], v[6]}
  end
  zadd_many(K_LEASES, leases)
  zrem_many(K_UNPUBLISHED, ids)  -- their messages reached us: nothing to re-publish
end
for q, n in pairs(leased) do redis.call('HINCRBY', K_RUNNING, q, n) end
count_finished(finished, now)
return out
"""
)

# ARGV: namespace, ids... Deletes the records (and idempotency keys) of jobs RabbitMQ refused.
ROLLBACK = _script(
    """
for i = 2, #ARGV do
  local id = ARGV[i]
  redis.call('ZREM', K_UNPUBLISHED, id)
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

# ARGV: namespace, ids... Returns per id: state, queue, prio, seconds until due (what a
# re-publish needs: a message carries no body, see rabbitmq_link).
ROUTE = _script(
    """
local now = now_ts()
local out = {}
for i = 2, #ARGV do
  local f = redis.call('HMGET', k_job(ARGV[i]), 'state', 'queue', 'prio', 'run_at')
  local wait = math.max(0, tonumber(f[4] or '0') - now)
  out[#out + 1] = {f[1] or '', f[2] or '', f[3] or '0', fmt(wait)}
end
return out
"""
)

# ARGV: namespace, ids... Marks the ids "publish not confirmed yet" (kept: the earliest mark).
# Runs in one MULTI/EXEC with the Redis broker's ENQUEUE script, so no record exists unmarked.
MARK = _script(
    """
local now = fmt(now_ts())
for i = 2, #ARGV do redis.call('ZADD', K_UNPUBLISHED, 'NX', now, ARGV[i]) end
return 0
"""
)

# The Redis broker's ENQUEUE (same ARGV and reply), first marking every id of the batch "publish
# not confirmed" (as MARK): one script, so no record ever exists unmarked, in one EVALSHA.
MARK_ENQUEUE = _script(
    """
do
  local at = fmt(now_ts())
  for _, it in ipairs(cmsgpack.unpack(ARGV[2])) do redis.call('ZADD', K_UNPUBLISHED, 'NX', at, it[1]) end
end
"""
    + redis_scripts.ENQUEUE_BODY
)

# ARGV: namespace, seconds, limit. Takes up to `limit` ids marked unpublished more than `seconds`
# ago: one whose record is queued is re-marked now (this sweeper owns it for `seconds`) and
# returned as {id, queue, prio, seconds until due}; any other (no record: rolled back,
# an idempotency duplicate, purged; or delivered since) is unmarked.
SWEEP = _script(
    """
local now = now_ts()
local out = {}
local old = redis.call('ZRANGEBYSCORE', K_UNPUBLISHED, '-inf', fmt(now - tonumber(ARGV[2])), 'LIMIT', 0,
  tonumber(ARGV[3]))
for _, id in ipairs(old) do
  local f = redis.call('HMGET', k_job(id), 'state', 'queue', 'prio', 'run_at')
  if f[1] == 'queued' then
    redis.call('ZADD', K_UNPUBLISHED, fmt(now), id)
    out[#out + 1] = {id, f[2], f[3] or '0', fmt(math.max(0, tonumber(f[4] or '0') - now))}
  else
    redis.call('ZREM', K_UNPUBLISHED, id)
  end
end
return out
"""
)

# ARGV: namespace, limit, queues... Where a fetch should look, as the state store sees it.
# Returns {seconds until the next delayed job or lease expiry ("" = none), the picks: up to
# `limit` "<queue index from 0>:<class>" in the order their jobs are due (highest priority, then oldest,
# across the queues; only declared classes), then per queue the classes to look in besides
# ("" = none): every declared class when a delayed job of the queue is due or a lease expired
# (their messages come back from delay buckets and lease timers without a ready entry)}.
HINT = _script(
    """
local limit = tonumber(ARGV[2])
local now = now_ts()
local next_at = nil
local function soonest(head)
  if head[2] and (next_at == nil or tonumber(head[2]) < next_at) then next_at = tonumber(head[2]) end
end
local lease = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')
soonest(lease)
local expired = lease[2] ~= nil and tonumber(lease[2]) <= now
local heads, extra = {}, {}
for i = 3, #ARGV do
  local q = ARGV[i]
  local head = redis.call('ZRANGE', k_delayed(q), 0, 0, 'WITHSCORES')
  soonest(head)
  local r = redis.call('ZRANGE', k_ready(q), 0, limit - 1, 'WITHSCORES')
  for j = 1, #r, 2 do heads[#heads + 1] = {tonumber(r[j + 1]), r[j], i - 3, q} end
  if expired or (head[2] and tonumber(head[2]) <= now) then
    extra[#extra + 1] = table.concat(redis.call('SMEMBERS', k_classes(q)), ',')
  else
    extra[#extra + 1] = ''
  end
end
table.sort(heads, function(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  return a[2] < b[2]
end)
local picks = {}
for i = 1, math.min(limit, #heads) do
  local h = heads[i]
  local p = tostring(0 - h[1])
  -- not declared yet: its enqueue has not published (a fetch must not look in a missing queue)
  if redis.call('SISMEMBER', k_classes(h[4]), p) == 1 then picks[#picks + 1] = h[3] .. ':' .. p end
end
local out = {'', picks}
for _, e in ipairs(extra) do out[#out + 1] = e end
if next_at ~= nil then out[1] = fmt(math.max(0, next_at - now)) end
return out
"""
)

# ARGV: namespace, ids... Messages RabbitMQ dead-lettered past x-delivery-limit. A message is
# acked as soon as its job is claimed, so RabbitMQ's count only says how often the message was
# handed back unclaimed (consumers closing with it in their buffer), nothing about the job: a job
# still queued is marked "publish not confirmed" (the caller publishes it anew; if it dies first,
# the sweeper does) and returned as {id, queue, prio, seconds until due}. Any other is left
# as it is (finished; or running, and an expired lease is STRANDED's to recover).
POISON = _script(
    """
local now = now_ts()
local out = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  local f = redis.call('HMGET', k_job(id), 'state', 'queue', 'prio', 'run_at')
  if f[1] == 'queued' then
    redis.call('ZADD', K_UNPUBLISHED, fmt(now), id)
    out[#out + 1] = {id, f[2], f[3] or '0', fmt(math.max(0, tonumber(f[4] or '0') - now))}
  end
end
return out
"""
)

# ARGV: namespace, grace seconds, limit. Leases that expired more than `grace` seconds ago and
# whose job nobody claimed since. Their AMQP message is still unacked by the process that took
# it, and RabbitMQ hands it back only once it declares that connection dead (a missed heartbeat:
# a minute or more by default), so a worker cut off from RabbitMQ, or frozen, past its lease
# would keep the job from running elsewhere until then. Each such job is requeued as the Redis
# broker's fetch does (or dead-lettered past max_deliveries), marked "publish not confirmed" (if
# the caller dies before publishing, the sweeper does it) and returned as {id, queue, prio}
# for a fresh message. The old message, once it comes back, finds the job taken or finished.
STRANDED = _script(
    """
local now = now_ts()
local finished, woken, out = {}, {}, {}
recover(now, finished, woken, now - tonumber(ARGV[2]), tonumber(ARGV[3]), function(id, q, prio)
  redis.call('ZADD', K_UNPUBLISHED, fmt(now), id)
  out[#out + 1] = {id, q, prio}
end)
count_finished(finished, now)
return out
"""
)
