-- Appends one event to a stream exactly once (event_log.rs).
-- KEYS[1]: the event's dedupe marker; KEYS[2]: the stream; KEYS[3], optional:
-- the user's consent record, which must say accepted for ARGV[2].
-- ARGV[1]: how long the marker lives, in seconds; ARGV[2]: the notice version
-- the consent must be for ('' without KEYS[3]); ARGV[3..]: field, value, ...
-- Returns {1, stream id} when the entry was written now, {0, stream id} when the
-- event id was seen before, {2, ''} when the consent does not hold (nothing
-- written). The consent check and the XADD are one atomic step, so a prompt
-- can never land after its user's withdrawal. The marker holds 'pending' only
-- inside this script: a script runs atomically, so no one else ever sees that value.
if KEYS[3] then
  local raw = redis.call('GET', KEYS[3])
  local ok, consent = false, nil
  if raw then
    ok, consent = pcall(cjson.decode, raw)
  end
  if not ok or type(consent) ~= 'table' or consent.status ~= 'accepted' or consent.notice_version ~= ARGV[2] then
    return {2, ''}
  end
end
if not redis.call('SET', KEYS[1], 'pending', 'NX', 'EX', ARGV[1]) then
  local existing = redis.call('GET', KEYS[1])
  if existing ~= 'pending' then
    return {0, existing}
  end
end
local id = redis.pcall('XADD', KEYS[2], '*', unpack(ARGV, 3))
if type(id) == 'table' and id.err then
  -- Nothing was written: forget the event id so that a retry can write it.
  redis.call('DEL', KEYS[1])
  return id
end
redis.call('SET', KEYS[1], id, 'EX', ARGV[1])
return {1, id}
