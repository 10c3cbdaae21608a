"""The Redis broker's key layout, and the Lua preamble every script shares (see redis_scripts).

Every key of one offload namespace starts with the URL's `prefix` (default `offload:`) followed by
a hash tag derived from it, e.g. `offload:{offload}:job:<id>`. The hash tag puts the whole
namespace, so every queue's keys and the job records, in one Redis Cluster slot: a script may
then touch any of them atomically (fetch across several queues, global idempotency keys, a
settle batch spanning queues). A prefix that already holds a `{...}` tag is used as it is.

Keys (after the namespace):

    seq               STRING  counter: FIFO order among jobs of equal priority
    token             STRING  counter: fencing tokens, one per lease (floored by the clock, in µs)
    queues            HASH    queue -> max_depth ("" = unbounded); every queue ever used
    running           HASH    queue -> jobs leased now
    leases            ZSET    job id, scored by lease expiry (all queues)
    expiring          ZSET    finished job id, scored by the end of its result TTL
    job:<id>          HASH    one job (fields below)
    ready:<queue>     ZSET    deliverable jobs: score -priority, member <16-digit seq><job id>
    delayed:<queue>   ZSET    job id, scored by run_at (delays, etas, scheduled retries)
    dead:<queue>      ZSET    the dead-letter queue: job id, scored by finished_at
    signal:<queue>    LIST    wake-up tokens a waiting fetch BLPOPs (trimmed, see SIGNAL_CAP)
    drain:<queue>     HASH    unix second -> jobs finished in it (last DRAIN_WINDOW seconds)
    idem:<key>        STRING  idempotency key -> job id, expiring after the key's window
    stage:<uuid>      HASH    bodies of an enqueue batch too large for one command (transient)

Job hash fields: queue, task, state, prio, run_at, created, lease (seconds), maxd
(max_deliveries), ttl (result_ttl), deliv, att (attempts), token, lexp (lease expiry; meaningful
while running), started, finished, worker, ikey, body, result, error, rm (its member in
ready:<queue>; meaningful while queued and ready).

Time is the Redis server's clock (TIME inside each script), so workers on hosts with skewed
clocks still agree on when a lease expires. Scripts are called with KEYS[1] = the namespace's
`queues` key (it routes the call to the namespace's slot) and ARGV[1] = the namespace.
"""

from __future__ import annotations

import re

# Key names, after the namespace (see the module docstring).
SEQ = "seq"
TOKEN = "token"
QUEUES = "queues"
RUNNING = "running"
LEASES = "leases"
EXPIRING = "expiring"
JOB = "job:"
READY = "ready:"
DELAYED = "delayed:"
DEAD = "dead:"
SIGNAL = "signal:"
DRAIN = "drain:"
IDEM = "idem:"
STAGE = "stage:"

DRAIN_WINDOW = 60  # seconds of finished-job counts behind the drain rate
SIGNAL_CAP = 16  # wake-up tokens kept per queue; a fetch that leaves work behind passes one on
SEQ_WIDTH = 16  # digits of the FIFO counter at the front of a ready-set member
CHUNK = 1000  # jobs one script call promotes, recovers, purges or prunes at most
# Finished jobs are deleted by `prune` once their result TTL has passed; Redis itself expires
# the record this much later, in case nothing prunes.
EXPIRY_GRACE = 300


def keyspace(prefix: str) -> str:
    """The string every key starts with: the prefix plus a hash tag made from it."""
    opening = prefix.find("{")
    if opening != -1 and prefix.find("}", opening + 2) != -1:
        return prefix  # the user chose the hash tag
    return f"{prefix}{{{prefix.rstrip(':')}}}:"


