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
# (nb), budget holds (nb: a hash slot -> dollars), their expiries (nb: a sorted set).
# ARGV: now, slot id, tokens, slot expiry, slot ttl ms, window, nr, nt, np, nb, dollars to hold,
# then the limits in the same order as the keys (tpm once).
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
local la = 11
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

-- A refusal: {0, kind, index, a, b}, then each request limit's count in the window and its
-- oldest entry, then each token limit's previous and current minute (for the headers).
local function refuse(kind, i, a, b)
  local out = {0, kind, i, a or '0', b or '0'}
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

for i = 1, nr do
  local limit = tonumber(ARGV[la + i])
  local entry = redis.call('lindex', KEYS[i], limit - 1)
  if entry and tonumber(entry) > now - win then
    return refuse('rpm', i, entry)
  end
end
local tp = {}
for i = 1, nt do
  local limit = tonumber(ARGV[la + nr + i])
  local cur = tonumber(redis.call('get', KEYS[kt + i]) or '0')
  local prev = tonumber(redis.call('get', KEYS[ktp + i]) or '0')
  if prev * (win - elapsed) / win + cur + tokens > limit then
    return refuse('tpm', i, tostring(prev), tostring(cur))
  end
  tp[i] = {prev, cur}
end
for i = 1, np do
  local limit = tonumber(ARGV[la + nr + nt + i])
  redis.call('zremrangebyscore', KEYS[kp + i], '-inf', now)
  if redis.call('zcard', KEYS[kp + i]) >= limit then
    return refuse('par', i)
  end
end
for i = 1, nb do
  local limit = tonumber(ARGV[la + nr + nt + np + i])
  local spent = tonumber(redis.call('get', KEYS[kb + i]) or '0')
  if spent >= limit then
    return refuse('bud', i, tostring(spent))
  end
  local hk, xk = KEYS[kb + nb + i], KEYS[kb + 2 * nb + i]
  local gone = redis.call('zrangebyscore', xk, '-inf', now, 'limit', 0, 1000)
  for _, s in ipairs(gone) do
    unhold(hk, xk, s)
  end
  local held = tonumber(redis.call('hget', hk, '=total') or '0')
  if spent + held >= limit then
    return refuse('held', i)
  end
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


# KEYS: parallel keys (np), budget holds (nh hashes, then their nh sorted sets).
# ARGV: slot id, np, nh. Frees a concurrency slot and ends the budget holds (idempotent: safe
# to repeat).
RELEASE_LUA = (
    _UNHOLD_LUA
    + """
local np, nh = tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, np do
  redis.call('zrem', KEYS[i], ARGV[1])
end
for i = 1, nh do
  unhold(KEYS[np + i], KEYS[np + nh + i], ARGV[1])
end
return 1
"""
)
