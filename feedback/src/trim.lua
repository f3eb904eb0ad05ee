-- Trims a stream below what every named consumer group has acknowledged (retention.rs).
-- KEYS[1]: the stream; ARGV: the group names. Returns how many entries went.
-- Per group the safe bound is its lowest pending id if it has pending entries, else
-- its last-delivered-id + 1; XTRIM MINID keeps ids >= the smallest bound. Ids are
-- compared and incremented as decimal strings, so no precision is lost to Lua's doubles.
if redis.call('TYPE', KEYS[1]).ok ~= 'stream' then
  return 0
end

local function dec_less(a, b)
  if #a ~= #b then
    return #a < #b
  end
  return a < b
end

local function id_less(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  if a_ms ~= b_ms then
    return dec_less(a_ms, b_ms)
  end
  return dec_less(a_seq, b_seq)
end

local function dec_incr(s)
  local digits = {}
  local carry = 1
  for i = #s, 1, -1 do
    local d = string.byte(s, i) - 48 + carry
    carry = (d == 10) and 1 or 0
    digits[i] = string.char(48 + d % 10)
  end
  local out = table.concat(digits)
  if carry == 1 then
    out = '1' .. out
  end
  return out
end

local U64_MAX = '18446744073709551615'

local function next_id(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  if seq ~= U64_MAX then
    return ms .. '-' .. dec_incr(seq)
  end
  if ms ~= U64_MAX then
    return dec_incr(ms) .. '-0'
  end
  return id -- the largest id there is: keep it
end

local last_delivered = {}
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, last
  for i = 1, #group, 2 do
    if group[i] == 'name' then
      name = group[i + 1]
    elseif group[i] == 'last-delivered-id' then
      last = group[i + 1]
    end
  end
  if name and last then
    last_delivered[name] = last
  end
end

local bound
for _, group in ipairs(ARGV) do
  local last = last_delivered[group]
  if not last then
    return 0 -- the group does not exist yet: its data waits
  end
  local summary = redis.call('XPENDING', KEYS[1], group)
  local candidate
  if tonumber(summary[1]) > 0 and summary[2] then
    candidate = summary[2]
  else
    candidate = next_id(last)
  end
  if not bound or id_less(candidate, bound) then
    bound = candidate
  end
end
if not bound then
  return 0
end
return redis.call('XTRIM', KEYS[1], 'MINID', bound)
