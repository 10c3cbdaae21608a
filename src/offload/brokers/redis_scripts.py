"""The Redis broker's Lua scripts: one atomic script per state transition or batch.

Each script starts with the preamble from redis_keys (key names, the server clock, helpers), is
called with KEYS[1] = the namespace's `queues` key and ARGV[1] = the namespace, and is loaded once
and then run by EVALSHA (redis-py's register_script reloads it after a server restart).
"""

from __future__ import annotations

from offload.brokers.redis_keys import script

# ARGV: namespace, msgpack [[id, queue, task, priority, eta ("" = none), created_at, lease seconds,
# max_deliveries, result_ttl, idempotency key (false = none), window in ms, body length, ready-set
# score (-priority)], ...], the numbers stored as they are sent as strings (a number Lua hands
# to redis.call is formatted by printf: ~2,000 instructions each, a tenth of a bulk enqueue),
# the bodies, and optionally a staging key: for a batch too large for one command the bodies were
# written there first (field = the job's position), and this script takes them out atomically.
# Returns {"ok", then for each job whose idempotency key is held by another job: its position
# (1-based), that job's id} (every other job is stored, or was by an earlier attempt of this
# call, under its own id) or {"full", queue, depth, max_depth, drain_rate}.
#
# Per new job: one EXISTS, one HSET (the whole record, ready-set member included), and its share
# of one ZADD per queue and of one INCRBY for the batch's FIFO numbers.
# (The body alone is ENQUEUE_BODY: RabbitMQ's MARK_ENQUEUE runs it after marking the batch.)
ENQUEUE_BODY = """
local items = cmsgpack.unpack(ARGV[2])
local stage = ARGV[4]
local body = slicer(ARGV[3])
if stage then
  body = function(_, i) return redis.call('HGET', stage, i) end
end
local function done(reply)
  if stage then redis.call('DEL', stage) end
  return reply
end
local now = now_ts()
local verdict = {}  -- per job: 'ready' or 'later' (new), 'dup' (key held; the id is in held[i]), 'again'
local held = {}
local in_batch = {}
local adding, order = {}, {}
local fresh = 0
for i, it in ipairs(items) do
  local id, key = it[1], it[10]
  local state = 'new'
  if redis.call('EXISTS', k_job(id)) == 1 then
    state = 'again'  -- a retried call whose first attempt was stored: do not store it twice
  elseif key then
    local owner = in_batch[key] or redis.call('GET', k_idem(key))
    if owner then
      state, held[i] = 'dup', owner
    else
      in_batch[key] = id
    end
  end
  if state == 'new' then
    local q, eta = it[2], it[5]
    if adding[q] == nil then order[#order + 1] = q end
    bump(adding, q, 1)
    if eta ~= '' and tonumber(eta) > now then
      state = 'later'
    else
      state = 'ready'
      fresh = fresh + 1
    end
  end
  verdict[i] = state
end
local known = {}  -- queues already in K_QUEUES: no HSETNX for them below
for _, q in ipairs(order) do
  local bound = redis.call('HGET', K_QUEUES, q)
  known[q] = bound
  if bound and bound ~= '' then
    local depth = redis.call('ZCARD', k_ready(q)) + redis.call('ZCARD', k_delayed(q))
    if depth + adding[q] > tonumber(bound) then
      return done({'full', q, depth, bound, tostring(drain_rate(q, now))})
    end
  end
end
-- The batch's FIFO numbers in one step: the jobs made ready take seq + 1, seq + 2, ... in order.
local seq = 0
if fresh > 0 then seq = redis.call('INCRBY', K_SEQ, fresh) - fresh end
local at = fmt(now)
local out = {'ok'}
local woken, members = {}, {}
for i, it in ipairs(items) do
  local state = verdict[i]
  local job_body = body(it[12], i)
  if state == 'ready' or state == 'later' then
    local id, q, prio, key = it[1], it[2], it[4], it[10]  -- prio as a string, its score in it[13]
    local hash = k_job(id)
    if state == 'ready' then
      seq = seq + 1
      local member = string.format(SEQ_FORMAT, seq) .. id
      redis.call('HSET', hash, 'queue', q, 'task', it[3], 'state', 'queued', 'prio', prio,
        'created', it[6], 'lease', it[7], 'maxd', it[8], 'ttl', it[9], 'deliv', '0', 'att', '0',
        'run_at', at, 'rm', member, 'body', job_body)
      local m = members[q]
      if m == nil then m = {}; members[q] = m end
      m[#m + 1] = it[13]
      m[#m + 1] = member
      bump(woken, q, 1)
    else
      redis.call('HSET', hash, 'queue', q, 'task', it[3], 'state', 'queued', 'prio', prio,
        'created', it[6], 'lease', it[7], 'maxd', it[8], 'ttl', it[9], 'deliv', '0', 'att', '0',
        'run_at', it[5], 'body', job_body)
      redis.call('ZADD', k_delayed(q), it[5], id)
      bump(woken, q, 0)  -- waiting fetches re-arm their timers for it
    end
    if key then
      redis.call('HSET', hash, 'ikey', key)
      if it[11] > 0 then redis.call('SET', k_idem(key), id, 'PX', it[11]) end
    end
  elseif state == 'dup' then
    out[#out + 1] = i
    out[#out + 1] = held[i]
  end
end
for q, m in pairs(members) do zadd_many(k_ready(q), m) end
for q, n in pairs(woken) do
  if not known[q] then redis.call('HSETNX', K_QUEUES, q, '') end
  signal(q, math.max(n, 1))
end
return done(out)
"""
ENQUEUE = script(ENQUEUE_BODY)

