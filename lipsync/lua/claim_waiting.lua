-- claim_waiting.lua: the poller claims jobs at fal whose status check is due, with what it needs
-- to check them, in one round trip.
--
-- KEYS[1]  waiting zset          <prefix>:waiting
-- ARGV[1]  now (unix seconds)
-- ARGV[2]  lease seconds (a claimed entry comes due again after this, if its poller died)
-- ARGV[3]  at most this many jobs
-- ARGV[4]  job hash prefix       <prefix>:job:
-- Returns {id, status, fal, deadline_at, checks before this one, submitted at, ...} six values
-- per claimed job; a job whose
-- record is gone is dropped from the set and not returned. When none is due: {'', score of the
-- next entry} ({'', ''} for an empty set), so the poller can sleep until then.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
if #due == 0 then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {'', first[2] or ''}
end
local until_ = tonumber(ARGV[1]) + tonumber(ARGV[2])
local out = {}
for _, id in ipairs(due) do
  local job = redis.call('HMGET', ARGV[4] .. id, 'status', 'fal', 'deadline_at', 'attempts:poll', 'ts:submitted')
  if job[1] then
    redis.call('ZADD', KEYS[1], until_, id)
    -- a check is counted when it is claimed: a check that changes nothing then writes one ZADD
    redis.call('HINCRBY', ARGV[4] .. id, 'attempts:poll', 1)
    out[#out + 1] = id
    out[#out + 1] = job[1]
    out[#out + 1] = job[2] or ''
    out[#out + 1] = job[3] or ''
    out[#out + 1] = job[4] or '0'
    out[#out + 1] = job[5] or ''
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
