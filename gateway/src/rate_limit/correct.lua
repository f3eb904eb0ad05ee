-- Corrects a key's token charge once a request's real usage is known.
-- KEYS: tokens TAT, concurrency slot set. ARGV: tokens/min, token delta (actual - charged, may be
-- negative), slot id. A refund never moves the TAT before now: unused past capacity is gone.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREM', KEYS[2], ARGV[3])
local limit, delta = tonumber(ARGV[1]), tonumber(ARGV[2])
if limit <= 0 or delta == 0 then return 0 end
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
tat = tat + delta * 60000000 / limit
if tat <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], tat, 'PX', math.ceil((tat - now) / 1000) + 1000)
end
return 1