# ENQUEUE for one job, its fields as plain arguments: what most sends are (a `task.send()`, an HTTP
# submit). Same decisions and replies as ENQUEUE, at under half its server time: no msgpack, no
# per-batch tables, and every number but the clock comes formatted by the client.
# ARGV: namespace, id, queue, task, priority, ready-set score (-priority), eta ("" = none),
# created_at, lease seconds, max_deliveries, result_ttl, body, then with an idempotency key:
# its window in ms and the key.
ENQUEUE_ONE = script(
    """
local id, q, key = ARGV[2], ARGV[3], ARGV[14]
local job = k_job(id)
if redis.call('EXISTS', job) == 1 then return {'ok'} end  -- a retried call stored already
if key then
  local owner = redis.call('GET', k_idem(key))
  if owner then return {'ok', 1, owner} end
end
local now = now_ts()
local bound = redis.call('HGET', K_QUEUES, q)
if bound and bound ~= '' then
  local depth = redis.call('ZCARD', k_ready(q)) + redis.call('ZCARD', k_delayed(q))
  if depth + 1 > tonumber(bound) then return {'full', q, depth, bound, tostring(drain_rate(q, now))} end
end
local eta = ARGV[7]
if eta ~= '' and tonumber(eta) > now then
  redis.call('HSET', job, 'queue', q, 'task', ARGV[4], 'state', 'queued', 'prio', ARGV[5],
    'created', ARGV[8], 'lease', ARGV[9], 'maxd', ARGV[10], 'ttl', ARGV[11], 'deliv', '0', 'att', '0',
    'run_at', eta, 'body', ARGV[12])
  redis.call('ZADD', k_delayed(q), eta, id)
else
  local member = string.format(SEQ_FORMAT, redis.call('INCR', K_SEQ)) .. id
  redis.call('HSET', job, 'queue', q, 'task', ARGV[4], 'state', 'queued', 'prio', ARGV[5],
    'created', ARGV[8], 'lease', ARGV[9], 'maxd', ARGV[10], 'ttl', ARGV[11], 'deliv', '0', 'att', '0',
    'run_at', fmt(now), 'rm', member, 'body', ARGV[12])
  redis.call('ZADD', k_ready(q), ARGV[6], member)
end
if key then
  redis.call('HSET', job, 'ikey', key)
  if ARGV[13] ~= '0' then redis.call('SET', k_idem(key), id, 'PX', ARGV[13]) end
end
if not bound then redis.call('HSETNX', K_QUEUES, q, '') end
signal(q, 1)
return {'ok'}
"""
)