_PREAMBLE = f"""
local P = ARGV[1]
local K_SEQ, K_TOKEN, K_QUEUES = P .. '{SEQ}', P .. '{TOKEN}', P .. '{QUEUES}'
local K_RUNNING, K_LEASES, K_EXPIRING = P .. '{RUNNING}', P .. '{LEASES}', P .. '{EXPIRING}'
local function k_job(id) return P .. '{JOB}' .. id end
local function k_ready(q) return P .. '{READY}' .. q end
local function k_delayed(q) return P .. '{DELAYED}' .. q end
local function k_dead(q) return P .. '{DEAD}' .. q end
local function k_signal(q) return P .. '{SIGNAL}' .. q end
local function k_drain(q) return P .. '{DRAIN}' .. q end
local function k_idem(key) return P .. '{IDEM}' .. key end
local DRAIN_WINDOW, SIGNAL_CAP, SEQ_WIDTH, CHUNK = {DRAIN_WINDOW}, {SIGNAL_CAP}, {SEQ_WIDTH}, {CHUNK}
local EXPIRY_GRACE = {EXPIRY_GRACE}
-- A FIFO number as the front of a ready-set member (%d: integer formatting, cheaper than %.0f).
local SEQ_FORMAT = '%0' .. SEQ_WIDTH .. 'd'

local function now_ts()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Numbers passed to redis.call are formatted with 14 significant digits: keep microseconds.
local function fmt(x) return string.format('%.6f', x) end

-- A lease's fencing token: the next count, but never below the server clock in microseconds.
-- After a failover the new primary may lack the last INCRs (asynchronous replication), so a
-- bare counter could hand a job's old token out again and let the cut-off holder's late ack
-- pass; the clock floor puts every later token above any the lost writes issued (unless the
-- counter ran ahead of the clock, which takes over a million leases a second).
-- With `n`, the first of n consecutive tokens (token, token + 1, ..., token + n - 1).
local function next_token(now, n)
  n = n or 1
  local token = redis.call('INCRBY', K_TOKEN, n) - n + 1
  local floor = math.floor(now * 1000000)
  if token <= floor then
    token = floor + 1
    redis.call('SET', K_TOKEN, string.format('%d', token + n - 1))
  end
  return token
end

-- Batches come as ARGV[2], a msgpack array of per-item arrays, and ARGV[3], the items' byte
-- strings (bodies, results, errors) back to back: two arguments however large the batch, which
-- keeps the client's command packing cheap. Each item names its string's length.
local function slicer(blob)
  local at = 1
  return function(length)
    local piece = string.sub(blob, at, at + length - 1)
    at = at + length
    return piece
  end
end

local function bump(counts, key, n)
  counts[key] = (counts[key] or 0) + n
end

-- ZADD of a flat list (score, member, score, member, ...), in commands of at most 1000 members (Lua's unpack
-- has a limit on how many values it returns).
local function zadd_many(key, flat)
  for first = 1, #flat, 2000 do
    redis.call('ZADD', key, unpack(flat, first, math.min(first + 1999, #flat)))
  end
end

-- ZREM of a list of members, in commands of at most 1000.
local function zrem_many(key, members)
  for first = 1, #members, 1000 do
    redis.call('ZREM', key, unpack(members, first, math.min(first + 999, #members)))
  end
end

-- Put a queued job at the back of its priority class.
local function make_ready(id, q, prio, now)
  local seq = redis.call('INCR', K_SEQ)
  local member = string.format(SEQ_FORMAT, seq) .. id
  redis.call('ZADD', k_ready(q), 0 - prio, member)
  redis.call('HSET', k_job(id), 'state', 'queued', 'run_at', fmt(now), 'rm', member)
end

-- Leave up to n wake-up tokens for fetches waiting on q.
local function signal(q, n)
  local key = k_signal(q)
  local want = math.min(n, SIGNAL_CAP) - redis.call('LLEN', key)
  if want > 0 then
    local ones = {{}}
    for i = 1, want do ones[i] = '1' end
    redis.call('LPUSH', key, unpack(ones))
  end
end

local function signal_all(counts)
  for q, n in pairs(counts) do signal(q, n) end
end

local function count_finished(counts, now)
  local second = math.floor(now)
  for q, n in pairs(counts) do
    local key = k_drain(q)
    if redis.call('HINCRBY', key, second, n) == n then
      -- the first finish in this second: forget the seconds that left the window
      for _, field in ipairs(redis.call('HKEYS', key)) do
        if tonumber(field) <= second - DRAIN_WINDOW then redis.call('HDEL', key, field) end
      end
    end
  end
end

local function drain_rate(q, now)
  local pairs_ = redis.call('HGETALL', k_drain(q))
  local total, first = 0, nil
  local floor = math.floor(now) - DRAIN_WINDOW
  for i = 1, #pairs_, 2 do
    local second = tonumber(pairs_[i])
    if second > floor then
      total = total + tonumber(pairs_[i + 1])
      if first == nil or second < first then first = second end
    end
  end
  if total == 0 then return 0 end
  return total / math.min(DRAIN_WINDOW, math.max(1, now - first))
end

local function finish(id, state, now)
  redis.call('HSET', k_job(id), 'state', state, 'finished', fmt(now))
end

-- Succeeded and cancelled jobs are kept for their result TTL. With `expiring` (a flat list of
-- score, id), the ZADD is left to the caller, who adds a batch's jobs in one command.
local function keep_for_ttl(id, now, ttl, expiring)
  local expires = now + ttl
  if expiring then
    expiring[#expiring + 1] = fmt(expires)
    expiring[#expiring + 1] = id
  else
    redis.call('ZADD', K_EXPIRING, fmt(expires), id)
  end
  redis.call('PEXPIREAT', k_job(id), math.floor((expires + EXPIRY_GRACE) * 1000))
end

local function to_dlq(id, q, now, error, finished)
  finish(id, 'dead', now)
  redis.call('HSET', k_job(id), 'error', error)
  redis.call('ZADD', k_dead(q), fmt(now), id)
  bump(finished, q, 1)
end

-- Expired leases: dead-letter the jobs past max_deliveries, make the others deliverable again.
-- Optional: only leases that expired before `cutoff` (default now), at most `limit` (CHUNK), and
-- `requeued(id, queue, prio)` told of each job made ready (RabbitMQ publishes it anew).
local function recover(now, finished, woken, cutoff, limit, requeued)
  local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', fmt(cutoff or now), 'LIMIT', 0,
    limit or CHUNK)
  local released = {{}}
  for _, id in ipairs(expired) do
    redis.call('ZREM', K_LEASES, id)
    local f = redis.call('HMGET', k_job(id), 'state', 'lexp', 'queue', 'deliv', 'maxd', 'prio')
    if f[1] == 'running' then
      local q = f[3]
      if tonumber(f[2]) > now then
        redis.call('ZADD', K_LEASES, f[2], id)  -- extended meanwhile
      else
        bump(released, q, 1)
        local deliveries, most = tonumber(f[4]), tonumber(f[5])
        if deliveries >= most then
          to_dlq(id, q, now, 'delivered ' .. deliveries .. ' times without being settled (max_deliveries='
            .. most .. '); the worker crashed or lost its lease each time', finished)
        else
          make_ready(id, q, tonumber(f[6]), now)
          bump(woken, q, 1)
          if requeued then requeued(id, q, f[6]) end
        end
      end
    end
  end
  for q, n in pairs(released) do redis.call('HINCRBY', K_RUNNING, q, -n) end
end
"""


