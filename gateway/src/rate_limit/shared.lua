-- Admits one request against a key's shared limits, atomically, in one round trip.
-- KEYS: requests TAT, tokens TAT, concurrency slot set.
-- ARGV: requests/min, tokens/min, max concurrent (0 = unlimited), token cost, slot id, slot lease (ms).
-- GCRA: a bucket's theoretical arrival time (TAT) advances by cost * 60 s / limit per
-- admission; a request fits while TAT - now stays within the 60 s burst. Times are
-- Redis' own clock in microseconds, so replicas with skewed clocks agree.
-- Returns {allowed, reason, retry_after_us, requests_tat - now, tokens_tat - now}
-- with reason 0 = admitted, 1 = requests, 2 = tokens, 3 = concurrency.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = 60000000
local req_limit, tok_limit, conc_limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])

-- Returns whether the cost fits, the TAT now, the TAT after charging, and the wait if it does not fit.
local function check(key, limit, cost)
  if limit <= 0 then return true, now, now, 0 end
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new_tat = tat + cost * window / limit
  if new_tat - now > window then return false, tat, tat, new_tat - now - window end
  return true, tat, new_tat, 0
end

local req_ok, req_now, req_tat, req_wait = check(KEYS[1], req_limit, 1)
local tok_ok, tok_now, tok_tat, tok_wait = check(KEYS[2], tok_limit, tokens)
-- A refused request charges nothing, so its headers show the buckets as they stand.
if not req_ok then return {0, 1, math.ceil(req_wait), math.floor(req_now - now), math.floor(tok_now - now)} end
if not tok_ok then return {0, 2, math.ceil(tok_wait), math.floor(req_now - now), math.floor(tok_now - now)} end

if conc_limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= conc_limit then
    return {0, 3, 1000000, math.floor(req_now - now), math.floor(tok_now - now)}
  end
  local lease_us = tonumber(ARGV[6]) * 1000
  redis.call('ZADD', KEYS[3], now + lease_us, ARGV[5])
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[6]))
end
if req_limit > 0 then redis.call('SET', KEYS[1], req_tat, 'PX', math.ceil((req_tat - now) / 1000) + 1000) end
if tok_limit > 0 then redis.call('SET', KEYS[2], tok_tat, 'PX', math.ceil((tok_tat - now) / 1000) + 1000) end
return {1, 0, 0, math.floor(req_tat - now), math.floor(tok_tat - now)}
