-- admit.lua: admission to fal, shared by every worker: a cap on jobs in flight and a submit rate
-- (token bucket, capacity one second of rate, at least 1). Two workers never take the last slot.
-- The slot is given back by move.lua, when the job's state leaves fal.
--
-- KEYS[1]  inflight set          <prefix>:inflight
-- KEYS[2]  token bucket hash     <prefix>:submit-rate
-- ARGV[1]  job id
-- ARGV[2]  cap on jobs in flight
-- ARGV[3]  submits per second
-- ARGV[4]  now (unix seconds)
-- Returns {1, '0'} admitted (or already holding a slot); {0, seconds to wait}.
local inflight, bucket = KEYS[1], KEYS[2]
local job, cap, rate, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('SISMEMBER', inflight, job) == 1 then return {1, '0'} end
if redis.call('SCARD', inflight) >= cap then return {0, '1.0'} end
local burst = math.max(1, rate)
local state = redis.call('HMGET', bucket, 'tokens', 'at')
local tokens = tonumber(state[1] or burst)
local last = tonumber(state[2] or now)
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
if tokens < 1 then
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'at', tostring(now))
  return {0, tostring((1 - tokens) / rate)}
end
redis.call('HSET', bucket, 'tokens', tostring(tokens - 1), 'at', tostring(now))
redis.call('SADD', inflight, job)
return {1, '0'}
