-- admit.lua: admission to fal, shared by every worker: a cap on jobs in flight and a submit rate
-- (token bucket, capacity one second of rate, at least 1). Two workers never take the last slot.
-- With a job hash, the submit claim is written in the same call: the slot and the claim are
-- taken together, before the POST. The slot is given back by move.lua, when the job's state
-- leaves fal.
--
-- KEYS[1]  inflight set          <prefix>:inflight
-- KEYS[2]  token bucket hash     <prefix>:submit-rate
-- KEYS[3]  job hash              <prefix>:job:<id>, or '' to admit without a claim
-- KEYS[4]  jobs IN_PROGRESS      <prefix>:status:in_progress
-- KEYS[5]  jobs IN_QUEUE at fal  <prefix>:status:in_queue
-- KEYS[6]  observed concurrency  <prefix>:fal-concurrency
-- ARGV[1]  job id
-- ARGV[2]  cap on jobs in flight
-- ARGV[3]  submits per second
-- ARGV[4]  now (unix seconds)
-- ARGV[5]  claim field (with a job hash)
-- ARGV[6]  the status the job must be in (with a job hash)
-- ARGV[7]  buffer kept at fal above the observed concurrency (0: no adaptation, the cap only)
-- ARGV[8]  the concurrency assumed before any is observed
-- Adaptive cap: the account's concurrency is observed as the jobs IN_PROGRESS while others wait
-- IN_QUEUE (fal is full); while none waits it is at least the jobs IN_PROGRESS. At most that plus
-- the buffer are kept at fal; the rest wait with us, where a cancel is free and order can change.
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
local buffer = tonumber(ARGV[7])
if buffer > 0 then
  local running, queued = redis.call('SCARD', KEYS[4]), redis.call('SCARD', KEYS[5])
  local observed = tonumber(redis.call('GET', KEYS[6]) or ARGV[8])
  local seen = observed
  if queued > 0 then seen = math.max(1, running) elseif running > observed then seen = running end
  if seen ~= observed then redis.call('SET', KEYS[6], seen) end
  cap = math.min(cap, seen + buffer)
end
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