# ARGV: namespace, limit, worker name, queue count, queues...
# Returns {n, seconds until the next delayed job or lease expiry ("" = none), then per job:
# id, queue, body, token, deliveries, attempts, lease seconds}.
FETCH = script(
    """
local limit, worker, nq = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local queues = {}
for i = 1, nq do queues[i] = ARGV[4 + i] end
local now = now_ts()
local finished, woken = {}, {}
for _, q in ipairs(queues) do
  local due = redis.call('ZRANGEBYSCORE', k_delayed(q), '-inf', fmt(now), 'LIMIT', 0, CHUNK)
  for _, id in ipairs(due) do
    redis.call('ZREM', k_delayed(q), id)
    local f = redis.call('HMGET', k_job(id), 'state', 'prio')
    if f[1] == 'queued' then make_ready(id, q, tonumber(f[2]), now) end
  end
end
recover(now, finished, woken)
count_finished(finished, now)

local picked = {}
if nq == 1 then
  local popped = redis.call('ZPOPMIN', k_ready(queues[1]), limit)
  for i = 1, #popped, 2 do picked[#picked + 1] = {queues[1], popped[i]} end
else
  local heads = {}
  for _, q in ipairs(queues) do
    local r = redis.call('ZRANGE', k_ready(q), 0, limit - 1, 'WITHSCORES')
    for i = 1, #r, 2 do heads[#heads + 1] = {tonumber(r[i + 1]), r[i], q} end
  end
  table.sort(heads, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    return a[2] < b[2]
  end)
  for i = 1, math.min(limit, #heads) do
    redis.call('ZREM', k_ready(heads[i][3]), heads[i][2])
    picked[#picked + 1] = {heads[i][3], heads[i][2]}
  end
end

local out = {0, ''}
local taken, leased, leases = 0, {}, {}
local first_token = #picked > 0 and next_token(now, #picked)  -- one range for the batch
local started = fmt(now)
for _, pick in ipairs(picked) do
  local q, id = pick[1], string.sub(pick[2], SEQ_WIDTH + 1)
  local key = k_job(id)
  local f = redis.call('HMGET', key, 'state', 'body', 'deliv', 'att', 'lease')
  if f[1] == 'queued' then
    local deliveries = tonumber(f[3]) + 1
    local token = first_token + taken
    local expires = fmt(now + tonumber(f[5]))
    redis.call('HSET', key, 'state', 'running', 'deliv', deliveries, 'token', string.format('%d', token),
      'lexp', expires, 'started', started, 'worker', worker)
    leases[#leases + 1] = expires
    leases[#leases + 1] = id
    bump(leased, q, 1)
    taken = taken + 1
    out[#out + 1] = id
    out[#out + 1] = q
    out[#out + 1] = f[2]
    out[#out + 1] = token
    out[#out + 1] = deliveries
    out[#out + 1] = f[4]
    out[#out + 1] = f[5]
  end
end
zadd_many(K_LEASES, leases)
for q, n in pairs(leased) do redis.call('HINCRBY', K_RUNNING, q, n) end
out[1] = taken

-- Tokens follow the work: one stays behind while a queue has ready jobs (so the next waiting
-- fetch wakes and takes them), none once it is empty (so no fetch wakes for nothing).
for _, q in ipairs(queues) do
  if redis.call('ZCARD', k_ready(q)) > 0 then signal(q, 1) else redis.call('DEL', k_signal(q)) end
end
for q, n in pairs(woken) do
  if redis.call('ZCARD', k_ready(q)) > 0 then signal(q, n) end
end

if taken == 0 then
  local next_at = nil
  for _, q in ipairs(queues) do
    local head = redis.call('ZRANGE', k_delayed(q), 0, 0, 'WITHSCORES')
    if head[2] and (next_at == nil or tonumber(head[2]) < next_at) then next_at = tonumber(head[2]) end
  end
  local lease = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')
  if lease[2] and (next_at == nil or tonumber(lease[2]) < next_at) then next_at = tonumber(lease[2]) end
  if next_at ~= nil then out[2] = fmt(math.max(0, next_at - now)) end
end
return out
"""
)