def _definitions(preamble: str) -> list[tuple[frozenset[str], str]]:
    """The preamble's top-level definitions in order: the names each defines, and its text (the
    comment lines above it included)."""
    units: list[tuple[frozenset[str], str]] = []
    pending = ""  # comments and blank lines, which go with the next definition
    for line in preamble.splitlines(keepends=True):
        defined = re.match(r"local (?:function )?(\w+(?:, *\w+)*)", line)
        if defined:
            units.append((frozenset(re.split(r", *", defined[1])), pending + line))
            pending = ""
        elif units and line.strip() and not line.startswith("--"):
            names, text = units[-1]  # a function's body, or its `end`
            units[-1] = (names, text + line)
        else:
            pending += line
    return units


_DEFINITIONS = _definitions(_PREAMBLE)


def script(body: str) -> str:
    """A script: the preamble's definitions that `body` uses (directly or through another
    definition), in the preamble's order, followed by `body`.

    Redis runs a script's whole text on every call, so each definition a script carries costs
    every call: the full preamble was ~28,000 instructions of a one-job enqueue's ~190,000.
    """
    needed: list[str] = []
    used = body
    for names, text in reversed(_DEFINITIONS):  # a definition only uses those before it
        if any(re.search(rf"\b{name}\b", used) for name in names):
            needed.append(text)
            used += text
    return "".join(reversed(needed)) + body
