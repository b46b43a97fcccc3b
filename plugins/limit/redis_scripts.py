"""The Lua scripts of the Redis limit store (``plugins.limit.store_redis``): one admission and
one settlement per request, each atomic in Redis, and the idempotent release that a settlement
which may already have been applied is retried as."""

# Ends one budget hold: a hash of holds (slot -> dollars, plus their sum under "=total", so an
# admission reads one field, not every hold) and the sorted set of their expiries.
_UNHOLD_LUA = """
local function unhold(hk, xk, s)
  local v = redis.call('hget', hk, s)
  if v then
    redis.call('hdel', hk, s)
    if redis.call('hlen', hk) <= 1 then
      redis.call('hdel', hk, '=total')  -- nothing held: no rounding left behind either
    else
      redis.call('hincrbyfloat', hk, '=total', -tonumber(v))
    end
  end
  redis.call('zrem', xk, s)
end
"""

# KEYS: rpm (nr), tpm this minute (nt), tpm previous minute (nt), parallel (np), budget spend
# (nb), budget holds (nb: a hash slot -> dollars), their expiries (nb: a sorted set), then the
# slot's "abandoned" marker (set by RELEASE_LUA when the gateway gave up on this admission).
# ARGV: now, slot id, tokens, slot expiry, slot ttl ms, window, nr, nt, np, nb, dollars to hold,
# peek (1: only read the request and token limits' state), then the limits in the same order as
# the keys (tpm once).
# Reply: {1, state...} admitted; {0, nfail, nfail x (kind, index, a, b), state...} refused, with
# every failing check (the caller picks the longest wait); {-1} abandoned.
ADMIT_LUA = (
    _UNHOLD_LUA
    + """
local now = tonumber(ARGV[1])
local slot = ARGV[2]
local tokens = tonumber(ARGV[3])
local slot_expiry = tonumber(ARGV[4])
local slot_ttl_ms = tonumber(ARGV[5])
local win = tonumber(ARGV[6])
local nr, nt, np, nb = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local hold = tonumber(ARGV[11])
local la = 12
local kt, ktp, kp, kb = nr, nr + nt, nr + 2 * nt, nr + 2 * nt + np
local elapsed = now - math.floor(now / win) * win

-- The index of the oldest entry of a request window still in the window (-1: none), by a
-- binary search as limits' moving_window.lua does.
local function oldest(key, limit)
  local lo, hi, idx = 0, math.min(limit, redis.call('llen', key)) - 1, -1
  while lo <= hi do
    local mid = math.floor((lo + hi) / 2)
    local v = tonumber(redis.call('lindex', key, mid))
    if v and v > now - win then idx = mid; lo = mid + 1 else hi = mid - 1 end
  end
  return idx
end

-- A refusal: {0, n, then n x (kind, index, a, b)}, then each request limit's count in the
-- window and its oldest entry, then each token limit's previous and current minute (for the
-- headers).
local function refuse(fails)
  local out = {0, #fails / 4}
  for _, v in ipairs(fails) do
    out[#out + 1] = v
  end
  for j = 1, nr do
    local key = KEYS[j]
    local idx = oldest(key, tonumber(ARGV[la + j]))
    out[#out + 1] = idx + 1
    out[#out + 1] = idx >= 0 and redis.call('lindex', key, idx) or '0'
  end
  for j = 1, nt do
    out[#out + 1] = redis.call('get', KEYS[ktp + j]) or '0'
    out[#out + 1] = redis.call('get', KEYS[kt + j]) or '0'
  end
  return out
end

if redis.call('exists', KEYS[kb + 3 * nb + 1]) == 1 then
  return {-1}  -- the gateway gave up on this admission (it timed out) and released it
end
if ARGV[12] == '1' then
  return refuse({})
end
-- Every check is evaluated, so a refusal can name the one with the longest wait.
local fails = {}
local function fail(kind, i, a, b)
  fails[#fails + 1] = kind
  fails[#fails + 1] = i
  fails[#fails + 1] = a or '0'
  fails[#fails + 1] = b or '0'
end
for i = 1, nr do
  local limit = tonumber(ARGV[la + i])
  local entry = redis.call('lindex', KEYS[i], limit - 1)
  if entry and tonumber(entry) > now - win then
    fail('rpm', i, entry)
  end
end
local tp = {}
for i = 1, nt do
  local limit = tonumber(ARGV[la + nr + i])
  local cur = tonumber(redis.call('get', KEYS[kt + i]) or '0')
  local prev = tonumber(redis.call('get', KEYS[ktp + i]) or '0')
  if prev * (win - elapsed) / win + cur + tokens > limit then
    fail('tpm', i, tostring(prev), tostring(cur))
  end
  tp[i] = {prev, cur}
end
for i = 1, np do
  local limit = tonumber(ARGV[la + nr + nt + i])
  redis.call('zremrangebyscore', KEYS[kp + i], '-inf', now)
  if redis.call('zcard', KEYS[kp + i]) >= limit then
    fail('par', i)
  end
end
for i = 1, nb do
  local limit = tonumber(ARGV[la + nr + nt + np + i])
  local spent = tonumber(redis.call('get', KEYS[kb + i]) or '0')
  local hk, xk = KEYS[kb + nb + i], KEYS[kb + 2 * nb + i]
  local gone = redis.call('zrangebyscore', xk, '-inf', now, 'limit', 0, 1000)
  for _, s in ipairs(gone) do
    unhold(hk, xk, s)
  end
  if spent >= limit then
    fail('bud', i, tostring(spent))
  else
    local held = tonumber(redis.call('hget', hk, '=total') or '0')
    if spent + held >= limit then
      fail('held', i)
    end
  end
end
if #fails > 0 then
  return refuse(fails)
end

local out = {1}
local done = {}
for i = 1, nr do
  local key, limit = KEYS[i], tonumber(ARGV[la + i])
  redis.call('lpush', key, ARGV[1])
  redis.call('ltrim', key, 0, limit - 1)
  redis.call('expire', key, math.ceil(win))
  local idx = oldest(key, limit)  -- (>= 0: the entry just pushed is in the window)
  out[#out + 1] = idx + 1
  out[#out + 1] = redis.call('lindex', key, idx)
end
for i = 1, nt do
  local key = KEYS[kt + i]
  if not done[key] then
    done[key] = true
    redis.call('incrby', key, tokens)
    redis.call('pexpire', key, math.ceil(2 * win * 1000))
  end
  out[#out + 1] = tostring(tp[i][1])
  out[#out + 1] = tostring(tp[i][2] + tokens)
end
for i = 1, np do
  local key = KEYS[kp + i]
  redis.call('zadd', key, slot_expiry, slot)
  redis.call('pexpire', key, slot_ttl_ms)
end
if hold > 0 then
  for i = 1, nb do
    local hk, xk = KEYS[kb + nb + i], KEYS[kb + 2 * nb + i]
    if not done[hk] then
      done[hk] = true
      redis.call('hset', hk, slot, ARGV[11])
      redis.call('hincrbyfloat', hk, '=total', ARGV[11])
      redis.call('zadd', xk, slot_expiry, slot)
      redis.call('pexpire', hk, slot_ttl_ms)
      redis.call('pexpire', xk, slot_ttl_ms)
    end
  end
end
return out
"""
)

