-- rescore_waiting.lua: fal's typical time was learned (or became shorter): a waiting job whose
-- next check is later than the moment it could first plausibly be done is checked then instead.
--
-- KEYS[1]  waiting zset          <prefix>:waiting
-- ARGV[1]  now (unix seconds)
-- ARGV[2]  seconds fal could first plausibly take
-- ARGV[3]  job hash prefix       <prefix>:job:
-- ARGV[4]  at most this many jobs (the soonest due first)
-- Returns how many checks were brought forward.
local now, typical = tonumber(ARGV[1]), tonumber(ARGV[2])
local later = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[4]))
local moved = 0
for i = 1, #later, 2 do
  local submitted = tonumber(redis.call('HGET', ARGV[3] .. later[i], 'ts:submitted') or '')
  if submitted then
    local plausible = math.max(now, submitted + typical)
    if plausible < tonumber(later[i + 1]) then
      redis.call('ZADD', KEYS[1], 'XX', plausible, later[i])
      moved = moved + 1
    end
  end
end
return moved