# ARGV: namespace, msgpack [[id, token, kind, has payload, payload length, delay], ...], the
# payloads (an ack's result, else the error). Returns 1/0 per outcome.
SETTLE = script(
    """
local items = cmsgpack.unpack(ARGV[2])
local payloads = slicer(ARGV[3])
local now = now_ts()
local out, finished, woken, released = {}, {}, {}, {}
local unleased, expiring = {}, {}  -- the batch's ZREM from the leases and ZADD to expiring
for _, it in ipairs(items) do
  local id, token, kind, has, payload = it[1], it[2], it[3], it[4], payloads(it[5])
  local key = k_job(id)
  local f = redis.call('HMGET', key, 'state', 'token', 'lexp', 'queue', 'deliv', 'maxd', 'ttl', 'prio')
  if f[1] ~= 'running' or f[2] ~= token or tonumber(f[3]) <= now then
    out[#out + 1] = 0
  else
    local q = f[4]
    unleased[#unleased + 1] = id
    bump(released, q, 1)
    if kind == 'ack' then
      if has then
        redis.call('HSET', key, 'state', 'succeeded', 'finished', fmt(now), 'result', payload)
        redis.call('HDEL', key, 'error')
      else
        redis.call('HSET', key, 'state', 'succeeded', 'finished', fmt(now))
        redis.call('HDEL', key, 'error', 'result')
      end
      keep_for_ttl(id, now, tonumber(f[7]), expiring)
      bump(finished, q, 1)
    elseif kind == 'release' then
      redis.call('HINCRBY', key, 'deliv', -1)
      make_ready(id, q, tonumber(f[8]), now)
      bump(woken, q, 1)
    else
      redis.call('HINCRBY', key, 'att', 1)
      local error = has and payload or nil
      local deliveries, most = tonumber(f[5]), tonumber(f[6])
      if kind == 'dead' then
        to_dlq(id, q, now, error or '', finished)
        if not error then redis.call('HDEL', key, 'error') end
      elseif deliveries >= most then
        to_dlq(id, q, now, 'max_deliveries (' .. most .. ') reached; last error: ' .. (error or 'None'),
          finished)
      else
        if error then redis.call('HSET', key, 'error', error) else redis.call('HDEL', key, 'error') end
        local delay = it[6]
        if delay > 0 then
          redis.call('HSET', key, 'state', 'queued', 'run_at', fmt(now + delay))
          redis.call('ZADD', k_delayed(q), fmt(now + delay), id)
          bump(woken, q, 0)
        else
          make_ready(id, q, tonumber(f[8]), now)
          bump(woken, q, 1)
        end
      end
    end
    out[#out + 1] = 1
  end
end
zrem_many(K_LEASES, unleased)
zadd_many(K_EXPIRING, expiring)
for q, n_ in pairs(released) do redis.call('HINCRBY', K_RUNNING, q, -n_) end
count_finished(finished, now)
for q, n_ in pairs(woken) do signal(q, math.max(n_, 1)) end
return out
"""
)