# KEYS: tpm keys of the admission minute (nt), parallel (np), budget period keys (nb), then
# the budget holds of the admission (nh hashes, then their nh sorted sets).
# ARGV: slot id, token delta, cost, nt, np, nb, nh, then one ttl (s) per budget key.
SETTLE_LUA = (
    _UNHOLD_LUA
    + """
local slot = ARGV[1]
local delta = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local nt, np, nb, nh = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
for i = 1, nh do
  unhold(KEYS[nt + np + nb + i], KEYS[nt + np + nb + nh + i], slot)
end
if delta ~= 0 then
  for i = 1, nt do
    if redis.call('exists', KEYS[i]) == 1 then
      if redis.call('incrby', KEYS[i], delta) < 0 then
        redis.call('set', KEYS[i], 0, 'KEEPTTL')
      end
    end
  end
end
for i = 1, np do
  redis.call('zrem', KEYS[nt + i], slot)
end
if cost > 0 then
  for i = 1, nb do
    local key = KEYS[nt + np + i]
    redis.call('incrbyfloat', key, ARGV[3])
    redis.call('expire', key, tonumber(ARGV[7 + i]))
  end
end
return 1
"""
)


# KEYS: parallel keys (np), budget holds (nh hashes, then their nh sorted sets), and with a 4th
# argument the slot's "abandoned" marker.
# ARGV: slot id, np, nh, [marker ttl ms]. Frees a concurrency slot and ends the budget holds
# (idempotent: safe to repeat). With the marker (an admission that timed out), an admission of
# this slot that Redis has not run yet never will: it finds the marker and does nothing.
RELEASE_LUA = (
    _UNHOLD_LUA
    + """
local np, nh = tonumber(ARGV[2]), tonumber(ARGV[3])
if ARGV[4] then
  redis.call('set', KEYS[np + 2 * nh + 1], '1', 'PX', ARGV[4])
end
for i = 1, np do
  redis.call('zrem', KEYS[i], ARGV[1])
end
for i = 1, nh do
  unhold(KEYS[np + i], KEYS[np + nh + i], ARGV[1])
end
return 1
"""
)
