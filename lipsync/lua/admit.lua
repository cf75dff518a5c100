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
-- KEYS[7]  schedule zset         <prefix>:schedule (a reserved job's next look is brought forward)
-- ARGV[1]  job id
-- ARGV[2]  cap on jobs in flight
-- ARGV[3]  submits per second
-- ARGV[4]  now (unix seconds)
-- ARGV[5]  claim field (with a job hash)
-- ARGV[6]  the status the job must be in (with a job hash)
-- ARGV[7]  buffer kept at fal above the observed concurrency (0: no adaptation, the cap only)
-- ARGV[8]  the concurrency assumed before any is observed
-- ARGV[9]  pending prefix        <prefix>:pending:  (with a job hash: the fair queue, below)
-- ARGV[10] job hash prefix       <prefix>:job:
-- ARGV[11] the job's priority    high | normal | low
-- ARGV[12] the job's tenant      ('' = the default tenant)
-- ARGV[13] tenant weights, 'name weight name weight ...' (a tenant not named weighs 1)
-- ARGV[14] seconds a job refused for a full cap waits: the safety-net recheck (a freed slot is
--          handed to the next job by the dispatch mode, below, long before)
-- ARGV[15] tenant credit, in slots: how far behind the least active tenant's virtual time an
--          idle tenant may come back
-- ARGV[16] 'dispatch': no caller job (ARGV[1] and KEYS[3] ''); if a slot is free, reserve it for
--          the head of the fair queue and return {2, its id} (the caller wakes it); {-3, ''}
--          nothing waits; {0, seconds} no slot or no submit token now
-- ARGV[17] seconds: a job given a reserved slot ({2, id}) is due in the schedule at most this far
--          ahead, so that a wake lost on its way (a worker dying before it sends it) costs seconds
-- ARGV[18] a field written with the claim ('' none): what identifies the POST in fal's listing
-- ARGV[19] its value
-- Fair queue (with a job hash): every job asking for a slot waits in <pending>:<priority>:<tenant>
-- (a zset by arrival); <pending>:<priority> holds the tenants with jobs waiting, scored by their
-- virtual time (slots taken / weight; <pending>vt keeps it while a tenant has none waiting). A free
-- slot goes to the first job of the tenant with the least virtual time in the highest priority
-- with jobs waiting: strict across priorities, weighted-fair across tenants, first come first
-- served within a tenant. If that job is not the caller, the slot is reserved for it (it joins the
-- inflight set) and its id is returned for the caller to wake.
-- Fast path: with nobody waiting in any priority and a slot and a token free, the caller takes its
-- slot without passing through the queue (its tenant's virtual time advances all the same).
-- Adaptive cap: the account's concurrency is the hint (the plan's), raised to the most jobs seen
-- IN_PROGRESS at once while none waited IN_QUEUE at fal. At most that plus
-- the buffer are kept at fal; the rest wait with us, where a cancel is free and order can change.
-- Returns {1, '0'} admitted (and claimed); {0, seconds to wait} (ARGV[14] when the cap is full,
-- the time to the next token when only the rate refuses); {2, job id} the slot went to
-- that job (wake it), the caller waits; {-1, ''} an earlier submit
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
    local fields = {ARGV[5], ARGV[4], 'attempts:submit', tostring(submits + 1)}
    if ARGV[18] ~= '' then fields[#fields + 1], fields[#fields + 2] = ARGV[18], ARGV[19] end
    redis.call('HSET', KEYS[3], unpack(fields))
  end
  return {1, '0'}
end
if redis.call('SISMEMBER', inflight, job) == 1 then return claim() end
local buffer = tonumber(ARGV[7])
if buffer > 0 then
  local running, queued = redis.call('SCARD', KEYS[4]), redis.call('SCARD', KEYS[5])
  local observed = tonumber(redis.call('GET', KEYS[6]) or ARGV[8])
  local seen = observed
  -- Learned upwards only, while fal is not full (no job seen waiting there): status checks come
  -- when a job could be done, so jobs IN_PROGRESS are undercounted and cannot lower it safely.
  if queued == 0 and running > observed then seen = running end
  if seen ~= observed then redis.call('SET', KEYS[6], seen) end
  cap = math.min(cap, seen + buffer)
end
local pending, jobs = ARGV[9], ARGV[10]
local vt_key = pending .. 'vt'
local dispatch = ARGV[16] == 'dispatch'
local function nobody_waiting()
  return redis.call('EXISTS', pending .. 'high', pending .. 'normal', pending .. 'low') == 0
end
local burst = math.max(1, rate)
local function tokens_now()
  local state = redis.call('HMGET', bucket, 'tokens', 'at')
  local tokens = tonumber(state[1] or burst)
  return math.min(burst, tokens + math.max(0, now - tonumber(state[2] or now)) * rate)
end
local function weight_of(tenant)
  local name = nil
  for word in string.gmatch(ARGV[13], '%S+') do
    if name then
      if name == tenant then return tonumber(word) end
      name = nil
    else
      name = word
    end
  end
  return 1
end
if KEYS[3] ~= '' and not dispatch then
  -- Fast path: nobody waits in any priority (so not this job either), a slot and a token are
  -- free: the job takes its slot at once, and its tenant's virtual time advances as if it had
  -- passed through the fair queue (what the queue would have written when its line emptied).
  if nobody_waiting() and redis.call('SCARD', inflight) < cap then
    local tokens = tokens_now()
    if tokens >= 1 then
      redis.call('HSET', bucket, 'tokens', tostring(tokens - 1), 'at', tostring(now))
      redis.call('SADD', inflight, job)
      redis.call('HINCRBYFLOAT', vt_key, ARGV[11] .. ':' .. ARGV[12], 1 / weight_of(ARGV[12]))
      return claim()
    end
  end
end
if KEYS[3] ~= '' then  -- join the fair queue (once)
  local line = pending .. ARGV[11] .. ':' .. ARGV[12]
  if not redis.call('ZSCORE', line, job) then
    redis.call('ZADD', line, now, job)
    local active = pending .. ARGV[11]
    if not redis.call('ZSCORE', active, ARGV[12]) then
      -- A tenant coming back keeps its debt and banks a bounded credit: it may be behind the least
      -- active tenant's time by at least ARGV[15] slots (its next jobs go first until caught up).
      local least = redis.call('ZRANGE', active, 0, 0, 'WITHSCORES')
      local kept = tonumber(redis.call('HGET', vt_key, ARGV[11] .. ':' .. ARGV[12]) or '0')
      if least[2] then kept = math.max(kept, tonumber(least[2]) - tonumber(ARGV[15])) end
      redis.call('ZADD', active, kept, ARGV[12])
    end
  end
end
if redis.call('SCARD', inflight) >= cap then return {0, ARGV[14]} end
if dispatch then  -- anyone waiting at all? (cheap, before the bucket)
  if nobody_waiting() then return {-3, ''} end
end
local tokens = tokens_now()
if tokens < 1 then
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'at', tostring(now))
  return {0, tostring((1 - tokens) / rate)}
end
local function take(chosen)
  redis.call('HSET', bucket, 'tokens', tostring(tokens - 1), 'at', tostring(now))
  redis.call('SADD', inflight, chosen)
end
if KEYS[3] == '' and not dispatch then take(job) return {1, '0'} end
for _, priority in ipairs({'high', 'normal', 'low'}) do
  local active = pending .. priority
  for _ = 1, 100 do  -- bounded: stale entries (jobs cancelled meanwhile) are dropped on the way
    local least = redis.call('ZRANGE', active, 0, 0, 'WITHSCORES')
    if #least == 0 then break end
    local tenant, vt = least[1], tonumber(least[2])
    -- A tie goes to the tenant with the fewest jobs waiting (then by name): deterministic, and
    -- never to the big batch's favour.
    local tied = redis.call('ZRANGEBYSCORE', active, least[2], least[2], 'LIMIT', 0, 16)
    if #tied > 1 then
      local fewest = nil
      for _, name in ipairs(tied) do
        local waiting = redis.call('ZCARD', pending .. priority .. ':' .. name)
        if fewest == nil or waiting < fewest then fewest, tenant = waiting, name end
      end
    end
    local line = pending .. priority .. ':' .. tenant
    local head = redis.call('ZRANGE', line, 0, 0)
    if #head == 0 then
      redis.call('ZREM', active, tenant)
      redis.call('HSET', vt_key, priority .. ':' .. tenant, tostring(vt))
    else
      local chosen = head[1]
      redis.call('ZREM', line, chosen)
      local found = redis.call('HMGET', jobs .. chosen, 'status', 'fal')
      if found[1] == ARGV[6] and not found[2] then
        vt = vt + 1 / weight_of(tenant)
        if redis.call('ZCARD', line) == 0 then
          redis.call('ZREM', active, tenant)
          redis.call('HSET', vt_key, priority .. ':' .. tenant, tostring(vt))
        else
          redis.call('ZADD', active, vt, tenant)
        end
        take(chosen)
        if chosen == job and not dispatch then return claim() end
        redis.call('ZADD', KEYS[7], 'XX', 'LT', now + tonumber(ARGV[17]), chosen)
        return {2, chosen}
      end
    end
  end
end
if dispatch then return {-3, ''} end
return {0, '1.0'}
