-- Appends one event to a stream exactly once (event_log.rs).
-- KEYS[1]: the event's dedupe marker; KEYS[2]: the stream.
-- ARGV[1]: how long the marker lives, in seconds; ARGV[2..]: field, value, field, value, ...
-- Returns {1, stream id} when the entry was written now, {0, stream id} when the
-- event id was seen before. The marker holds 'pending' only inside this script:
-- a script runs atomically, so no one else ever sees that value.
if not redis.call('SET', KEYS[1], 'pending', 'NX', 'EX', ARGV[1]) then
  local existing = redis.call('GET', KEYS[1])
  if existing ~= 'pending' then
    return {0, existing}
  end
end
local id = redis.pcall('XADD', KEYS[2], '*', unpack(ARGV, 2))
if type(id) == 'table' and id.err then
  -- Nothing was written: forget the event id so that a retry can write it.
  redis.call('DEL', KEYS[1])
  return id
end
redis.call('SET', KEYS[1], id, 'EX', ARGV[1])
return {1, id}
