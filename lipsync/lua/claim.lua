-- claim.lua: claim due entries of a schedule; each claimed entry is pushed one lease ahead, so
-- a claimer that dies leaves entries that come due again by themselves.
--
-- KEYS[1]  a schedule zset       <prefix>:schedule, <prefix>:waiting or <prefix>:callbacks
-- ARGV[1]  now (unix seconds)
-- ARGV[2]  lease seconds
-- ARGV[3]  at most this many entries
-- Returns the claimed ids, earliest due first; when none is due, {'', score of the next entry}
-- ({'', ''} for an empty schedule), so the claimer can sleep until then.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
if #due == 0 then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {'', first[2] or ''}
end
local until_ = tonumber(ARGV[1]) + tonumber(ARGV[2])
local args = {}
for _, id in ipairs(due) do
  args[#args + 1] = until_
  args[#args + 1] = id
end
redis.call('ZADD', KEYS[1], unpack(args))
return due
