-- admit.lua: admission to fal, shared by every worker: a cap on jobs in flight and a submit rate
-- (token bucket, capacity one second of rate, at least 1). Two workers never take the last slot.
-- With a job hash, the submit claim is written in the same call: the slot and the claim are
-- taken together, before the POST. The slot is given back by move.lua, when the job's state
-- leaves fal.
--
-- KEYS[1]  inflight set          <prefix>:inflight
-- KEYS[2]  token bucket hash     <prefix>:submit-rate
-- KEYS[3]  job hash              <prefix>:job:<id>, or '' to admit without a claim
-- ARGV[1]  job id
-- ARGV[2]  cap on jobs in flight
-- ARGV[3]  submits per second
-- ARGV[4]  now (unix seconds)
-- ARGV[5]  claim field (with a job hash)
-- ARGV[6]  the status the job must be in (with a job hash)
-- Returns {1, '0'} admitted (and claimed); {0, seconds to wait}; {-1, ''} an earlier submit
-- already claimed the job (it may have reached fal); {-2, ''} the job is not in that status or
-- already has its fal request (nothing taken).
local inflight, bucket = KEYS[1], KEYS[2]
local job, cap, rate, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local submits = 0
if KEYS[3] ~= '' then
  local found = redis.call('HMGET', KEYS[3], 'status', ARGV[5], 'fal', 'attempts:submit')
  if found[2] then return {-1, ''} end
  if found[1] ~= ARGV[6] or found[3] then return {-2, ''} end
  submits = tonumber(found[4] or '0')
end
local function claim()
  if KEYS[3] ~= '' then
    redis.call('HSET', KEYS[3], ARGV[5], ARGV[4], 'attempts:submit', tostring(submits + 1))
  end
  return {1, '0'}
end
if redis.call('SISMEMBER', inflight, job) == 1 then return claim() end
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
return claim()