# ARGV: namespace, msgpack [[id, token, lease seconds], ...]. Returns 1/0 per delivery.
EXTEND = script(
    """
local now = now_ts()
local out = {}
for _, it in ipairs(cmsgpack.unpack(ARGV[2])) do
  local id = it[1]
  local f = redis.call('HMGET', k_job(id), 'state', 'token', 'lexp')
  if f[1] == 'running' and f[2] == it[2] and tonumber(f[3]) > now then
    local expires = fmt(now + it[3])
    redis.call('HSET', k_job(id), 'lexp', expires)
    redis.call('ZADD', K_LEASES, expires, id)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""
)

# ARGV: namespace, job id. Returns 1 if the job was queued and is now cancelled.
CANCEL = script(
    """
local id = ARGV[2]
local f = redis.call('HMGET', k_job(id), 'state', 'queue', 'rm', 'ttl')
if f[1] ~= 'queued' then return 0 end
if f[3] then redis.call('ZREM', k_ready(f[2]), f[3]) end
redis.call('ZREM', k_delayed(f[2]), id)
local now = now_ts()
finish(id, 'cancelled', now)
keep_for_ttl(id, now, tonumber(f[4]))
return 1
"""
)

# ARGV: namespace, queue count, queues... (none: every known queue). Returns per queue: name,
# ready, delayed, running, dead, max_depth ("" = unbounded), drain rate.
STATS = script(
    """
local now = now_ts()
local names = {}
local nq = tonumber(ARGV[2])
if nq == 0 then names = redis.call('HKEYS', K_QUEUES) else
  for i = 1, nq do names[i] = ARGV[2 + i] end
end
local out = {}
for _, q in ipairs(names) do
  local due = redis.call('ZCOUNT', k_delayed(q), '-inf', fmt(now))
  out[#out + 1] = q
  out[#out + 1] = redis.call('ZCARD', k_ready(q)) + due
  out[#out + 1] = redis.call('ZCARD', k_delayed(q)) - due
  out[#out + 1] = tonumber(redis.call('HGET', K_RUNNING, q) or '0')
  out[#out + 1] = redis.call('ZCARD', k_dead(q))
  out[#out + 1] = redis.call('HGET', K_QUEUES, q) or ''
  out[#out + 1] = tostring(drain_rate(q, now))
end
return out
"""
)

# Selecting dead jobs: ARGV: namespace, action, queue filter ("" = any), has ids ("1"/"0"), ids...
_DEAD_SELECTION = """
local action, only, has_ids = ARGV[2], ARGV[3], ARGV[4] == '1'
local chosen = {}
if has_ids then
  for i = 5, #ARGV do
    local f = redis.call('HMGET', k_job(ARGV[i]), 'state', 'queue')
    if f[1] == 'dead' and (only == '' or f[2] == only) then chosen[#chosen + 1] = {ARGV[i], f[2]} end
  end
else
  local names = {only}
  if only == '' then names = redis.call('HKEYS', K_QUEUES) end
  for _, q in ipairs(names) do
    for _, id in ipairs(redis.call('ZRANGE', k_dead(q), 0, -1)) do chosen[#chosen + 1] = {id, q} end
  end
end
"""

# Replays ('replay') or deletes ('purge') the selected dead jobs; returns how many.
DEAD_JOBS = script(
    _DEAD_SELECTION
    + """
local now = now_ts()
local woken = {}
for _, job in ipairs(chosen) do
  local id, q = job[1], job[2]
  redis.call('ZREM', k_dead(q), id)
  if action == 'purge' then
    redis.call('DEL', k_job(id))
  else
    redis.call('HSET', k_job(id), 'deliv', 0, 'att', 0)
    redis.call('HDEL', k_job(id), 'finished')
    redis.call('PERSIST', k_job(id))
    make_ready(id, q, tonumber(redis.call('HGET', k_job(id), 'prio')), now)
    bump(woken, q, 1)
  end
end
signal_all(woken)
return #chosen
"""
)

# ARGV: namespace, queue. Deletes up to CHUNK waiting jobs; returns how many.
PURGE = script(
    """
local q = ARGV[2]
local gone = 0
for _, member in ipairs(redis.call('ZRANGE', k_ready(q), 0, CHUNK - 1)) do
  redis.call('ZREM', k_ready(q), member)
  redis.call('DEL', k_job(string.sub(member, SEQ_WIDTH + 1)))
  gone = gone + 1
end
for _, id in ipairs(redis.call('ZRANGE', k_delayed(q), 0, CHUNK - 1 - gone)) do
  redis.call('ZREM', k_delayed(q), id)
  redis.call('DEL', k_job(id))
  gone = gone + 1
end
if redis.call('ZCARD', k_ready(q)) == 0 then redis.call('DEL', k_signal(q)) end
return gone
"""
)

# ARGV: namespace. Deletes up to CHUNK finished jobs past their result TTL; returns how many.
PRUNE = script(
    """
local now = now_ts()
local due = redis.call('ZRANGEBYSCORE', K_EXPIRING, '-inf', fmt(now), 'LIMIT', 0, CHUNK)
for _, id in ipairs(due) do
  redis.call('ZREM', K_EXPIRING, id)
  local state = redis.call('HGET', k_job(id), 'state')
  if state == 'succeeded' or state == 'cancelled' then redis.call('DEL', k_job(id)) end
end
return #due
"""
)

# ARGV: namespace, queue filter ("" = every queue), limit. Returns the newest dead job ids.
DEAD_IDS = script(
    """
local only, limit = ARGV[2], tonumber(ARGV[3])
local names = {only}
if only == '' then names = redis.call('HKEYS', K_QUEUES) end
local all = {}
for _, q in ipairs(names) do
  local r = redis.call('ZREVRANGE', k_dead(q), 0, limit - 1, 'WITHSCORES')
  for i = 1, #r, 2 do all[#all + 1] = {tonumber(r[i + 1]), r[i]} end
end
table.sort(all, function(a, b) return a[1] > b[1] end)
local out = {}
for i = 1, math.min(limit, #all) do out[i] = all[i][2] end
return out
"""
)
